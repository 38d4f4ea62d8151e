"""Security modes, user identities and server trust against a real asyncua server."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE

import pytest
from asyncua import ua
from asyncua.common.utils import ServiceError
from cryptography import x509
from opcua_peer import NS, PASSWORD, USER, Pki, UaPeer, device_yaml

from edge_agent.cli import RedactSecrets
from edge_agent.cli import _setup_logging as setup_logging
from edge_agent.config import load_config, parse_config
from edge_agent.drivers.opcua.config import OpcUaDevice
from edge_agent.drivers.opcua.driver import OpcUaDriver
from edge_agent.errors import ConfigError, DeviceError
from edge_agent.types import Quality

pytestmark = pytest.mark.asyncio(loop_scope="session")

TAGS = [("s.double", f"nsu={NS};s=Double")]


def security(pki: Pki, mode: str, trust: Path | None = None, **extra: str) -> str:
    lines = [
        "security:",
        "  policy: Basic256Sha256",
        f"  mode: {mode}",
        f"  certificate: {pki.client_cert}",
        f"  private_key: {pki.client_key}",
        f"  trust_dir: {trust or pki.trusted}",
    ]
    lines += [f"  {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines)


async def read_value(text: str) -> tuple[object, Quality]:
    driver = OpcUaDriver(parse_config(text).devices[0])  # type: ignore[arg-type]
    await driver.connect()
    try:
        sample = next((await driver.read(driver.groups[0])).samples())
        return sample.value, sample.quality
    finally:
        await driver.close()


async def connect_error(text: str) -> str:
    driver = OpcUaDriver(parse_config(text).devices[0])  # type: ignore[arg-type]
    with pytest.raises(DeviceError) as err:
        await driver.connect()
    await driver.close()
    return str(err.value)


@pytest.mark.parametrize("mode", ["Sign", "SignAndEncrypt"])
async def test_basic256sha256_modes(ua_peer: UaPeer, pki: Pki, mode: str) -> None:
    assert await read_value(device_yaml(ua_peer.url, TAGS, extra=security(pki, mode))) == (-273.15, Quality.GOOD)
    assert ua_peer.users.last == "anonymous"


async def test_username_and_password(ua_peer: UaPeer, pki: Pki, tmp_path: Path) -> None:
    auth = f"auth: {{username: {USER}, password: {PASSWORD}}}"
    assert (await read_value(device_yaml(ua_peer.url, TAGS, extra=auth)))[1] is Quality.GOOD  # policy None
    assert ua_peer.users.last == USER
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    extra = security(pki, "SignAndEncrypt") + f"\nauth: {{username: {USER}, password_file: {secret}}}"
    assert (await read_value(device_yaml(ua_peer.url, TAGS, extra=extra)))[1] is Quality.GOOD
    assert ua_peer.users.last == USER


async def test_wrong_password_is_refused_with_a_hint(ua_peer: UaPeer, pki: Pki) -> None:
    extra = security(pki, "Sign") + f"\nauth: {{username: {USER}, password: wrong}}"
    message = await connect_error(device_yaml(ua_peer.url, TAGS, extra=extra))
    assert message == (
        f"device ua: the server refused user '{USER}' (BadUserAccessDenied): check auth.username and the password"
    )
    assert "wrong" not in message


async def test_unreadable_password_file_names_the_field(ua_peer: UaPeer, tmp_path: Path) -> None:
    secret = tmp_path / "password"
    text = device_yaml(ua_peer.url, TAGS, extra=f"auth: {{username: {USER}, password_file: {secret}}}")
    with pytest.raises(ConfigError) as err:  # found by `edge-agent check`, before any connect
        parse_config(text, source="c.yaml")
    assert str(err.value) == (
        f"c.yaml:9: devices[0].auth.password_file: cannot read the secret {secret}: No such file or directory"
    )
    secret.write_text(PASSWORD)
    driver = OpcUaDriver(parse_config(text).devices[0])  # type: ignore[arg-type]
    secret.unlink()  # gone after loading: the secret is read again at every connect
    with pytest.raises(DeviceError) as failed:
        await driver.connect()
    await driver.close()
    assert str(failed.value) == (
        f"device ua: auth.password_file: cannot read the secret {secret}: No such file or directory"
    )


@pytest.fixture
def cli_logging(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The agent's own logging setup at --log-level debug, undone afterwards (the other tests keep asyncua quiet)."""
    names = ("asyncua", "asyncua.client.ua_client", "snap7", "pymodbus")
    saved = {n: logging.getLogger(n).level for n in names}
    caplog.set_level(logging.DEBUG)
    setup_logging("debug")  # adds its filter to the handlers on the root logger: caplog's among them
    try:
        yield caplog
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        for handler in logging.getLogger().handlers:
            for f in [f for f in handler.filters if isinstance(f, RedactSecrets)]:
                handler.removeFilter(f)


