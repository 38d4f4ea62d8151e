"""Reusable pydantic building blocks: a strict base model, durations and byte sizes."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)\s*$", re.IGNORECASE)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, models are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def parse_duration(value: Any) -> float:
    """Turn `250ms`, `1s`, `5m`, `1h`, `2d` or a number of seconds into seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like 250ms, 1s, 5m")
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:  # an int past 1e308
            raise ValueError("a duration this long is not a finite number of seconds") from None
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a duration: write a number with a unit, e.g. 250ms, 1s, 5m, 1h, 2d")


def parse_size(value: Any) -> int:
    """Turn `512MiB`, `10MB`, `4096B` or a number of bytes into bytes."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string like 512MiB")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        size = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()] if m else math.nan
        if math.isfinite(size):  # 400 digits are a float of inf
            return int(size)
    shown = f"{value[:20]!r}… ({len(value)} characters)" if isinstance(value, str) and len(value) > 40 else repr(value)
    raise ValueError(f"{shown} is not a size: write e.g. 4096, 64KiB, 512MiB, 1GB")


def format_duration(seconds: float) -> str:
    """Render seconds the way a config file writes them."""
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds}s"


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
