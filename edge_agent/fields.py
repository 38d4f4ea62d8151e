"""Reusable pydantic building blocks: a strict base model, durations and byte sizes."""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    WrapValidator,
    model_validator,
)

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
    """Base for every config section: unknown keys are errors, models are immutable, numbers are numbers.

    A number is finite (YAML's .nan and .inf are refused) and never a boolean: pydantic would read `rack: true`
    as 1, so a boolean given to a field that takes numbers but not booleans is refused, whatever the field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _booleans_are_no_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not any(isinstance(v, bool) for v in data.values()):
            return data
        fields = cls.model_fields
        return {
            k: NotANumber(v) if isinstance(v, bool) and k in fields and _number_not_bool(fields[k].annotation) else v
            for k, v in data.items()
        }


class NotANumber:
    """A boolean where a number is wanted, as no number validator takes it: pydantic would read `rack: true` as 1."""

    __slots__ = ("value",)

    def __init__(self, value: bool) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "true" if self.value else "false"


def _number_not_bool(annotation: Any) -> bool:
    takes = _takes(annotation)
    return "number" in takes and "bool" not in takes


def _takes(annotation: Any) -> set[str]:
    """What kinds of scalar a field's annotation takes: "bool", "number" (int, float or a literal of them)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:  # a type with its own parser (Duration, Size, an address) refuses booleans itself
        args = typing.get_args(annotation)
        own = any(isinstance(m, BeforeValidator | PlainValidator | WrapValidator) for m in args[1:])
        return set() if own else _takes(args[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_takes(a) for a in typing.get_args(annotation)))
    if origin is Literal:
        return {
            "bool" if isinstance(a, bool) else "number"
            for a in typing.get_args(annotation)
            if isinstance(a, int | float)
        }
    if annotation is bool or annotation is Any:
        return {"bool"}
    if isinstance(annotation, type) and issubclass(annotation, int | float):
        return {"number"}
    return set()


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
