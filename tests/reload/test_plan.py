"""What a reload changes (reload.plan), what it refuses, and when the watch says the file changed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from edge_agent.config import Config, parse_config
from edge_agent.reload import ConfigWatch, file_state, plan
from edge_agent.scoring.monitor import LoadedModel, load_models

FIXTURES = Path(__file__).parents[1] / "fixtures"
I8, F32 = FIXTURES / "pump-i8.tflite", FIXTURES / "pump-f32.tflite"
PUMP_TAGS = "".join(
    f"      - {{name: pump.{n}, address: '{40001 + 2 * i}', type: float32}}\n"
    for i, n in enumerate(
        (
            "suction_pressure",
            "discharge_pressure",
            "flow",
            "motor_current",
            "vibration_rms",
            "bearing_temp",
            "fluid_temp",
            "valve_position",
        )
    )
)


def text(
    *,
    aux_tags: str = "      - {name: aux.a, address: '40101'}\n",
    aux_port: int = 1502,
    model: Path = I8,
    threshold: str = "auto",
    mqtt: str = "mqtt:\n  url: mqtt://127.0.0.1:1883\n  keepalive: 5s\n",
    outbox: str = "outbox: {path: /tmp/o.db}\n",
    extra: str = "",
) -> str:
    return (
        "agent: {id: a1}\n"
        "devices:\n"
        "  - name: pump\n    type: modbus\n    host: 127.0.0.1\n    port: 1502\n    poll_interval: 100ms\n"
        f"    tags:\n{PUMP_TAGS}"
        f"  - name: aux\n    type: modbus\n    host: 127.0.0.1\n    port: {aux_port}\n    tags:\n{aux_tags}"
        f"models:\n  - {{name: pump, file: {model}, threshold: {threshold}}}\n"
        f"{mqtt}{outbox}{extra}"
    )


def loaded(src: str) -> tuple[Config, list[LoadedModel]]:
    cfg = parse_config(src, source="agent.yaml")
    return cfg, load_models(cfg)


OLD = loaded(text())


def test_a_comment_changes_nothing() -> None:
    change = plan(*OLD, *loaded("# edited\n" + text()))
    assert change.describe() == "no changes" and not change.refused


def test_an_added_tag_restarts_its_device_only_and_its_other_tags_keep_their_history() -> None:
    change = plan(
        *OLD,
        *loaded(text(aux_tags="      - {name: aux.a, address: '40101'}\n      - {name: aux.b, address: '40103'}\n")),
    )
    assert change.devices_changed == ("aux",) and not change.devices_added and not change.devices_removed
    assert change.carry == {"aux": frozenset({"aux.a"})}
    assert change.models_stopped == frozenset() and not change.mqtt
    assert change.describe() == "devices restarted: aux"


def test_a_device_setting_restarts_it_without_history() -> None:
    change = plan(*OLD, *loaded(text(aux_port=1503)))
    assert change.devices_changed == ("aux",) and change.carry == {}


def test_a_changed_tag_definition_is_not_carried() -> None:
    change = plan(*OLD, *loaded(text(aux_tags="      - {name: aux.a, address: '40102'}\n")))
    assert change.devices_changed == ("aux",) and change.carry == {}


def test_devices_added_and_removed() -> None:
    two = text()
    one = two[: two.index("  - name: aux")] + two[two.index("models:") :]
    gone = plan(*OLD, *loaded(one))
    assert gone.devices_removed == ("aux",) and gone.devices_stopped == frozenset({"aux"})
    back = plan(*loaded(one), *OLD)
    assert back.devices_added == ("aux",) and back.devices_started == frozenset({"aux"})


def test_models_by_section_and_bundle_sha256(tmp_path: Path) -> None:
    assert plan(*OLD, *loaded(text(model=F32))).models_replaced == ("pump",)
    assert plan(*OLD, *loaded(text(threshold="2.0"))).models_replaced == ("pump",)
    copy = tmp_path / "pump.tflite"
    shutil.copy(I8, copy)
    at_copy = loaded(text(model=copy))
    assert plan(*OLD, *at_copy).models_replaced == ("pump",)  # another file: another section
    assert plan(*at_copy, *loaded(text(model=copy))).describe() == "no changes"
    shutil.copy(F32, copy)  # new bytes at the same path
    assert plan(*at_copy, *loaded(text(model=copy))).models_replaced == ("pump",)
    none = text().replace(f"models:\n  - {{name: pump, file: {I8}, threshold: auto}}\n", "")
    assert plan(*OLD, *loaded(none)).models_removed == ("pump",)
    assert plan(*loaded(none), *OLD).models_added == ("pump",)


def test_a_calibrated_model_is_the_same_model_while_its_configured_file_is() -> None:
    cfg, [m] = OLD
    calibrated = LoadedModel(m.section, load_models(loaded(text(model=F32))[0])[0].bundle, file_sha256=m.bundle.sha256)
    assert plan(cfg, [calibrated], *OLD).describe() == "no changes"


def test_mqtt_and_outbox_bounds_apply_live() -> None:
    change = plan(*OLD, *loaded(text(mqtt="mqtt:\n  url: mqtt://127.0.0.1:1884\n  keepalive: 5s\n")))
    assert change.mqtt and not change.outbox and not change.refused and change.describe() == "MQTT reconnects"
    change = plan(*OLD, *loaded(text(outbox="outbox: {path: /tmp/o.db, max_bytes: 2MB}\n")))
    assert change.outbox and not change.mqtt and not change.refused


@pytest.mark.parametrize(
    ("new", "where", "says"),
    [
        (text(outbox="outbox: {path: /tmp/other.db}\n"), "agent.yaml:28: outbox.path", "cannot move"),
        (text(mqtt=""), "agent.yaml:1", "removing the mqtt section"),
        (text().replace("agent: {id: a1}", "agent: {id: a2}"), "agent.yaml:1: agent", "restart"),
        (text(extra="observe: {listen: '127.0.0.1:9100'}\n"), "agent.yaml:29: observe", "restart"),
    ],
)
def test_what_a_running_agent_cannot_take_is_refused_with_its_line(new: str, where: str, says: str) -> None:
    [issue] = plan(*OLD, *loaded(new)).refused
    assert str(issue).startswith(where) and says in issue.message, str(issue)


def test_adding_mqtt_is_refused_at_its_line() -> None:
    [issue] = plan(*loaded(text(mqtt="")), *OLD).refused
    assert str(issue).startswith("agent.yaml:25: mqtt") and "adding the mqtt section" in issue.message


# ---------------------------------------------------------------- the watch


def test_the_watch_sees_new_bytes_not_a_touch(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("a: 1\n")
    watch = ConfigWatch(path)
    assert not watch.look([])  # the first look only records
    os.utime(path, ns=(1, 1))
    assert not watch.look([])  # same bytes, other mtime
    path.write_text("a: 2\n")
    os.utime(path, ns=(1, 1))  # an edit that keeps mtime and size is still seen
    assert watch.look([]) and not watch.look([])
    path.unlink()
    assert watch.look([]) and watch.sha256 == ""
    path.write_text("a: 2\n")
    assert watch.look([])


def test_the_watch_follows_a_configmap_symlink_swap(tmp_path: Path) -> None:
    """kubelet writes a new timestamped directory and renames the ..data symlink onto it; the file's path stays."""
    for version, content in (("..v1", "a: 1\n"), ("..v2", "a: 2\n")):
        (tmp_path / version).mkdir()
        (tmp_path / version / "agent.yaml").write_text(content)
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "agent.yaml").symlink_to("..data/agent.yaml")
    watch = ConfigWatch(tmp_path / "agent.yaml")
    watch.look([])
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert watch.look([]) and watch.sha256 == file_state(tmp_path / "..v2" / "agent.yaml", digest=True).sha256  # type: ignore[union-attr]


def test_the_watch_sees_a_bundle_replaced_and_forgets_what_a_reload_loaded(tmp_path: Path) -> None:
    config, bundle = tmp_path / "agent.yaml", tmp_path / "pump.tflite"
    config.write_text("a: 1\n")
    shutil.copy(I8, bundle)
    watch = ConfigWatch(config)
    watch.look([bundle])
    shutil.copy(F32, bundle)
    assert watch.look([bundle])
    other = tmp_path / "other.tflite"
    shutil.copy(I8, other)
    watch.loaded({other: file_state(other)})  # a reload applied a config naming another bundle
    assert not watch.look([other])
