"""A small pump skid: centrifugal pump, motor and inlet valve, seeded and deterministic.

The plant advances in fixed ticks; its state after tick k depends only on the seed, the fault
schedule, k and the commands given (pump_run, fault reset). Pressures are absolute (bar a).

Hydraulics: pump curve H = H0·s² − k·Q² meets the system curve
H = (P_back − P_tank) + (R_out + R_in(valve))·Q²; suction = P_tank − R_in·Q² (flow chokes where
suction reaches the vapour limit), discharge = suction + head. Shaft power = hydraulic power /
efficiency (efficiency parabola peaking at the best-efficiency flow); motor current = no-load
current + power-proportional part. Bearing and fluid temperatures are first-order lags.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .faults import NOMINAL, SIGNALS, Effects, Fault, FaultSpec, build_faults

__all__ = ["HIGH_VIBRATION", "NOISE_STD", "NOMINAL", "SIGNALS", "UNITS", "Plant", "PlantPort", "PlantState"]

UNITS: dict[str, str] = {
    "suction_pressure": "bar",
    "discharge_pressure": "bar",
    "flow": "m3/h",
    "motor_current": "A",
    "vibration_rms": "mm/s",
    "bearing_temp": "°C",
    "fluid_temp": "°C",
    "valve_position": "%",
}
#: Standard deviation of each transmitter's Gaussian noise, in SIGNALS order.
NOISE_STD: tuple[float, ...] = (0.01, 0.02, 0.25, 0.15, 0.08, 0.1, 0.05, 0.2)
#: Transmitter cut-offs: readings closer to zero than this report exactly 0 (~6 sigma).
FLOW_CUTOFF = 1.5  # m3/h
CURRENT_CUTOFF = 1.0  # A
#: ISO 10816 zone C/D boundary for this machine class, mm/s RMS.
HIGH_VIBRATION = 7.1

# Hydraulics (bar, m3/h): nominal point Q = 40, suction 1.5, discharge 6.0 at rated speed.
P_TANK = 1.8  # suction tank, bar a
P_BACK = 2.8  # static back pressure of the discharge header, bar a
H0 = 5.2  # shut-off head at rated speed, bar
K_PUMP = 4.375e-4  # pump curve droop, bar/(m3/h)²
R_PIPE_IN = 1.0e-4  # suction piping, bar/(m3/h)²
R_VALVE = 0.875e-4  # inlet valve fully open; scales with 1/opening²
R_OUT = 2.0e-3  # discharge piping and process, bar/(m3/h)²
P_CHOKE = 0.2  # suction cannot fall below this (vapour pressure + margin): flow chokes
P_CAV_ONSET = 0.6  # below this suction pressure the pump starts to cavitate
Q_BEP = 45.0  # best-efficiency flow at rated speed
ETA_MAX = 0.72
# Motor and mechanics.
I_NO_LOAD = 9.0  # A
I_RATED = 30.0  # A at the nominal point
SPEED_RAMP = 0.5  # soft starter, rated speed per second
COAST_TAU = 1.5  # s, speed decay after the motor is switched off
VALVE_RATE = 1.5  # %/s, actuator speed
# Temperatures.
T_AMBIENT = 22.0
TAU_BEARING = 180.0
TAU_FLUID = 600.0
# Slow process variation (Ornstein-Uhlenbeck): (std, time constant s).
DRIFT_BACK = (0.12, 90.0)  # header pressure follows demand
DRIFT_AMBIENT = (1.5, 1800.0)
DRIFT_SPEED = (0.004, 60.0)

_CHUNK = 1024  # noise rows drawn at once; fixed so step() and run() see the same numbers
_N_PROC = 5  # process random numbers per tick: 3 drifts, 2 for cavitation


def _shaft_power(q: float, head: float, speed: float) -> float:
    """Shaft power in W; efficiency η = η_max·x(2−x), x = Q/(Q_bep·s), so it stays finite at Q=0."""
    if speed < 1e-3:
        return 0.0
    x = min(q / (Q_BEP * speed), 1.8)
    return (Q_BEP * speed / 3600.0) * head * 1e5 / (ETA_MAX * (2.0 - x))


_Q_NOM = 40.0
P_NOMINAL = _shaft_power(_Q_NOM, H0 - K_PUMP * _Q_NOM**2, 1.0)
A_PER_W = (I_RATED - I_NO_LOAD) / P_NOMINAL


@dataclass(frozen=True, slots=True)
class PlantState:
    """What the skid reports after one tick: the served snapshot."""

    tick: int
    time: float  # seconds of plant time (tick · dt)
    suction_pressure: float
    discharge_pressure: float
    flow: float
    motor_current: float
    vibration_rms: float
    bearing_temp: float
    fluid_temp: float
    valve_position: float
    pump_run: bool  # the run command
    motor_running: bool
    run_seconds: int
    fault_active: bool
    high_vibration: bool
    active_faults: tuple[str, ...] = ()

    @property
    def values(self) -> tuple[float, ...]:
        """The eight signals in SIGNALS order."""
        return (
            self.suction_pressure,
            self.discharge_pressure,
            self.flow,
            self.motor_current,
            self.vibration_rms,
            self.bearing_temp,
            self.fluid_temp,
            self.valve_position,
        )


class PlantPort(Protocol):
    """What a protocol server needs from the plant: the latest snapshot and two commands."""

    @property
    def state(self) -> PlantState: ...
    @property
    def pump_run(self) -> bool: ...
    @pump_run.setter
    def pump_run(self, on: bool) -> None: ...
    def reset_faults(self) -> None: ...


class Plant:
    """The pump skid. `step()` advances one tick; `run(n)` returns n ticks as arrays."""

    def __init__(
        self,
        seed: int = 0,
        faults: Sequence[FaultSpec] = (),
        dt: float = 0.1,
        *,
        drift: bool = True,
        noise: bool = True,
        run_seconds: int = 7_654_321,
    ) -> None:
        if not dt > 0:
            raise ValueError(f"dt must be > 0 seconds, got {dt}")
        self.dt = dt
        self.seed = seed
        self.fault_specs = tuple(faults)
        proc_ss, sensor_ss, fault_ss = np.random.SeedSequence(seed).spawn(3)
        self._proc_rng = np.random.default_rng(proc_ss)
        self._sensor_rng = np.random.default_rng(sensor_ss)
        self._faults: list[Fault] = build_faults(self.fault_specs, dt, fault_ss)
        self._drift = drift
        self._noise_std = np.asarray(NOISE_STD if noise else (0.0,) * len(SIGNALS))
        self._proc = np.empty((0, _N_PROC))
        self._sensor = np.empty((0, len(SIGNALS)))
        # Exact first-order lag factors for one tick.
        self._a_bearing = 1.0 - math.exp(-dt / TAU_BEARING)
        self._a_fluid = 1.0 - math.exp(-dt / TAU_FLUID)
        self._drift_params = [
            (s, math.exp(-dt / tau), s * math.sqrt(1.0 - math.exp(-2 * dt / tau)))
            for s, tau in (DRIFT_BACK, DRIFT_AMBIENT, DRIFT_SPEED)
        ]
        # Commands.
        self._pump_run = True
        self._reset_requested = False
        # Physical state: start in steady state, running at the nominal point.
        self.tick = -1
        self._speed = 1.0
        self._valve = 100.0
        self._cav = 0.0
        self._drifts = [0.0, 0.0, 0.0]
        self._run_ticks = 0
        self._run_seconds0 = run_seconds
        self._t_bearing = math.nan  # set to the target on tick 0
        self._t_fluid = math.nan
        self._energized = True
        self._reported = np.zeros(len(SIGNALS))
        self._active: tuple[str, ...] = ()
        self._state: PlantState | None = None
        self._advance()

    # -- commands ---------------------------------------------------------------------------
    @property
    def pump_run(self) -> bool:
        """The run command (coil pump_run); takes effect on the next tick."""
        return self._pump_run

    @pump_run.setter
    def pump_run(self, on: bool) -> None:
        self._pump_run = bool(on)

    def reset_faults(self) -> None:
        """Fault reset: every fault active at the next tick ends there."""
        self._reset_requested = True

    # -- stepping ----------------------------------------------------------------------------
    @property
    def state(self) -> PlantState:
        """The latest tick's snapshot."""
        if self._state is None or self._state.tick != self.tick:
            v = self._reported
            self._state = PlantState(
                tick=self.tick,
                time=self.tick * self.dt,
                suction_pressure=float(v[0]),
                discharge_pressure=float(v[1]),
                flow=float(v[2]),
                motor_current=float(v[3]),
                vibration_rms=float(v[4]),
                bearing_temp=float(v[5]),
                fluid_temp=float(v[6]),
                valve_position=float(v[7]),
                pump_run=self._pump_run,
                motor_running=self._energized,
                run_seconds=self.run_seconds,
                fault_active=bool(self._active),
                high_vibration=bool(v[4] > HIGH_VIBRATION),
                active_faults=self._active,
            )
        return self._state

    @property
    def run_seconds(self) -> int:
        """Seconds the motor has run (counter, uint32 wrap)."""
        return (self._run_seconds0 + int(self._run_ticks * self.dt + 1e-6)) % 2**32

    def step(self) -> PlantState:
        """Advance one tick and return its snapshot."""
        self._advance()
        return self.state

    def advance(self, n_ticks: int = 1) -> None:
        """Advance n ticks without building snapshots."""
        for _ in range(n_ticks):
            self._advance()

    def run(self, n_ticks: int) -> dict[str, npt.NDArray[np.generic]]:
        """Advance n ticks; arrays keyed by signal name plus tick, time and the status bits."""
        vals = np.empty((n_ticks, len(SIGNALS)))
        ticks = np.empty(n_ticks, dtype=np.int64)
        run_s = np.empty(n_ticks, dtype=np.int64)
        bits = np.empty((n_ticks, 3), dtype=bool)  # pump_run, motor_running, fault_active
        for i in range(n_ticks):
            self._advance()
            vals[i] = self._reported
            ticks[i] = self.tick
            run_s[i] = self.run_seconds
            bits[i] = (self._pump_run, self._energized, bool(self._active))
        out: dict[str, npt.NDArray[np.generic]] = {"tick": ticks, "time": ticks * self.dt}
        for j, name in enumerate(SIGNALS):
            out[name] = vals[:, j].copy()
        out["pump_run"] = bits[:, 0].copy()
        out["motor_running"] = bits[:, 1].copy()
        out["run_seconds"] = run_s
        out["fault_active"] = bits[:, 2].copy()
        out["high_vibration"] = vals[:, 4] > HIGH_VIBRATION
        return out

    # -- the model ---------------------------------------------------------------------------
    def _noise_rows(self, k: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        i = k % _CHUNK
        if i == 0:
            self._proc = self._proc_rng.standard_normal((_CHUNK, _N_PROC))
            self._sensor = self._sensor_rng.standard_normal((_CHUNK, len(SIGNALS)))
        return self._proc[i], self._sensor[i]

    def _advance(self) -> None:
        first = self.tick < 0
        self.tick = k = self.tick + 1
        dt = self.dt
        proc, sens = self._noise_rows(k)

        if self._reset_requested:
            for f in self._faults:
                f.clear(k)
            self._reset_requested = False
        active = [f for f in self._faults if f.active(k)]
        fx = Effects()
        for f in active:
            f.physics(fx, (k - f.start_tick) * dt)

        # Slow process variation.
        if self._drift and not first:
            for j, (_, a, s) in enumerate(self._drift_params):
                self._drifts[j] = self._drifts[j] * a + s * float(proc[j])
        d_back, d_amb, d_speed = self._drifts

        # Motor and valve.
        self._energized = self._pump_run
        if not first:
            if self._energized:
                target = (1.0 + d_speed) * fx.speed_factor
                step = SPEED_RAMP * dt
                self._speed = min(self._speed + step, max(self._speed - step, target))
            else:
                self._speed *= math.exp(-dt / COAST_TAU)
                if self._speed < 0.01:
                    self._speed = 0.0
            v_target = 100.0 if fx.valve_target is None else fx.valve_target
            step = VALVE_RATE * dt
            self._valve = min(self._valve + step, max(self._valve - step, v_target))
        else:
            self._speed = (1.0 + d_speed) * fx.speed_factor if self._energized else 0.0
        s = self._speed

        # Hydraulics: intersection of pump and system curves, choked at the suction limit.
        cav = max(self._cav, fx.cavitation)
        p_tank = P_TANK + fx.tank_pressure
        opening = max(self._valve / 100.0, 0.02)
        r_in = R_PIPE_IN + R_VALVE / (opening * opening)
        h0 = H0 * s * s * (1.0 - 0.15 * cav)
        q2 = (h0 - (P_BACK + d_back - p_tank)) / (K_PUMP + R_OUT + r_in)
        q = math.sqrt(q2) if q2 > 0 else 0.0
        q = min(q, math.sqrt(max(p_tank - P_CHOKE, 0.0) / r_in))
        q = max(0.0, q * (1.0 + 0.05 * cav * float(proc[3])))  # cavitating flow is unsteady
        p_suc = p_tank - r_in * q * q
        head = h0 - K_PUMP * q * q
        p_dis = p_suc + head
        # Cavitation intensity from the suction margin, used from the next tick (head breakdown).
        self._cav = min(1.0, max(0.0, (P_CAV_ONSET - p_suc) / 0.35)) if q > 0 else 0.0
        cav = max(cav, self._cav)

        power = _shaft_power(q, head, s) + fx.extra_power * s
        current = I_NO_LOAD + A_PER_W * power if self._energized else 0.0
        x = q / (Q_BEP * s) if s > 1e-3 else 0.0
        vib = 0.1 + s * s * (2.3 + 12.0 * (x - 1.0) ** 2 + fx.vibration + cav * (3.5 + 1.5 * abs(float(proc[4]))))

        load = power / P_NOMINAL
        t_amb = T_AMBIENT + d_amb
        fluid_target = t_amb + 3.0 * load + 4.0 * max(0.0, 1.0 - q / 15.0) * s * s
        if first:
            self._t_fluid = fluid_target
        else:
            self._t_fluid += (fluid_target - self._t_fluid) * self._a_fluid
        bearing_target = 0.5 * (t_amb + self._t_fluid) + 20.0 * s * s + 11.5 * load + fx.bearing_heat
        if first:
            self._t_bearing = bearing_target
        else:
            self._t_bearing += (bearing_target - self._t_bearing) * self._a_bearing
        if self._energized and not first:
            self._run_ticks += 1

        # Transmitters: noise, physical limits, low-flow and zero-current cut-offs.
        true = np.array((p_suc, p_dis, q, current, vib, self._t_bearing, self._t_fluid, self._valve))
        measured = true + self._noise_std * sens
        measured[0] = max(measured[0], 0.0)
        measured[1] = max(measured[1], 0.0)
        if abs(measured[2]) < FLOW_CUTOFF:
            measured[2] = 0.0
        if abs(measured[3]) < CURRENT_CUTOFF:
            measured[3] = 0.0
        measured[4] = max(measured[4], 0.0)
        previous = measured.copy() if first else self._reported
        for f in active:
            f.sensors(measured, previous, (k - f.start_tick) * dt)
        self._reported = measured
        self._active = tuple(f.spec.name for f in active)
