"""A real asyncua server for the OPC UA driver tests, and helpers to configure the agent against it.

The server offers security None and Basic256Sha256 Sign/SignAndEncrypt with a certificate made for
the session, and knows two users: `operator`/`s3cret`, and the holder of the session's user
certificate. Its variables cover every builtin type the driver decodes, each node id form, arrays,
and values with bad and uncertain status codes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import shutil
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from cryptography.hazmat.primitives.serialization import Encoding
from helpers import free_port

from edge_agent.drivers.opcua.certs import CertPurpose, generate_certificate, load_certificate

logging.getLogger("asyncua").setLevel(logging.CRITICAL)

NS = "urn:edge-agent:test"
PATH = "/edge-agent/test"
USER, PASSWORD = "operator", "s3cret"
GUID = uuid.UUID("09087e75-8e5e-499b-954f-f2a9603db28a")
OPAQUE = b"\x01\x02opaque\xff"
BIG = 2**60 + 1  # an Int64 that float64 cannot hold exactly
WHEN = dt.datetime(2024, 5, 17, 8, 30, 15, 250000, tzinfo=dt.UTC)

# name -> (variant type, value); each is a variable ns=<idx>;s=<name>
SCALARS: dict[str, tuple[ua.VariantType, Any]] = {
    "Bool": (ua.VariantType.Boolean, True),
    "SByte": (ua.VariantType.SByte, -12),
    "Byte": (ua.VariantType.Byte, 250),
    "Int16": (ua.VariantType.Int16, -32000),
    "UInt16": (ua.VariantType.UInt16, 65000),
    "Int32": (ua.VariantType.Int32, -2_000_000_000),
    "UInt32": (ua.VariantType.UInt32, 4_000_000_000),
    "Int64": (ua.VariantType.Int64, -BIG),
    "UInt64": (ua.VariantType.UInt64, BIG),
    "Float": (ua.VariantType.Float, 1.5),
    "Double": (ua.VariantType.Double, -273.15),
    "String": (ua.VariantType.String, "Pumpe 3 – Saugseite"),
    "DateTime": (ua.VariantType.DateTime, WHEN),
    "Array": (ua.VariantType.Double, [1.0, 2.0, 3.0, 4.0, 5.0]),
    "Text": (ua.VariantType.LocalizedText, ua.LocalizedText("hello", "en")),
    "Level": (ua.VariantType.Double, 10.0),
    "Counter": (ua.VariantType.Int32, 0),
}


class _Users:
    """Anonymous (unless switched off), one user with a password, and the holder of one certificate.

    asyncua passes the channel's certificate for anonymous sessions too, so a certificate that is not
    the user certificate counts as anonymous; `last` records who got in.
    """

    def __init__(self) -> None:
        self.cert_der: bytes | None = None
        self.allow_anonymous = True
        self.last = ""

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        if username is not None:
            ok = username == USER and password == PASSWORD
            self.last = username if ok else ""
            return User(role=UserRole.User, name=username) if ok else None
        if certificate and certificate == self.cert_der:
            self.last = "certificate"
            return User(role=UserRole.User, name="cert")
        self.last = "anonymous" if self.allow_anonymous else ""
        return User(role=UserRole.User) if self.allow_anonymous else None


@dataclass
class Pki:
    """Certificates for the session: the agent's, a user's, and trust folders."""

    root: Path
    client_cert: Path
    client_key: Path
    user_cert: Path
    user_key: Path
    server_dir: Path
    trusted: Path  # holds the server's certificate
    empty_trust: Path  # trusts nothing


class UaPeer:
    """An asyncua server whose variables the test owns; restartable on the same port."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.port = free_port()
        self.server: Server | None = None
        self.users = _Users()
        self.users.cert_der = load_certificate(pki.user_cert).public_bytes(Encoding.DER)
        self.idx = 0
        self.nodes: dict[str, ua.NodeId] = {}

    @property
    def url(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}{PATH}"

    async def start(self, extra_namespaces: Sequence[str] = ()) -> None:
        """Build the address space (after `extra_namespaces`, which shift our index) and listen."""
        server = Server(user_manager=self.users)  # type: ignore[arg-type]
        await server.init()
        server.set_endpoint(self.url)
        server.set_security_policy(
            [
                ua.SecurityPolicyType.NoSecurity,
                ua.SecurityPolicyType.Basic256Sha256_Sign,
                ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            ]
        )
        server.set_identity_tokens([ua.AnonymousIdentityToken, ua.UserNameIdentityToken, ua.X509IdentityToken])
        await server.set_application_uri("urn:edge-agent:test:server")
        await server.load_certificate(str(self.pki.server_dir / "server.der"))
        await server.load_private_key(str(self.pki.server_dir / "server-key.pem"))
        for uri in extra_namespaces:
            await server.register_namespace(uri)
        self.idx = idx = await server.register_namespace(NS)
        objects = server.nodes.objects
        folder = await objects.add_folder(ua.NodeId("Test", idx), ua.QualifiedName("Test", idx))
        self.nodes = {}
        for name, (vt, value) in SCALARS.items():
            node = await folder.add_variable(ua.NodeId(name, idx), ua.QualifiedName(name, idx), ua.Variant(value, vt))
            await node.set_writable()
            self.nodes[name] = node.nodeid
        for label, nodeid in (("Numeric", ua.NodeId(1001, idx)), ("Guid", ua.NodeId(GUID, idx))):
            node = await folder.add_variable(
                nodeid, ua.QualifiedName(label, idx), ua.Variant(42.5, ua.VariantType.Double)
            )
            self.nodes[label] = node.nodeid
        node = await folder.add_variable(
            ua.NodeId(OPAQUE, idx), ua.QualifiedName("Opaque", idx), ua.Variant(7, ua.VariantType.UInt16)
        )
        self.nodes["Opaque"] = node.nodeid
        for name, code in (
            ("Broken", ua.StatusCodes.BadSensorFailure),
            ("Doubtful", ua.StatusCodes.UncertainLastUsableValue),
        ):
            node = await folder.add_variable(ua.NodeId(name, idx), ua.QualifiedName(name, idx), ua.Variant(1.0))
            self.nodes[name] = node.nodeid
            value = ua.Variant(None) if code >> 31 else ua.Variant(3.25, ua.VariantType.Double)
            await server.write_attribute_value(node.nodeid, ua.DataValue(value, StatusCode=ua.StatusCode(code)))
        await server.start()
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop()

    async def restart(self, extra_namespaces: Sequence[str] = ()) -> None:
        await self.stop()
        await self.start(extra_namespaces)

    async def write(self, name: str, value: Any, *, source: dt.datetime | None = None) -> None:
        """Set a variable, with a source timestamp when given."""
        assert self.server is not None
        vt = SCALARS[name][0] if name in SCALARS else ua.VariantType.Double
        dv = ua.DataValue(ua.Variant(value, vt), SourceTimestamp=source, ServerTimestamp=source)  # type: ignore[arg-type]
        await self.server.write_attribute_value(self.nodes[name], dv)

    def drop_connections(self) -> int:
        """Close every client connection abruptly (a cable pulled, a crashed gateway); the server stays up."""
        assert self.server is not None
        transports = list(self.server.iserver.asyncio_transports)
        for t in transports:
            t.abort()
        return len(transports)


