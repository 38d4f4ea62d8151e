"""The offline pump-skid model: determinism, fault effects and windows, spec parsing, commands."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge_agent.simulate import FAULTS, SimulatorOptions, list_faults, parse_fault_spec
from edge_agent.simulate.faults import FaultSpec
from edge_agent.simulate.modbus_server import encode_holding, encode_input
from edge_agent.simulate.plant import HIGH_VIBRATION, NOISE_STD, SIGNALS, Plant

SIGMA = dict(zip(SIGNALS, NOISE_STD, strict=True))
DT = 0.1


def _pair(spec: str, seconds: float, seed: int = 7) -> tuple[dict, dict, FaultSpec]:
    """The same seed run without and with one fault."""
    fault = parse_fault_spec(spec)
    n = round(seconds / DT)
    return Plant(seed=seed).run(n), Plant(seed=seed, faults=[fault]).run(n), fault


def _shift(clean: dict, faulty: dict, name: str, mask: np.ndarray) -> float:
    """Mean difference inside mask, in units of the sensor's noise sigma."""
    return float((faulty[name][mask].mean() - clean[name][mask].mean()) / SIGMA[name])


# -- determinism ----------------------------------------------------------------------------


def test_same_seed_is_bit_identical() -> None:
    faults = [parse_fault_spec("cavitation@5+5"), parse_fault_spec("sensor_spike@2")]
    a = Plant(seed=42, faults=faults).run(300)
    b = Plant(seed=42, faults=faults).run(300)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_step_and_run_agree() -> None:
    a = Plant(seed=3).run(1500)  # crosses a noise-chunk boundary
    p = Plant(seed=3)
    stepped = np.array([p.step().values for _ in range(1500)])
    assert np.array_equal(stepped, np.column_stack([a[s] for s in SIGNALS]))
    assert p.state.tick == 1500 and p.state.time == pytest.approx(150.0)


def test_different_seed_differs() -> None:
    a, b = Plant(seed=1).run(200), Plant(seed=2).run(200)
    for s in SIGNALS:
        assert not np.array_equal(a[s], b[s]), s


def test_normal_operation_is_plausible_and_not_flat() -> None:
    d = Plant(seed=0).run(6000)  # 10 minutes
    nominal = {
        "suction_pressure": 1.5,
        "discharge_pressure": 6.0,
        "flow": 40.0,
        "motor_current": 30.0,
        "vibration_rms": 2.5,
        "bearing_temp": 55.0,
        "fluid_temp": 25.0,
        "valve_position": 100.0,
    }
    for s, v in nominal.items():
        assert abs(d[s].mean() - v) < 0.1 * v, s
        assert d[s].std() > 0.5 * SIGMA[s], s
    flat = Plant(seed=0, drift=False).run(6000)  # demand drift, not only noise
    for s in ("flow", "discharge_pressure", "motor_current"):
        assert d[s].std() > 1.3 * flat[s].std(), s
    assert d["motor_running"].all() and not d["fault_active"].any()
    assert not d["high_vibration"].any()
    assert d["run_seconds"][-1] - d["run_seconds"][0] == pytest.approx(600, abs=1)


# -- faults ---------------------------------------------------------------------------------


def _windows(d: dict, f: FaultSpec, settle: float) -> tuple[np.ndarray, np.ndarray]:
    t = d["time"]
    end = f.start + (f.duration or np.inf)
    return (t >= f.start + settle) & (t < end), t < f.start


