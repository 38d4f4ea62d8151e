"""Certificate generation, the trust folder, and config models that need no server."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from edge_agent.config import load_config, parse_config
from edge_agent.drivers.opcua.certs import (
    CertPurpose,
    TrustFolder,
    application_uri_of,
    generate_certificate,
    load_certificate,
    load_private_key,
)
from edge_agent.drivers.opcua.config import Mode, OpcUaDevice, Timestamps
from edge_agent.drivers.opcua.driver import OpcUaDriver
from edge_agent.errors import ConfigError


def test_generated_pair_matches_what_the_client_announces(tmp_path: Path) -> None:
    info = generate_certificate(
        tmp_path / "own" / "agent.der",
        tmp_path / "own" / "agent-key.pem",
        application_uri="urn:line3:edge-agent",
        hostname="line3",
    )
    cert = load_certificate(info.cert_path)
    assert application_uri_of(cert) == "urn:line3:edge-agent" == info.application_uri
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["line3"]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.content_commitment and usage.key_encipherment and usage.data_encipherment
    assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert info.not_after - dt.datetime.now(dt.UTC) > dt.timedelta(days=700)
    assert stat.S_IMODE(info.key_path.stat().st_mode) == 0o600
    assert load_private_key(info.key_path).public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    with pytest.raises(FileExistsError, match="exists"):
        generate_certificate(info.cert_path, info.key_path, application_uri="urn:x:y", hostname="x")


def test_server_purpose_pem_and_ip_address(tmp_path: Path) -> None:
    info = generate_certificate(
        tmp_path / "s.pem",
        tmp_path / "s.key",
        application_uri="urn:x:server",
        hostname="10.0.0.5",
        purpose=CertPurpose.SERVER,
    )
    assert info.cert_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    cert = load_certificate(info.cert_path)
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    with pytest.raises(ValueError, match="is not a URI"):
        generate_certificate(tmp_path / "b.der", tmp_path / "b.pem", application_uri="edge agent", hostname="x")


def test_trust_folder(tmp_path: Path) -> None:
    server = load_certificate(
        generate_certificate(
            tmp_path / "srv.der", tmp_path / "srv.pem", application_uri="urn:a:b", hostname="a"
        ).cert_path
    )
    folder = TrustFolder(tmp_path / "pki" / "trusted")
    folder.trust_dir.mkdir(parents=True)
    (folder.trust_dir / "junk.der").write_bytes(b"not a certificate")  # ignored, not fatal
    assert folder.verdict(server) == f"it is not in the trust folder {folder.trust_dir}"
    saved = folder.reject(server)
    assert saved is not None and saved.parent == tmp_path / "pki" / "rejected"
    saved.rename(folder.trust_dir / saved.name)
    assert folder.verdict(server) is None
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=800)
    assert (folder.verdict(server, now=later) or "").startswith("it expired on ")


SUBSCRIBE = """
devices:
  - name: press
    type: opcua
    endpoint: "opc.tcp://[fe80::1]:4841/press"
    mode: subscribe
    timestamps: server
    poll_interval: 250ms
    auth: {certificate: user.der, private_key: user.pem}
    tags:
      - {name: force, node: "nsu=urn:acme:press;s=Force", deadband: {type: percent, value: 2}, queue_size: 4}
      - {name: stroke, node: "ns=3;i=12", poll_interval: 1s}
