"""Faults that can be injected into the simulated pump skid, by schedule.

A fault is written `NAME[:SIGNAL]@START[+DURATION]`, e.g. `cavitation@30+60` (from 30 s for 60 s)
or `bearing_wear@120` (from 120 s until the end). Times are seconds of plant time; `ms`, `s`, `m`
and `h` suffixes are accepted. `SIGNAL` picks the sensor for the sensor faults.

Physical faults change the plant through `Effects` (the plant turns them into pressures, flow,
current ...); sensor faults change only what a transmitter reports.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import numpy.typing as npt

#: The skid's measured signals, in register order (plant.py re-exports this).
SIGNALS: tuple[str, ...] = (
    "suction_pressure",
    "discharge_pressure",
    "flow",
    "motor_current",
    "vibration_rms",
    "bearing_temp",
    "fluid_temp",
    "valve_position",
)
#: Typical value of each signal in normal operation (sizes the sensor spikes).
NOMINAL: tuple[float, ...] = (1.5, 6.0, 40.0, 30.0, 2.5, 55.0, 25.0, 100.0)

_FORMAT = "NAME[:SIGNAL]@SECONDS[+DURATION], e.g. cavitation@30+60 or bearing_wear@120"
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_TIME = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")


@dataclass(frozen=True)
class FaultSpec:
    """One scheduled fault: which, from when (s), for how long (s, None = until the end), where."""

    name: str
    start: float
    duration: float | None = None
    signal: str | None = None

    def __str__(self) -> str:
        sig = f":{self.signal}" if self.signal else ""
        dur = "" if self.duration is None else f"+{self.duration:g}"
        return f"{self.name}{sig}@{self.start:g}{dur}"


@dataclass
class Effects:
    """What the active physical faults do to the plant in one tick (neutral values = no fault)."""

    tank_pressure: float = 0.0  # bar added to the suction tank pressure
    cavitation: float = 0.0  # minimum cavitation intensity, 0..1
    valve_target: float | None = None  # % open the inlet valve actuator is driven to
    vibration: float = 0.0  # mm/s added at rated speed
    bearing_heat: float = 0.0  # K added to the bearing temperature target
    extra_power: float = 0.0  # W of extra shaft load at rated speed
    speed_factor: float = 1.0  # multiplies the motor speed (slip under overload)


class Fault:
    """Base class: a scheduled fault with its own random stream; subclasses override the hooks."""

    name: ClassVar[str]
    description: ClassVar[str]
    default_signal: ClassVar[str | None] = None  # sensor faults only

    def __init__(self, spec: FaultSpec, dt: float, rng: np.random.Generator) -> None:
        self.spec = spec
        self.dt = dt
        self.rng = rng
        # Tick indices, not float times, so the window is the same for every run.
        self.start_tick = round(spec.start / dt)
        self.end_tick: int | None = (
            None if spec.duration is None else self.start_tick + max(1, round(spec.duration / dt))
        )
        sig = spec.signal or self.default_signal
        self.index = SIGNALS.index(sig) if sig is not None else -1

    def active(self, tick: int) -> bool:
        """True while the fault is in its window at this tick."""
        return tick >= self.start_tick and (self.end_tick is None or tick < self.end_tick)

    def clear(self, tick: int) -> None:
        """End the fault at this tick (fault reset); a fault not yet started is left alone."""
        if self.active(tick):
            self.end_tick = tick

    def physics(self, fx: Effects, elapsed: float) -> None:
        """Add this fault's effect on the process (elapsed = seconds since it started)."""

    def sensors(self, measured: npt.NDArray[np.float64], previous: npt.NDArray[np.float64], elapsed: float) -> None:
        """Change the reported values in place (previous = last tick's reported values)."""


def _ramp(elapsed: float, seconds: float) -> float:
    return min(1.0, elapsed / seconds)


class Cavitation(Fault):
    name = "cavitation"
    description = (
        "suction tank pressure falls until the pump cavitates: suction pressure, "
        "head and flow drop, flow fluctuates, vibration rises and turns noisy"
    )

    def physics(self, fx: Effects, elapsed: float) -> None:
        r = _ramp(elapsed, 10.0)
        fx.tank_pressure -= 1.0 * r
        fx.cavitation = max(fx.cavitation, 0.9 * r)


class BearingWear(Fault):
    name = "bearing_wear"
    description = (
        "a pump bearing wears progressively over ~5 min: vibration and bearing temperature rise, current rises slightly"
    )

    def physics(self, fx: Effects, elapsed: float) -> None:
        w = _ramp(elapsed, 300.0)
        # A defect bearing adds impacts: a rising level with a rough, one-sided character.
        fx.vibration += w * (6.0 + 0.8 * abs(float(self.rng.standard_normal())))
        fx.bearing_heat += 30.0 * w
        fx.extra_power += 500.0 * w


class InletValveClosing(Fault):
    name = "inlet_valve_closing"
    description = (
        "the inlet valve closes to 35 % open (1.5 %/s): valve position, flow, suction pressure and motor current fall"
    )
    target = 35.0

    def physics(self, fx: Effects, elapsed: float) -> None:
        fx.valve_target = self.target if fx.valve_target is None else min(fx.valve_target, self.target)