@pytest.mark.parametrize(
    ("spec", "settle", "expected"),
    [
        ("cavitation@20+40", 15, {"suction_pressure": -1, "discharge_pressure": -1, "flow": -1, "vibration_rms": +1}),
        ("bearing_wear@20+120", 60, {"vibration_rms": +1, "bearing_temp": +1}),
        (
            "inlet_valve_closing@20+100",
            60,
            {"valve_position": -1, "flow": -1, "suction_pressure": -1, "motor_current": -1},
        ),
        ("motor_overload@20+60", 25, {"motor_current": +1, "bearing_temp": +1, "discharge_pressure": -1}),
    ],
)
def test_physical_fault_moves_signals_only_in_its_window(spec: str, settle: float, expected: dict[str, int]) -> None:
    clean, faulty, f = _pair(spec, 240)
    inside, before = _windows(faulty, f, settle)
    for s in SIGNALS:  # nothing happens before the fault starts
        assert np.array_equal(clean[s][before], faulty[s][before]), s
    for s, direction in expected.items():
        assert direction * _shift(clean, faulty, s, inside) > 5, (s, _shift(clean, faulty, s, inside))
    assert faulty["fault_active"][inside].all() and not faulty["fault_active"][before].any()
    # After the window (plus the valve's travel time), the fast signals are back to normal;
    # temperatures are first-order lags of minutes and are left out.
    after = faulty["time"] >= f.start + (f.duration or 0) + 60
    assert not faulty["fault_active"][after].any()
    for s in ("suction_pressure", "flow", "motor_current", "vibration_rms", "valve_position"):
        assert abs(_shift(clean, faulty, s, after)) < 3, (s, _shift(clean, faulty, s, after))


def test_cavitation_makes_flow_and_vibration_noisy_and_trips_alarm() -> None:
    clean, faulty, f = _pair("cavitation@20+40", 80)
    inside, _ = _windows(faulty, f, 15)
    assert faulty["flow"][inside].std() > 3 * clean["flow"][inside].std()
    assert faulty["vibration_rms"][inside].std() > 3 * clean["vibration_rms"][inside].std()
    assert faulty["high_vibration"][inside].any()
    assert np.array_equal(faulty["high_vibration"], faulty["vibration_rms"] > HIGH_VIBRATION)


def test_bearing_wear_is_progressive() -> None:
    clean, faulty, _ = _pair("bearing_wear@10", 250)
    t = faulty["time"]
    early = (t >= 20) & (t < 60)
    late = (t >= 200) & (t < 250)
    assert _shift(clean, faulty, "vibration_rms", late) > 2 * _shift(clean, faulty, "vibration_rms", early) > 0
    assert _shift(clean, faulty, "bearing_temp", late) > 3 * _shift(clean, faulty, "bearing_temp", early)


def test_sensor_stuck_freezes_default_signal_at_last_value() -> None:
    clean, faulty, f = _pair("sensor_stuck@20+30", 80)
    inside, before = _windows(faulty, f, 0)
    stuck = faulty["discharge_pressure"][inside]
    assert np.all(stuck == faulty["discharge_pressure"][before][-1])
    assert clean["discharge_pressure"][inside].std() > 0.5 * SIGMA["discharge_pressure"]
    for s in SIGNALS:  # the process itself is untouched
        if s != "discharge_pressure":
            assert np.array_equal(clean[s], faulty[s]), s
    after = faulty["time"] >= f.start + 30
    assert np.array_equal(clean["discharge_pressure"][after], faulty["discharge_pressure"][after])


def test_sensor_stuck_on_chosen_signal() -> None:
    clean, faulty, f = _pair("sensor_stuck:bearing_temp@5+10", 30)
    inside, _ = _windows(faulty, f, 0)
    assert np.ptp(faulty["bearing_temp"][inside]) == 0
    assert np.array_equal(clean["discharge_pressure"], faulty["discharge_pressure"])


def test_sensor_spike_adds_short_large_spikes() -> None:
    clean, faulty, f = _pair("sensor_spike@20+60", 100)
    inside, _ = _windows(faulty, f, 0)
    diff = faulty["flow"] - clean["flow"]
    assert np.all(diff[~inside] == 0)
    spiky = np.abs(diff[inside]) > 10 * SIGMA["flow"]
    assert spiky.sum() >= 5  # several spikes ...
    assert spiky.mean() < 0.3  # ... that are short
    assert (diff[inside] > 0).any() and (diff[inside] < 0).any()
    for s in SIGNALS:
        if s != "flow":
            assert np.array_equal(clean[s], faulty[s]), s


def test_fault_reset_ends_active_faults() -> None:
    p = Plant(seed=1, faults=[parse_fault_spec("cavitation@1")])
    p.advance(100)
    assert p.state.fault_active and p.state.active_faults == ("cavitation",)
    p.reset_faults()
    assert not p.step().fault_active