def make_pki(root: Path) -> Pki:
    """Certificates for a test session under `root`."""
    server_dir = root / "server"
    generate_certificate(
        server_dir / "server.der",
        server_dir / "server-key.pem",
        application_uri="urn:edge-agent:test:server",
        hostname="localhost",
        purpose=CertPurpose.SERVER,
    )
    generate_certificate(
        root / "agent.der", root / "agent-key.pem", application_uri="urn:test:edge-agent", hostname="localhost"
    )
    generate_certificate(
        root / "user.pem", root / "user-key.pem", application_uri="urn:test:user", hostname="localhost"
    )
    trusted = root / "pki" / "trusted"
    trusted.mkdir(parents=True)
    shutil.copy(server_dir / "server.der", trusted / "test-server.der")
    empty = root / "other" / "trusted"
    empty.mkdir(parents=True)
    return Pki(
        root,
        root / "agent.der",
        root / "agent-key.pem",
        root / "user.pem",
        root / "user-key.pem",
        server_dir,
        trusted,
        empty,
    )


def device_yaml(
    url: str,
    tags: Sequence[tuple[str, str] | str],
    *,
    name: str = "ua",
    mode: str = "read",
    extra: str = "",
    interval: str = "100ms",
) -> str:
    """A config with one OPC UA device; a tag is (name, node) or a YAML flow mapping."""
    lines = [
        "devices:",
        f"  - name: {name}",
        "    type: opcua",
        f"    endpoint: {url}",
        f"    mode: {mode}",
        f"    poll_interval: {interval}",
        "    timeout: 1s",
        "    backoff: {initial: 50ms, max: 200ms}",
    ]
    lines += [f"    {line}" for line in extra.strip("\n").splitlines()] if extra.strip() else []
    lines.append("    tags:")
    for tag in tags:
        lines.append(f'      - {{name: {tag[0]}, node: "{tag[1]}"}}' if isinstance(tag, tuple) else f"      - {tag}")
    return "\n".join(lines) + "\n"


async def edge_agent(*args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    """Run the edge-agent command in a subprocess without blocking the loop the servers run on: (exit, out, err)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge_agent", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
