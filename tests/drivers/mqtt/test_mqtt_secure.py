"""The MQTT input driver against mosquitto with TLS (verified by default) and with passwords (password_file)."""

from __future__ import annotations

import importlib.util
import logging
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import Broker, wait_for
from mqttin_peer import device_yaml, running
from test_mqtt_json import Publisher

from edge_agent.config import load_config
from edge_agent.drivers import REGISTRY
from edge_agent.errors import DeviceError


def _publish_peer() -> Any:
    # the publisher's tests already make certificates and password files: loaded by path, not copied
    path = Path(__file__).parents[2] / "publish" / "mqttpeer.py"
    spec = importlib.util.spec_from_file_location("publish_mqttpeer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


PEER = _publish_peer()
TAGS = "    tags:\n      - {name: flow, topic: plant/flow, path: $.v}\n"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return dict(PEER.make_certs(tmp_path_factory.mktemp("certs")))


async def test_tls_verified_with_the_configured_ca(tmp_path: Path, certs: dict[str, Path]) -> None:
    broker = Broker(tmp_path / "broker", tls=(certs["ca"], certs["server"], certs["server.key"]))
    broker.start()
    client_tls = ssl.create_default_context(cafile=str(certs["ca"]))
    pub = Publisher(broker.port, tls=client_tls)
    try:
        cfg = device_yaml(broker.url, f"    tls: {{ca: {certs['ca']}}}\n" + TAGS)
        async with running(cfg) as (_, got):
            pub.send("plant/flow", {"v": 2.5})
            await wait_for(got.has("flow", 2.5), timeout=5, what="a value over TLS")
    finally:
        pub.close()
        broker.kill()


async def test_a_certificate_for_another_name_is_refused(tmp_path: Path, certs: dict[str, Path]) -> None:
    """Verification is on by default: a broker certificate that names another host is not accepted."""
    broker = Broker(tmp_path / "broker", tls=(certs["ca"], certs["wrongname"], certs["wrongname.key"]))
    broker.start()
    try:
        device = load_config_text(tmp_path, device_yaml(broker.url, f"    tls: {{ca: {certs['ca']}}}\n" + TAGS))
        driver = REGISTRY["mqtt"].build(device)
        with pytest.raises(DeviceError, match="TLS certificate does not verify"):
            await driver.connect()
        await driver.close()
    finally:
        broker.kill()


def load_config_text(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path).devices[0]


async def test_password_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The password comes from password_file; a wrong one is refused with a clear error, never logged."""
    caplog.set_level(logging.DEBUG)
    pwfile = tmp_path / "passwords"
    PEER.write_password_file(pwfile, {"agent": "s3cret-right", "plc": "p"})
    broker = Broker(tmp_path / "broker", password_file=pwfile)
    broker.start()
    secret = tmp_path / "secret.txt"
    pub = Publisher(broker.port, user=("plc", "p"))
    try:
        secret.write_text("s3cret-wrong\n")
        body = f"    username: agent\n    password_file: {secret}\n" + TAGS
        driver = REGISTRY["mqtt"].build(load_config_text(tmp_path, device_yaml(broker.url, body)))
        with pytest.raises(DeviceError, match="refused the connection"):
            await driver.connect()
        await driver.close()
        secret.write_text("s3cret-right\n")
        async with running(device_yaml(broker.url, body)) as (_, got):
            pub.send("plant/flow", {"v": 1.0})
            await wait_for(got.has("flow", 1.0), timeout=5)
        assert "s3cret" not in caplog.text
    finally:
        pub.close()
        broker.kill()
