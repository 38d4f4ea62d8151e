"""Model bundles: a .tflite file carrying its own JSON metadata (name `edge_agent`) in its metadata table."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_agent.errors import ModelError
from edge_agent.scoring.base import plugin_for
from edge_agent.scoring.tflite_metadata import FlatbufferError, read_metadata_bytes, replace_metadata_bytes

METADATA_NAME = "edge_agent"
SCHEMA_VERSION = 1


class _Meta(BaseModel):
    # readers ignore fields added by newer minor versions; the major version is checked
    model_config = ConfigDict(extra="ignore", frozen=True)


class Normalisation(_Meta):
    """x_normalised = (x − mean) / scale, per input tag."""

    mean: list[float]
    scale: list[float]


class ScoreSpec(_Meta):
    """How a window's score is computed from the model's output."""

    # the model kind: a key of edge_agent.scoring.base.SCORERS, checked when the bundle is read
    kind: str = "reconstruction_mse"
    smoothing: int = Field(1, ge=1, le=1000, description="rolling mean over this many window scores")


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


class BundleMetadata(_Meta):
    """Everything the agent needs to score with a model, stored inside the model file."""

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str = "1"
    description: str = ""
    inputs: list[str] = Field(min_length=1, description="tag names, in input order")
    window: int = Field(ge=1, description="samples per window")
    sample_interval: float = Field(gt=0, description="seconds between samples")
    normalisation: Normalisation
    score: ScoreSpec = ScoreSpec()
    detector: DetectorSpec = DetectorSpec()
    threshold: ThresholdSpec
    training: dict[str, Any] = Field(default_factory=dict)
    created: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> BundleMetadata:
        n = len(self.inputs)
        if len(self.normalisation.mean) != n or len(self.normalisation.scale) != n:
            raise ValueError(f"normalisation has {len(self.normalisation.mean)} means for {n} inputs")
        if any(s <= 0 for s in self.normalisation.scale):
            raise ValueError("normalisation scales must be positive")
        if self.schema_version // 100 != SCHEMA_VERSION // 100:
            raise ValueError(f"schema version {self.schema_version} is not readable by this agent")
        return self


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
    except (ValueError, ValidationError) as exc:
        raise ModelError(f"{where}: invalid {METADATA_NAME} metadata: {exc}") from exc
    try:
        plugin_for(meta.score.kind)
    except ModelError as exc:
        raise ModelError(f"{where}: {exc}") from None
    return meta


def embed_metadata(data: bytes, metadata: BundleMetadata) -> bytes:
    """Return the model with `metadata` stored in its metadata table (replacing an older copy)."""
    _check_tflite(data, "model")
    blob = json.dumps(metadata.model_dump(mode="json"), separators=(",", ":")).encode()
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
