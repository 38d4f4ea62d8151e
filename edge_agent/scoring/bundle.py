"""Model bundles: a .tflite file carrying its own JSON metadata (name `edge_agent`) in its metadata table."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import ErrorDetails

from edge_agent.errors import ModelError
from edge_agent.scoring.base import plugin_for
from edge_agent.scoring.tflite_metadata import FlatbufferError, read_metadata_bytes, replace_metadata_bytes

METADATA_NAME = "edge_agent"
SCHEMA_VERSION = 1
# seconds between samples a bundle may ask for: below 1 ms no PLC poll keeps up (the windows would be
# made of repeated samples and alarm on noise); above a day a window never fills
MIN_SAMPLE_INTERVAL, MAX_SAMPLE_INTERVAL = 0.001, 86400.0
# windows are normalised in float32: a mean or scale beyond its range, or a scale whose inverse is,
# turns every value into inf or NaN (float32 holds ±3.4e38)
FLOAT32_BOUND, MIN_SCALE = 1e38, 1e-30


class _Meta(BaseModel):
    # readers ignore fields added by newer minor versions; the major version is checked.
    # No NaN or infinity anywhere: a NaN mean or scale blinds the model, an infinite threshold never alarms
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


def _divisible(scale: float) -> float:
    if scale < MIN_SCALE:
        raise ValueError(f"{scale:g} is below {MIN_SCALE:g}: the agent divides by it in float32")
    return scale


def _printable(tag: str) -> str:
    if not tag.isprintable():  # a line break in a tag name would break every message that names it
        raise ValueError("holds a control character")
    return tag


class Normalisation(_Meta):
    """x_normalised = (x − mean) / scale, per input tag."""

    mean: list[Annotated[float, Field(ge=-FLOAT32_BOUND, le=FLOAT32_BOUND)]]
    scale: list[Annotated[float, Field(gt=0, le=FLOAT32_BOUND), AfterValidator(_divisible)]]
    # how mean and scale were fitted: standard (mean, standard deviation) or robust (median, IQR × 0.7413);
    # bundles from before this field are standard, and calibrating a bundle fits the way it was trained.
    # A str, not a Literal: scoring does not depend on it, so a newer agent's method must not make a bundle unreadable
    scaling: str = "standard"


class ScoreSpec(_Meta):
    """How a window's score is computed from the model's output."""

    # the model kind: a key of edge_agent.scoring.base.SCORERS, checked when the bundle is read
    kind: str = "reconstruction_mse"
    smoothing: int = Field(1, ge=1, le=1000, description="rolling mean over this many window scores")
    # what the kind's training hook handed back besides the model (base.Trained.score_params): JSON values
    # only that kind reads (e.g. per-member thresholds); empty for kinds that need nothing more
    params: dict[str, Any] = Field(default_factory=dict)

    @model_serializer(mode="wrap")
    def _without_empty_params(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # a kind without params writes the metadata it wrote before params existed: rebuilt bundles keep their bytes
        out: dict[str, Any] = handler(self)
        if not out.get("params"):
            out.pop("params", None)
        return out


class DetectorSpec(_Meta):
    """Hysteresis defaults shipped with the model (a config's models[].hysteresis overrides them)."""

    exit_ratio: float = Field(0.8, gt=0, le=1)
    min_duration: float = Field(5.0, ge=0, description="seconds an anomaly lasts at least")


class ThresholdSpec(_Meta):
    """The score above which a window is anomalous, and how it was set."""

    value: float = Field(gt=0)
    method: str = "quantile×margin"
    quantile: float = 0.99
    margin: float = 1.5
    calibrated_on: str = ""
    rows: int = 0
    calibrated_at: str = ""
    base_sha256: str = Field("", description="sha256 of the bundle this one was calibrated from ('' if unknown)")
    # what a calibration set (all: normalisation and threshold; threshold: the bundle's normalisation was kept)
    calibrated: str = "all"
    # a calibration on a short quiet stretch can set a threshold far below what the model scores on normal
    # data elsewhere; a floor (train --threshold-floor, calibrate --threshold-floor) keeps every recalibration at
    # or above it
    floor: float = Field(0.0, ge=0, description="calibration never sets the threshold below this (0: no floor)")


class BundleMetadata(_Meta):
    """Everything the agent needs to score with a model, stored inside the model file."""

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str = "1"
    description: str = ""
    inputs: list[Annotated[str, Field(min_length=1), AfterValidator(_printable)]] = Field(
        min_length=1, description="tag names, in input order, each once"
    )
    window: int = Field(ge=1, description="samples per window")
    sample_interval: float = Field(
        description=f"seconds between samples, {MIN_SAMPLE_INTERVAL:g} … {MAX_SAMPLE_INTERVAL:g}"
    )
    normalisation: Normalisation
    score: ScoreSpec = ScoreSpec()
    detector: DetectorSpec = DetectorSpec()
    threshold: ThresholdSpec
    training: dict[str, Any] = Field(default_factory=dict)
    created: str = ""

    @field_validator("inputs")
    @classmethod
    def _distinct(cls, inputs: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        for tag in inputs:
            seen[tag] = seen.get(tag, 0) + 1
        twice = [tag for tag, n in seen.items() if n > 1]
        if twice:
            raise ValueError(
                f"{twice[0]} is listed {seen[twice[0]]} times"
                + (f" ({len(twice) - 1} more tags too)" if twice[1:] else "")
                + "; each input is a different tag"
            )
        return inputs

    @field_validator("sample_interval")
    @classmethod
    def _sane_interval(cls, seconds: float) -> float:
        if not MIN_SAMPLE_INTERVAL <= seconds <= MAX_SAMPLE_INTERVAL:
            raise ValueError(
                f"{seconds:g} s is outside {MIN_SAMPLE_INTERVAL:g} s … {MAX_SAMPLE_INTERVAL:g} s (1 ms … 1 day)"
            )
        return seconds

    @model_validator(mode="after")
    def _consistent(self) -> BundleMetadata:
        n = len(self.inputs)
        if len(self.normalisation.mean) != n or len(self.normalisation.scale) != n:
            raise ValueError(
                f"normalisation has {len(self.normalisation.mean)} means and {len(self.normalisation.scale)} scales "
                f"for {n} inputs"
            )
        if self.schema_version // 100 != SCHEMA_VERSION // 100:
            raise ValueError(f"schema version {self.schema_version} is not readable by this agent")
        return self


_MESSAGES = {
    "finite_number": "must be a finite number",
    "greater_than": "must be above {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "missing": "missing",
    "string_too_short": "cannot be empty",
}


def one_line(exc: ValidationError) -> str:
    """A validation error as one line: `where: what (got value)`, for the first few problems."""

    def describe(err: ErrorDetails) -> str:
        where = ""
        for part in err["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        template = _MESSAGES.get(err["type"])
        ctx = err.get("ctx") or {}
        text = template.format(**ctx) if template else err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        if err["type"] != "missing" and isinstance(got, int | float | str) and not isinstance(got, bool):
            shown = f"{got:g}" if isinstance(got, float) else repr(got)  # an int may be too big for a float
            shown = shown if len(shown) <= 40 else shown[:39] + "…"
            text += f" (got {shown})" if shown not in text else ""
        return f"{where}: {text}" if where else text

    errors = exc.errors()
    more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
    return "; ".join(describe(e) for e in errors[:3]) + more


def now_iso() -> str:
    """Creation time for metadata; SOURCE_DATE_EPOCH pins it so a rebuild gives a byte-identical file."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = dt.datetime.fromtimestamp(int(epoch), dt.UTC) if epoch else dt.datetime.now(dt.UTC)
    return t.isoformat(timespec="seconds")


@dataclass(frozen=True)
class Bundle:
    """A loaded model file: bytes, identity and metadata."""

    data: bytes
    sha256: str
    metadata: BundleMetadata
    path: Path | None = None


def _schema() -> Any:
    """The TFLite flatbuffer schema module that ships with ai-edge-litert (or TensorFlow)."""
    try:
        from ai_edge_litert import schema_py_generated

        return schema_py_generated
    except ImportError:
        pass
    try:
        from tensorflow.lite.python import schema_py_generated

        return schema_py_generated
    except ImportError as exc:
        raise ModelError("adding metadata to a model needs ai-edge-litert (pip install ai-edge-litert)") from exc


def _check_tflite(data: bytes, where: str) -> None:
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ModelError(f"{where}: not a TFLite model file (no TFL3 identifier)")


def read_metadata(data: bytes, where: str = "model") -> BundleMetadata:
    """The edge_agent metadata of a TFLite model, validated."""
    _check_tflite(data, where)
    try:
        raw = read_metadata_bytes(data, METADATA_NAME)
    except FlatbufferError as exc:
        raise ModelError(f"{where}: damaged model file ({exc})") from exc
    if raw is None:
        raise ModelError(f"{where}: no '{METADATA_NAME}' metadata; make bundles with `edge-agent train` or calibrate")
    try:
        meta = BundleMetadata.model_validate(json.loads(raw))
    except ValidationError as exc:
        raise ModelError(f"{where}: invalid {METADATA_NAME} metadata: {one_line(exc)}") from None
    except (ValueError, RecursionError) as exc:  # not JSON (or not UTF-8, or nested past the parser's depth)
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelError(f"{where}: invalid {METADATA_NAME} metadata: not JSON: {why}") from None
    try:
        plugin_for(meta.score.kind).output_shape(meta)  # the kind checks its own score.params
    except ModelError as exc:
        raise ModelError(f"{where}: {exc}") from None
    return meta


# fields added after bundles were first shipped, written only when they differ from their default, so a
# bundle made as before (same options, same data) stays byte for byte the same file with the same sha256
_LATER_FIELDS: dict[str, dict[str, Any]] = {
    "normalisation": {"scaling": "standard"},
    "threshold": {"calibrated": "all", "floor": 0.0},
}


def _dump(metadata: BundleMetadata) -> dict[str, Any]:
    out = metadata.model_dump(mode="json")
    for section, defaults in _LATER_FIELDS.items():
        fields: dict[str, Any] = out[section]
        for key, default in defaults.items():
            if fields.get(key) == default:
                del fields[key]
    return out


def embed_metadata(data: bytes, metadata: BundleMetadata) -> bytes:
    """Return the model with `metadata` stored in its metadata table (replacing an older copy)."""
    _check_tflite(data, "model")
    blob = json.dumps(_dump(metadata), separators=(",", ":")).encode()
    try:
        # a bundle already has the entry: patch it, which needs no schema module (tflite-runtime devices)
        patched = replace_metadata_bytes(data, METADATA_NAME, blob)
    except FlatbufferError as exc:
        raise ModelError(f"model: damaged model file ({exc})") from exc
    if patched is not None:
        return patched
    # a bare model fresh from the converter (training): add the entry with the schema's object API
    import flatbuffers

    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    buffer = schema.BufferT()
    buffer.data = list(blob)
    model.buffers = model.buffers or []
    model.metadata = [m for m in (model.metadata or []) if m.name not in (METADATA_NAME, METADATA_NAME.encode())]
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
    builder = flatbuffers.Builder(len(data) + len(blob) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def load_bundle(path: str | Path) -> Bundle:
    """Read a bundle from disk; errors say which file and what is wrong with it."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ModelError(f"{p}: cannot read the model file: {exc.strerror}") from None
    return Bundle(data, hashlib.sha256(data).hexdigest(), read_metadata(data, str(p)), p)


def bundle_from_bytes(data: bytes) -> Bundle:
    """A bundle held in memory (freshly trained or calibrated)."""
    return Bundle(data, hashlib.sha256(data).hexdigest(), read_metadata(data))


def save_bundle(bundle: Bundle, path: str | Path) -> Path:
    """Write a bundle atomically (a half-written model file must never be loaded)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(bundle.data)
    tmp.replace(p)
    return p
