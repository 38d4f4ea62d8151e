"""Config loading: golden cases, ${ENV}, overrides, secrets, units."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.config import parse_config
from edge_agent.errors import ConfigError
from edge_agent.fields import parse_duration, parse_size

TESTS = Path(__file__).resolve().parents[1]
# the config language's cases in tests/config/testcases/*/ and each driver's own in tests/drivers/*/testcases/*/
CASES = sorted(p.parent for p in TESTS.glob("**/testcases/*/config.yaml"))


@pytest.mark.parametrize("case", CASES, ids=[c.relative_to(TESTS).as_posix() for c in CASES])
def test_golden_check_output(case: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`edge-agent check` prints exactly the expected lines and exit code for each case."""
    monkeypatch.chdir(case)
    for var in ("PLC_HOST_THAT_IS_NOT_SET", "PLC_PORT"):
        monkeypatch.delenv(var, raising=False)
    code = main(["check", "config.yaml"])
    captured = capsys.readouterr()
    expected = (case / "expected.txt").read_text().splitlines()
    assert f"exit: {code}" == expected[0]
    got = (captured.out + captured.err).splitlines()
    assert len(got) == len(expected) - 1, got
    for line, want in zip(got, expected[1:], strict=True):
        # a line ending in … matches by prefix (libyaml and pure-Python YAML word syntax errors differently)
        assert line.startswith(want[:-1]) if want.endswith("…") else line == want


BASE = """
devices:
  - name: plc
    type: modbus
    host: ${HOST:-127.0.0.1}
    port: ${PORT}
    tags:
      - {name: a, address: "40001"}
"""


def test_env_substitution_and_defaults() -> None:
    cfg = parse_config(BASE, environ={"PORT": "1502"})
    assert cfg.devices[0].host == "127.0.0.1"
    assert cfg.devices[0].port == 1502
    cfg = parse_config(BASE, environ={"PORT": "1502", "HOST": "plc.local"})
    assert cfg.devices[0].host == "plc.local"


def test_dollar_dollar_escapes() -> None:
    cfg = parse_config(BASE + "agent: {site: 'a$${B}'}\n", environ={"PORT": "1"})
    assert cfg.agent.site == "a${B}"


def test_env_overrides_scalars_outside_lists() -> None:
    env = {
        "PORT": "1",
        "EDGE_AGENT__MQTT__URL": "mqtt://broker:1884",
        "EDGE_AGENT__AGENT__ID": "line-7",
        "EDGE_AGENT__OUTBOX__MAX_BYTES": "64MiB",
        "EDGE_AGENT__MQTT__QOS": "0",
    }
    cfg = parse_config(BASE, environ=env)
    assert cfg.mqtt is not None and cfg.mqtt.url == "mqtt://broker:1884" and cfg.mqtt.qos == 0
    assert cfg.agent.id == "line-7"
    assert cfg.outbox.max_bytes == 64 * 1024**2


@pytest.mark.parametrize("password", ["123456", "yes", "0x1F", "2024-01-01", "pa ss #x", "'q'", "null"])
def test_env_overrides_of_text_fields_stay_text(password: str) -> None:
    """A password of digits, a site named 42: text fields take the variable as it is, never read as YAML."""
    env = {
        "PORT": "1",
        "EDGE_AGENT__MQTT__PASSWORD": password,
        "EDGE_AGENT__MQTT__USERNAME": "true",
        "EDGE_AGENT__AGENT__SITE": "42",
        "EDGE_AGENT__MQTT__PROTOCOL": "5",
        "EDGE_AGENT__MQTT__SCORES_QOS": "2",
    }
    cfg = parse_config(BASE, environ=env)
    assert cfg.mqtt is not None and cfg.mqtt.password is not None
    assert cfg.mqtt.password.get_secret_value() == password
    assert cfg.mqtt.username == "true" and cfg.agent.site == "42"
    assert cfg.mqtt.protocol == "5" and cfg.mqtt.scores_qos == 2


def test_a_whole_value_reference_reads_as_the_file_would() -> None:
    """`qos: ${QOS}` with QOS=1 is `qos: 1`; a text field keeps digits as text."""
    text = """
devices:
  - name: plc
    type: modbus
    transport: rtu
    serial: {port: /dev/ttyS0, stopbits: '${SB}'}
    tags:
      - {name: a, address: "40001"}
mqtt: {qos: '${Q}', username: '${U}'}
"""
    cfg = parse_config(text, environ={"SB": "2", "Q": "0", "U": "0042"})
    assert cfg.devices[0].serial is not None and cfg.devices[0].serial.stopbits == 2  # type: ignore[attr-defined]
    assert cfg.mqtt is not None and cfg.mqtt.qos == 0 and cfg.mqtt.username == "0042"
    with pytest.raises(ConfigError, match=r"mqtt.qos: 'x' is not allowed"):
        parse_config(text, environ={"SB": "2", "Q": "x", "U": "u"})