"""


def test_subscribe_device_groups_by_sampling_interval(tmp_path: Path) -> None:
    generate_certificate(tmp_path / "user.der", tmp_path / "user.pem", application_uri="urn:a:user", hostname="a")
    dev = parse_config(SUBSCRIBE, base_dir=tmp_path).devices[0]
    assert isinstance(dev, OpcUaDevice) and dev.mode is Mode.SUBSCRIBE and dev.timestamps is Timestamps.SERVER
    driver = OpcUaDriver(dev)
    assert driver.groups == [] and [(g.interval, g.tags) for g in driver.subscriptions] == [
        (0.25, ("force",)),
        (1.0, ("stroke",)),
    ]
    assert driver.requests_per_cycle == {}


def test_password_is_never_printed() -> None:
    dev = parse_config(
        SUBSCRIBE.replace(
            "auth: {certificate: user.der, private_key: user.pem}", "auth: {username: op, password: hunter2}"
        )
    ).devices[0]
    assert "hunter2" not in repr(dev) and "hunter2" not in str(dev.model_dump())


FILES = """\
devices:
  - name: press
    type: opcua
    endpoint: "opc.tcp://plc:4840"
    security:
      policy: Basic256Sha256
      certificate: own/a.der
      private_key: own/b-key.pem
      trust_dir: own/a.der
    auth: {username: op, password_file: secrets/missing}
    tags: [{name: a, node: "i=2258"}]
  - name: oven
    type: opcua
    endpoint: "opc.tcp://plc:4840"
    security:
      policy: Basic256Sha256
      certificate: own/junk.der
      private_key: own/a-key.pem
      trust_dir: /nonexistent/trusted
      application_uri: urn:a:agent
    auth: {certificate: own/a.der, private_key: /nonexistent/user.pem}
    tags: [{name: b, node: "i=2258"}]
  - name: kiln
    type: opcua
    endpoint: "opc.tcp://plc:4840"
    security:
      policy: Basic256Sha256
      certificate: own/a.der
      private_key: own/a-key.pem
      trust_dir: trusted
      application_uri: urn:elsewhere:edge-agent
    tags: [{name: c, node: "i=2258"}]
"""


def test_unusable_files_are_config_errors_at_their_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    for name in ("a", "b"):
        generate_certificate(
            site / "own" / f"{name}.der", site / "own" / f"{name}-key.pem", application_uri="urn:a:agent", hostname="a"
        )
    (site / "own" / "junk.der").write_bytes(b"not a certificate")
    (site / "trusted").mkdir()
    config = site / "config.yaml"
    config.write_text(FILES)
    monkeypatch.chdir(tmp_path)  # relative paths are the config file's, not the working directory's
    with pytest.raises(ConfigError) as err:
        load_config(config)
    own = site / "own"
    assert [str(i) for i in err.value.issues] == [
        f"{config}:8: devices[0].security.private_key: {own / 'b-key.pem'} is not the key of {own / 'a.der'}",
        f"{config}:9: devices[0].security.trust_dir: {own / 'a.der'} is not a folder: "
        "create it and copy the server's certificate into it",
        f"{config}:10: devices[0].auth.password_file: cannot read the secret {site / 'secrets' / 'missing'}: "
        "No such file or directory",
        f"{config}:17: devices[1].security.certificate: {own / 'junk.der'} is not a certificate (PEM or DER)",
        f"{config}:19: devices[1].security.trust_dir: /nonexistent/trusted is not a folder: "
        "create it and copy the server's certificate into it",
        f"{config}:21: devices[1].auth.private_key: cannot read /nonexistent/user.pem: No such file or directory",
        f"{config}:31: devices[2].security.application_uri: 'urn:elsewhere:edge-agent' is not the application URI "
        f"in the certificate {own / 'a.der'} ('urn:a:agent'), and servers refuse a mismatch: leave application_uri "
        "out to use the certificate's, or make a matching pair with edge-agent opcua gen-cert "
        "--application-uri urn:elsewhere:edge-agent --cert … --key …",
    ]


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    text = SUBSCRIBE.replace(
        "auth: {certificate: user.der, private_key: user.pem}",
        "auth: {username: op, password_file: secrets/pw}\n    security: {policy: Basic256Sha256, "
        "certificate: /abs/agent.der, private_key: own/agent-key.pem, trust_dir: pki/trusted}",
    )
    with pytest.raises(ConfigError) as err:  # nothing there: every relative path is reported under base_dir
        parse_config(text, base_dir=tmp_path)
    text_of = str(err.value)
    assert f"cannot read {tmp_path / 'own' / 'agent-key.pem'}" in text_of
    assert f"{tmp_path / 'pki' / 'trusted'} is not a folder" in text_of
    assert f"cannot read the secret {tmp_path / 'secrets' / 'pw'}" in text_of
    assert "cannot read /abs/agent.der" in text_of