async def test_password_never_reaches_the_log_at_debug(
    ua_peer: UaPeer, pki: Pki, cli_logging: pytest.LogCaptureFixture
) -> None:
    auth = f"auth: {{username: {USER}, password: {PASSWORD}}}"
    for extra in (auth, security(pki, "SignAndEncrypt") + "\n" + auth):
        assert (await read_value(device_yaml(ua_peer.url, TAGS, extra=extra)))[1] is Quality.GOOD
        assert ua_peer.users.last == USER
    records = cli_logging.records
    assert any(r.name.startswith("asyncua") and r.levelno == logging.DEBUG for r in records)  # asyncua did talk
    assert not any(r.name.startswith("asyncua.client.ua_client") and r.levelno < logging.INFO for r in records)
    assert not any(PASSWORD in r.getMessage() for r in records) and PASSWORD not in cli_logging.text
    # the last guard: with asyncua's dump of every request switched on anyway, the token's password is blanked
    # (over SignAndEncrypt the token holds the password in clear: the channel encrypts it)
    cli_logging.clear()
    logging.getLogger("asyncua.client.ua_client").setLevel(logging.DEBUG)
    extra = security(pki, "SignAndEncrypt") + "\n" + auth
    assert (await read_value(device_yaml(ua_peer.url, TAGS, extra=extra)))[1] is Quality.GOOD
    messages = [r.getMessage() for r in cli_logging.records]
    assert any("ActivateSessionRequest" in m and "Password='***'" in m for m in messages)
    assert not any(PASSWORD in m for m in messages) and PASSWORD not in cli_logging.text


async def test_password_over_policy_none_warns_once(
    ua_peer: UaPeer, pki: Pki, caplog_opcua: pytest.LogCaptureFixture
) -> None:
    auth = f"auth: {{username: {USER}, password: {PASSWORD}}}"
    for extra in (auth, security(pki, "SignAndEncrypt") + "\n" + auth):
        driver = OpcUaDriver(parse_config(device_yaml(ua_peer.url, TAGS, extra=extra)).devices[0])  # type: ignore[arg-type]
        try:
            await driver.connect()
            await driver.connect()  # a reconnect says nothing new
        finally:
            await driver.close()
    warned = [r.getMessage() for r in caplog_opcua.records if "policy None" in r.getMessage()]
    assert warned == [
        f"device ua: user '{USER}' logs in over security policy None: the password goes to a server whose "
        "certificate nobody checked; use policy Basic256Sha256 with a trust_dir"
    ]


async def test_certificate_identity(ua_peer: UaPeer, pki: Pki) -> None:
    ua_peer.users.allow_anonymous = False
    try:
        extra = (
            security(pki, "SignAndEncrypt") + f"\nauth: {{certificate: {pki.user_cert}, private_key: {pki.user_key}}}"
        )
        assert (await read_value(device_yaml(ua_peer.url, TAGS, extra=extra)))[1] is Quality.GOOD
        assert ua_peer.users.last == "certificate"
        ua_peer.users.last = ""
        extra = f"auth: {{certificate: {pki.user_cert}, private_key: {pki.user_key}}}"  # over policy None
        assert (await read_value(device_yaml(ua_peer.url, TAGS, extra=extra)))[1] is Quality.GOOD
        assert ua_peer.users.last == "certificate"
        # the agent's own certificate is not a registered user
        extra = security(pki, "Sign") + f"\nauth: {{certificate: {pki.client_cert}, private_key: {pki.client_key}}}"
        message = await connect_error(device_yaml(ua_peer.url, TAGS, extra=extra))
        assert "the server refused the user certificate" in message and "register it as a user" in message
        message = await connect_error(device_yaml(ua_peer.url, TAGS))
        assert "the server refused an anonymous session (BadUserAccessDenied)" in message
    finally:
        ua_peer.users.allow_anonymous = True


async def test_untrusted_server_is_refused_and_its_certificate_saved(ua_peer: UaPeer, pki: Pki, tmp_path: Path) -> None:
    trust = tmp_path / "pki" / "trusted"
    trust.mkdir(parents=True)
    text = device_yaml(ua_peer.url, TAGS, extra=security(pki, "SignAndEncrypt", trust))
    message = await connect_error(text)
    rejected = list((tmp_path / "pki" / "rejected").iterdir())
    assert len(rejected) == 1 and rejected[0].suffix == ".der"
    assert message.startswith(
        "device ua: the server certificate 'server@test' (urn:edge-agent:test:server), thumbprint "
    )
    assert f"is not trusted: it is not in the trust folder {trust}; it was saved as {rejected[0]}" in message
    assert message.endswith(f"if it is the right server, copy that file into {trust}")
    # doing what the message says is enough, without restarting anything
    shutil.copy(rejected[0], trust)
    assert (await read_value(text))[1] is Quality.GOOD