class MotorOverload(Fault):
    name = "motor_overload"
    description = (
        "mechanical binding loads the motor (+2.2 kW over 20 s): current and "
        "bearing temperature rise, speed slips, flow falls slightly"
    )

    def physics(self, fx: Effects, elapsed: float) -> None:
        r = _ramp(elapsed, 20.0)
        fx.extra_power += 2200.0 * r
        fx.speed_factor *= 1.0 - 0.02 * r
        fx.vibration += 0.6 * r
        fx.bearing_heat += 5.0 * r


class SensorStuck(Fault):
    name = "sensor_stuck"
    description = "one transmitter (default discharge_pressure) freezes at its last value"
    default_signal = "discharge_pressure"

    def __init__(self, spec: FaultSpec, dt: float, rng: np.random.Generator) -> None:
        super().__init__(spec, dt, rng)
        self._held: float | None = None

    def sensors(self, measured: npt.NDArray[np.float64], previous: npt.NDArray[np.float64], elapsed: float) -> None:
        if self._held is None:
            self._held = float(previous[self.index])
        measured[self.index] = self._held


class SensorSpike(Fault):
    name = "sensor_spike"
    description = (
        "random short spikes (0.1-0.4 s, ±25-50 % of the normal value, ~0.5/s) on one transmitter (default flow)"
    )
    default_signal = "flow"
    rate = 0.5  # spikes per second

    def __init__(self, spec: FaultSpec, dt: float, rng: np.random.Generator) -> None:
        super().__init__(spec, dt, rng)
        self._left = 0
        self._size = 0.0

    def sensors(self, measured: npt.NDArray[np.float64], previous: npt.NDArray[np.float64], elapsed: float) -> None:
        if self._left == 0 and self.rng.random() < self.rate * self.dt:
            self._left = max(1, round(self.rng.uniform(0.1, 0.4) / self.dt))
            sign = 1.0 if self.rng.random() < 0.5 else -1.0
            self._size = sign * self.rng.uniform(0.25, 0.5) * NOMINAL[self.index]
        if self._left > 0:
            measured[self.index] += self._size
            self._left -= 1


class FaultKind(NamedTuple):
    """A registry entry: one-line description and the class that implements the fault."""

    description: str
    implementation: type[Fault]


_ALL: tuple[type[Fault], ...] = (Cavitation, BearingWear, InletValveClosing, MotorOverload, SensorStuck, SensorSpike)
#: name -> (description, implementation)
FAULTS: dict[str, FaultKind] = {f.name: FaultKind(f.description, f) for f in _ALL}


def _known() -> str:
    return "known faults: " + ", ".join(FAULTS)


def _seconds(text: str, what: str, spec: str) -> float:
    m = _TIME.match(text)
    if not m:
        raise ValueError(
            f"fault spec {spec!r}: {what} {text!r} is not a time in seconds "
            f"(like 30, 1.5, 90s, 2m); expected {_FORMAT}; {_known()}"
        )
    value = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not math.isfinite(value):
        raise ValueError(f"fault spec {spec!r}: {what} {text!r} is not finite; {_known()}")
    return value


def parse_fault_spec(text: str) -> FaultSpec:
    """Parse `NAME[:SIGNAL]@START[+DURATION]`; ValueError names the bad part and the known faults."""
    spec = text.strip()
    if not spec:
        raise ValueError(f"empty fault spec; expected {_FORMAT}; {_known()}")
    head, at, when = spec.partition("@")
    if not at:
        raise ValueError(f"fault spec {spec!r}: missing '@START'; expected {_FORMAT}; {_known()}")
    name, colon, signal = (p.strip() for p in head.partition(":"))
    if name not in FAULTS:
        raise ValueError(f"fault spec {spec!r}: unknown fault {name!r}; {_known()}")
    impl = FAULTS[name].implementation
    if colon:
        if impl.default_signal is None:
            raise ValueError(
                f"fault spec {spec!r}: fault {name!r} takes no ':SIGNAL' (only sensor faults do); {_known()}"
            )
        if signal not in SIGNALS:
            raise ValueError(
                f"fault spec {spec!r}: unknown signal {signal!r}; known signals: {', '.join(SIGNALS)}; {_known()}"
            )
    start_text, plus, dur_text = when.partition("+")
    start = _seconds(start_text, "start", spec)
    duration = None
    if plus:
        duration = _seconds(dur_text, "duration", spec)
        if duration <= 0:
            raise ValueError(f"fault spec {spec!r}: duration {dur_text!r} must be > 0; {_known()}")
    return FaultSpec(name=name, start=start, duration=duration, signal=signal or None)


def build_faults(
    specs: tuple[FaultSpec, ...] | list[FaultSpec], dt: float, seed_seq: np.random.SeedSequence
) -> list[Fault]:
    """Instantiate scheduled faults, each with its own random stream spawned from seed_seq."""
    children = seed_seq.spawn(len(specs))
    faults: list[Fault] = []
    for spec, child in zip(specs, children, strict=True):
        if spec.name not in FAULTS:
            raise ValueError(f"unknown fault {spec.name!r}; {_known()}")
        faults.append(FAULTS[spec.name].implementation(spec, dt, np.random.default_rng(child)))
    return faults
