"""Security modes, user identities and server trust against a real asyncua server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.common.utils import ServiceError
from cryptography import x509
from opcua_peer import NS, PASSWORD, USER, Pki, UaPeer, device_yaml

from edge_agent.config import parse_config
from edge_agent.drivers.opcua import OpcUaDriver
from edge_agent.errors import DeviceError
from edge_agent.types import Quality

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

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
    extra = f"auth: {{username: {USER}, password_file: {tmp_path / 'missing'}}}"
    message = await connect_error(device_yaml(ua_peer.url, TAGS, extra=extra))
    assert message.startswith("device ua: auth.password_file: cannot read the secret ")
    assert message.endswith("No such file or directory")


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


async def test_server_that_does_not_trust_the_agent(ua_peer: UaPeer, pki: Pki) -> None:
    assert ua_peer.server is not None

    async def refuse(cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

    iserver = ua_peer.server.iserver
    iserver.certificate_validator = refuse
    try:
        message = await connect_error(device_yaml(ua_peer.url, TAGS, extra=security(pki, "SignAndEncrypt")))
    finally:
        iserver.certificate_validator = None
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