def test_checks_across_items_run_even_when_other_fields_are_invalid() -> None:
    """One run reports a duplicate tag name and an overlap next to a bad duration elsewhere."""
    text = BASE.replace(
        '      - {name: a, address: "40001"}\n',
        '      - {name: a, address: "40001", type: float32}\n'
        '      - {name: a, address: "40010"}\n'
        '      - {name: b, address: "40002"}\n',
    )
    text += "mqtt: {keepalive: soon}\nmodels: [{name: m, file: x.tflite, inputs: [a, nope]}]\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, environ={"PORT": "1"}, source="c.yaml")
    lines = [str(i) for i in err.value.issues]
    assert any("tags[1].name: tag name 'a' is already used" in ln for ln in lines), lines
    assert any("tags[2]" in ln and "overlaps" in ln for ln in lines), lines
    assert any("mqtt.keepalive" in ln for ln in lines), lines
    assert any("models[0].inputs[1]: no tag named 'nope'" in ln for ln in lines), lines


def test_mqtt_files_are_found_next_to_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.config import load_config

    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pw").write_text("s3cr3t\n")
    (tmp_path / "c.yaml").write_text(
        BASE + "mqtt: {url: 'mqtts://b:8883', password_file: secrets/pw, tls: {ca: pki/ca.pem}}\n"
    )
    monkeypatch.chdir("/")
    cfg = load_config(tmp_path / "c.yaml", environ={"PORT": "1"})
    assert cfg.mqtt is not None and cfg.mqtt.password is not None and cfg.mqtt.tls is not None
    assert cfg.mqtt.password.get_secret_value() == "s3cr3t"
    assert cfg.mqtt.tls.ca == tmp_path / "pki" / "ca.pem"


def test_env_override_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            BASE, environ={"PORT": "1", "EDGE_AGENT__MQTT__URL": "http://x", "EDGE_AGENT__DEVICES__0__HOST": "x"}
        )
    text = str(err.value)
    assert "env EDGE_AGENT__MQTT__URL: mqtt.url: 'http://x' is not a broker URL" in text
    assert "env EDGE_AGENT__DEVICES__0__HOST" in text and "not lists" in text


def test_password_file_is_read_and_never_printed(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cr3t\n")
    cfg = parse_config(BASE + f"mqtt: {{password_file: {secret}}}\n", environ={"PORT": "1"})
    assert cfg.mqtt is not None and cfg.mqtt.password is not None
    assert cfg.mqtt.password.get_secret_value() == "s3cr3t"
    assert "s3cr3t" not in repr(cfg) and "s3cr3t" not in str(cfg.model_dump())


def test_missing_password_file_points_at_its_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(BASE + "mqtt:\n  password_file: /nonexistent/pw\n", environ={"PORT": "1"}, source="c.yaml")
    assert "c.yaml:10: mqtt.password_file: cannot read the secret" in str(err.value)


def test_all_errors_at_once_in_file_order() -> None:
    text = BASE.replace('"40001"', '"40001", type: nope') + "observe: {lisen: x}\nagent: {id: 'a b'}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, environ={"PORT": "x"}, source="c.yaml")
    lines = [str(i) for i in err.value.issues]
    assert [ln.split(":")[1] for ln in lines] == sorted((ln.split(":")[1] for ln in lines), key=int)
    assert len(lines) == 4


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("1s", 1), ("5m", 300), ("1h", 3600), ("2d", 172800), (3, 3.0), ("1.5s", 1.5)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MiB", 512 * 1024**2), ("10MB", 10**7), ("4096", None), (4096, 4096), ("1GiB", 1024**3), ("64KiB", 65536)],
)
def test_sizes(text: str | int, size: int | None) -> None:
    if size is None:
        with pytest.raises(ValueError):
            parse_size(text)
    else:
        assert parse_size(text) == size


def test_leading_zero_addresses_stay_text() -> None:
    cfg = parse_config(BASE.replace('"40001"', "00012"), environ={"PORT": "1"})
    tag = cfg.devices[0].tags[0]
    assert str(tag.address) == "00012" and tag.address.index == 11


@pytest.mark.parametrize(
    "device",
    [
        '{name: plc, type: [modbus], host: "${H}", tags: [{name: a, address: "40001"}]}',
        '{name: plc, type: {x: 1}, port: "${P}", tags: [{name: a, address: "40001"}]}',
        '{name: plc, type: modbus, host: h, tags: [{name: a, address: "40001", type: [x], scale: "${S:-2}"}]}',
        '{name: plc, type: modbus, host: h, tags: [{name: a, address: "40001", type: s7, scale: "${S:-2}"}]}',
    ],
)
def test_malformed_types_next_to_env_references_are_reported_not_raised(device: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(f"devices:\n  - {device}\n", environ={"H": "h", "P": "502"}, source="c.yaml")
    assert all(str(i).startswith("c.yaml:") for i in err.value.issues), err.value.issues