# -- commands -------------------------------------------------------------------------------


def test_pump_run_false_stops_flow_and_current_and_restart_recovers() -> None:
    p = Plant(seed=5)
    p.advance(50)
    assert p.state.motor_running and p.state.flow > 30
    start = p.state.run_seconds
    p.pump_run = False
    stopped = [p.step() for _ in range(100)]  # 10 s
    assert not stopped[0].motor_running and stopped[0].motor_current == 0.0
    assert all(s.flow == 0.0 and s.motor_current == 0.0 for s in stopped[50:])
    assert all(s.vibration_rms < 0.6 for s in stopped[50:])
    assert stopped[-1].discharge_pressure < 2.2  # no head: discharge falls to tank pressure
    assert stopped[-1].run_seconds == start  # the counter stops with the motor
    p.pump_run = True
    running = [p.step() for _ in range(100)]
    assert running[-1].motor_running and running[-1].flow > 35 and running[-1].motor_current > 25


# -- fault specs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cavitation@30+60", FaultSpec("cavitation", 30.0, 60.0)),
        ("bearing_wear@120", FaultSpec("bearing_wear", 120.0, None)),
        (" inlet_valve_closing@1.5+2m ", FaultSpec("inlet_valve_closing", 1.5, 120.0)),
        ("sensor_stuck:flow@0+500ms", FaultSpec("sensor_stuck", 0.0, 0.5, "flow")),
        ("sensor_spike@1h", FaultSpec("sensor_spike", 3600.0, None)),
    ],
)
def test_parse_fault_spec_good(text: str, expected: FaultSpec) -> None:
    assert parse_fault_spec(text) == expected
    assert parse_fault_spec(str(expected)) == expected


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", "empty"),
        ("cavitation", "'@START'"),
        ("cavitaton@30", "'cavitaton'"),
        ("cavitation@soon", "'soon'"),
        ("cavitation@-5", "'-5'"),
        ("cavitation@30+", "duration ''"),
        ("cavitation@30+0", "must be > 0"),
        ("cavitation:flow@30", "takes no ':SIGNAL'"),
        ("sensor_stuck:pressure@30", "unknown signal 'pressure'"),
    ],
)
def test_parse_fault_spec_bad(text: str, names: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_fault_spec(text)
    msg = str(err.value)
    assert names in msg
    assert "known faults: " + ", ".join(FAULTS) in msg


def test_fault_registry_and_list() -> None:
    names = [n for n, _ in list_faults()]
    for required in ("cavitation", "bearing_wear", "inlet_valve_closing", "sensor_stuck", "sensor_spike"):
        assert required in names
    for name, (description, impl) in FAULTS.items():
        assert description and "\n" not in description and impl.name == name


def test_register_encoding_rounds_and_clips() -> None:
    state = dataclasses.replace(
        Plant(seed=0).state, suction_pressure=1.005, flow=-4000.0, vibration_rms=400.0, fluid_temp=float("nan")
    )
    scaled, run_seconds = encode_input(state)
    assert scaled[0] in (100, 101)  # 100.5 (float) rounds to nearest
    assert scaled[2] == (-32768) & 0xFFFF and scaled[4] == 32767 and scaled[6] == 0
    assert run_seconds == [7_654_321 & 0xFFFF, 7_654_321 >> 16]
    assert encode_holding(state)[4:6] == [0xC57A, 0x0000]  # -4000.0 as float32 ABCD


def test_options_validate() -> None:
    assert SimulatorOptions().ports == {"modbus": 5020}
    with pytest.raises(ValueError, match="no simulator for 'bacnet'; simulated protocols: modbus, opcua, s7"):
        SimulatorOptions(ports={"bacnet": 47808})
    with pytest.raises(ValueError, match=r"s7 port must be 0\.\.65535"):
        SimulatorOptions(ports={"s7": 70000})
    with pytest.raises(ValueError, match="tick"):
        SimulatorOptions(tick=0)
    with pytest.raises(ValueError, match="dt"):
        Plant(dt=-1)