async def refused_by_the_server(ua_peer: UaPeer, pki: Pki, status: int) -> str:
    """The agent's connect error when the server's certificate check answers `status`."""
    assert ua_peer.server is not None

    async def refuse(cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        raise ServiceError(status)

    iserver = ua_peer.server.iserver
    iserver.certificate_validator = refuse
    try:
        return await connect_error(device_yaml(ua_peer.url, TAGS, extra=security(pki, "SignAndEncrypt")))
    finally:
        iserver.certificate_validator = None


async def test_server_that_does_not_trust_the_agent(ua_peer: UaPeer, pki: Pki) -> None:
    message = await refused_by_the_server(ua_peer, pki, ua.StatusCodes.BadCertificateUntrusted)
    assert f"the server refused this agent's certificate {pki.client_cert}" in message
    assert "trust it on the server" in message


async def test_missing_endpoint_lists_what_the_server_offers(ua_peer: UaPeer, pki: Pki) -> None:
    assert ua_peer.server is not None
    iserver = ua_peer.server.iserver
    saved = list(iserver.endpoints)
    iserver.endpoints = [e for e in saved if e.SecurityMode != ua.MessageSecurityMode.Sign]
    try:
        message = await connect_error(device_yaml(ua_peer.url, TAGS, extra=security(pki, "Sign")))
    finally:
        iserver.endpoints = saved
    assert message == (
        "device ua: security: the server offers no Basic256Sha256 Sign endpoint; "
        "it offers Basic256Sha256 SignAndEncrypt, None None"
    )


async def test_application_uri_must_be_the_certificates(ua_peer: UaPeer, pki: Pki) -> None:
    text = device_yaml(ua_peer.url, TAGS, extra=security(pki, "SignAndEncrypt", application_uri="urn:line3:agent"))
    with pytest.raises(ConfigError) as err:
        parse_config(text, source="c.yaml")
    assert str(err.value) == (
        "c.yaml:15: devices[0].security.application_uri: 'urn:line3:agent' is not the application URI in the "
        f"certificate {pki.client_cert} ('urn:test:edge-agent'), and servers refuse a mismatch: leave "
        "application_uri out to use the certificate's, or make a matching pair with edge-agent opcua gen-cert "
        "--application-uri urn:line3:agent --cert … --key …"
    )
    good = parse_config(text.replace("urn:line3:agent", "urn:test:edge-agent")).devices[0]
    assert isinstance(good, OpcUaDevice)
    assert (await read_value(text.replace("urn:line3:agent", "urn:test:edge-agent")))[1] is Quality.GOOD
    # checked again at connect: the certificate file may have been replaced since the config was loaded
    moved = good.model_copy(update={"security": good.security.model_copy(update={"application_uri": "urn:x:y"})})
    driver = OpcUaDriver(moved)
    with pytest.raises(DeviceError, match=r"security\.application_uri: 'urn:x:y' is not .* \('urn:test:edge-agent'\)"):
        await driver.connect()
    await driver.close()


async def test_server_that_finds_the_uri_wrong_gets_the_uri_hint(ua_peer: UaPeer, pki: Pki) -> None:
    message = await refused_by_the_server(ua_peer, pki, ua.StatusCodes.BadCertificateUriInvalid)
    assert message == (
        f"device ua: the server refused this agent's certificate {pki.client_cert} (BadCertificateUriInvalid): it "
        "finds the application URI in it wrong (some servers want the host name in it too): make a pair with "
        "edge-agent opcua gen-cert --application-uri … --hostname …"
    )


async def test_gen_cert_pair_with_paths_relative_to_the_config(
    ua_peer: UaPeer, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    (site / "pki" / "trusted").mkdir(parents=True)
    shutil.copy(pki.trusted / "test-server.der", site / "pki" / "trusted")
    (site / "secrets").mkdir()
    (site / "secrets" / "opcua_password").write_text(PASSWORD + "\n")
    cert, key = "pki/own/agent.der", "pki/own/agent-key.pem"
    args = ["opcua", "gen-cert", "--cert", cert, "--key", key, "--application-uri", "urn:line3:edge-agent"]
    made = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge_agent", *args, "--hostname", "localhost", cwd=site, stdout=PIPE, stderr=PIPE
    )
    async with asyncio.timeout(120):
        out, err = await made.communicate()
    assert made.returncode == 0, err.decode()
    assert "application URI urn:line3:edge-agent" in out.decode()
    extra = "\n".join(
        [
            "security:",
            "  policy: Basic256Sha256",
            "  mode: SignAndEncrypt",
            f"  certificate: {cert}",
            f"  private_key: {key}",
            "  trust_dir: pki/trusted",
            "  application_uri: urn:line3:edge-agent",
            f"auth: {{username: {USER}, password_file: secrets/opcua_password}}",
        ]
    )
    (site / "config.yaml").write_text(device_yaml(ua_peer.url, TAGS, extra=extra))
    monkeypatch.chdir(tmp_path)  # not the config's folder: the paths are the config file's
    device = load_config(site / "config.yaml").devices[0]
    assert isinstance(device, OpcUaDevice) and device.security.certificate == site / cert
    driver = OpcUaDriver(device)
    await driver.connect()
    try:
        sample = next((await driver.read(driver.groups[0])).samples())
        assert (sample.value, sample.quality) == (-273.15, Quality.GOOD)
        assert ua_peer.users.last == USER
    finally:
        await driver.close()
