"""Plain data passed between stages: samples, batches of samples, windows."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
QualityArray = npt.NDArray[np.uint8]


class Quality(IntEnum):
    """How far a value can be trusted; stored as uint8 in buffers."""

    GOOD = 0
    UNCERTAIN = 1
    BAD = 2  # the device answered, but not with a usable value (exception, bad status)
    STALE = 3  # the value did not refresh in time
    COMMS_LOST = 4  # the device could not be reached

    @property
    def label(self) -> str:
        """Lower-case name used in JSON and tables (`comms-lost`)."""
        return self.name.lower().replace("_", "-")


Value = float | int | bool | str | None


@dataclass(frozen=True, slots=True)
class Sample:
    """One tag's value at one time."""

    device: str
    tag: str
    ts: float  # seconds since the Unix epoch
    value: Value
    quality: Quality


@dataclass(frozen=True, slots=True)
class SampleBatch:
    """All tags of one read, column-wise: what a driver hands the buffers in one step.

    `values` holds every numeric tag as float64 (NaN where the quality is not good);
    `exact` holds the few values float64 cannot carry (strings, 64-bit integers above 2**53).
    """

    device: str
    ts: float
    tags: tuple[str, ...]
    values: FloatArray
    quality: QualityArray
    exact: Mapping[int, Value] = field(default_factory=dict)
    kinds: tuple[str, ...] = ()  # per tag: "float" | "int" | "bool" | "str", for rendering
    times: FloatArray | None = None  # per-tag timestamps when the source gives them (OPC UA); else `ts`

    def __len__(self) -> int:
        return len(self.tags)

    def value_at(self, i: int) -> Value:
        """The tag's value as its own Python type (None when not good)."""
        if self.quality[i] != Quality.GOOD:
            return None
        if i in self.exact:
            return self.exact[i]
        v = float(self.values[i])
        kind = self.kinds[i] if self.kinds else "float"
        if kind == "bool":
            return bool(v)
        if kind == "int" and math.isfinite(v):
            return int(v)
        return v

    def samples(self) -> Iterator[Sample]:
        """One Sample per tag (for display and tests; the hot path stays column-wise)."""
        for i, tag in enumerate(self.tags):
            ts = self.ts if self.times is None else float(self.times[i])
            yield Sample(self.device, tag, ts, self.value_at(i), Quality(int(self.quality[i])))


@dataclass(frozen=True, slots=True)
class TelemetryTag:
    """What telemetry needs of a tag's config: its unit, deadband in its unit (0: any change), float32 printing."""

    name: str
    unit: str | None = None
    deadband: float = 0.0
    float32: bool = False


@dataclass(frozen=True, slots=True)
class Window:
    """Tags resampled onto a regular grid: n_samples × n_tags, with a mask of good cells."""

    tags: tuple[str, ...]
    t_end: float  # timestamp of the last grid point
    interval: float  # seconds between grid points
    values: npt.NDArray[np.float32]
    good: npt.NDArray[np.bool_]

    @property
    def times(self) -> FloatArray:
        """Timestamps of the grid points, oldest first."""
        n = self.values.shape[0]
        return self.t_end - self.interval * np.arange(n - 1, -1, -1, dtype=np.float64)

    @property
    def good_fraction(self) -> float:
        """Share of cells that hold a good sample."""
        return float(self.good.mean()) if self.good.size else 0.0


@dataclass(frozen=True, slots=True)
class Score:
    """A model's verdict on one window."""

    model: str
    t_end: float
    score: float | None  # None: not scored (insufficient data)
    threshold: float
    contributions: Mapping[str, float]  # tag → share of the score (sums to 1)
    good_fraction: float


class EventType(StrEnum):
    """Kinds of anomaly event."""

    START = "anomaly.start"
    END = "anomaly.end"


class Severity(StrEnum):
    """How far the score is above the threshold."""

    MINOR = "minor"  # up to 1.5 × threshold
    MAJOR = "major"  # up to 3 ×
    CRITICAL = "critical"  # beyond


@dataclass(frozen=True, slots=True)
class AnomalyEvent:
    """An anomaly starting or ending, with what an operator needs to judge it."""

    type: EventType
    event_id: str  # unique and sortable (time-ordered)
    anomaly_id: str  # the same for the start and the end of one anomaly
    seq: int  # per-agent sequence number
    agent: str
    site: str
    model: str
    model_version: str
    model_sha256: str
    window_start: float
    window_end: float
    score: float
    threshold: float
    severity: Severity
    contributions: Mapping[str, float]  # top tags and their shares
    values: Mapping[str, float | None]  # the latest value of each input when the event fired
    started_at: float  # when the anomaly began (equal to window_end for a start)
    peak_score: float
    reason: str = ""  # for an end: recovered, shutdown, agent_restart or reconfigured
    historical: bool = False
    # drift adaptation's state when the event fired (scoring.adapt.Adapter.state); None: the model does not adapt
    adaptation: Mapping[str, float | int | bool | str] | None = None


def severity_of(ratio: float) -> Severity:
    """Severity of a score as a multiple of the threshold (events: the peak so far; scores payload: the current)."""
    if ratio < 1.5:
        return Severity.MINOR
    if ratio < 3.0:
        return Severity.MAJOR
    return Severity.CRITICAL


@dataclass(frozen=True, slots=True)
class OpenAnomaly:
    """An anomaly whose start was written and whose end was not (at most one per model)."""

    model: str
    anomaly_id: str
    record: bytes  # the start event's record, as stored
