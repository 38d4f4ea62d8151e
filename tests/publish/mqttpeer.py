"""MQTT test pieces of the publish tests: a blackholing TCP proxy, TLS certificates, password files, synthetic events
and a publisher wired as the agent wires it. The broker and the subscriber are shared: tests/helpers.py."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import secrets
import selectors
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import Received, free_port

from edge_agent.config import MqttSection, OutboxSection
from edge_agent.outbox.writer import OutboxWriter
from edge_agent.publish import deliver
from edge_agent.publish.mqtt import MqttPublisher
from edge_agent.scoring.detector import new_event_id
from edge_agent.types import AnomalyEvent, EventType, Severity

PREFIX = "acme/plant-a/area-1/line-3"  # ISA-95 style levels
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def write_password_file(path: Path, users: dict[str, str]) -> None:
    """A mosquitto password file (hashed with mosquitto_passwd)."""
    path.write_text("")
    for user, pw in users.items():
        subprocess.run([MOSQUITTO_PASSWD, "-b", str(path), user, pw], check=True, capture_output=True)
    os.chmod(path, 0o600)


class BlackholeProxy:
    """TCP proxy on a free loopback port; `blackhole()` silently stops forwarding without closing any socket."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = free_port()
        self.blackholed = threading.Event()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.setblocking(False)
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._thread = threading.Thread(target=self._run, name="blackhole-proxy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        while not self._stop.is_set():
            for key, _ in sel.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    client, _ = self._listener.accept()
                    if self.blackholed.is_set():
                        self._pairs[client] = client  # accepted, never answered: a dead network path
                        continue
                    try:
                        upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=1)
                    except OSError:
                        client.close()
                        continue
                    for s in (client, upstream):
                        s.setblocking(False)
                        sel.register(s, selectors.EVENT_READ)
                    self._pairs[client], self._pairs[upstream] = upstream, client
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                peer = self._pairs.get(sock)
                if self.blackholed.is_set():
                    if not data:  # closed on its side: stop watching it, but say nothing to the other side
                        with contextlib.suppress(KeyError, ValueError):
                            sel.unregister(sock)
                    continue  # read and discard: the sender's writes succeed, nothing arrives anywhere
                if not data or peer is None:
                    for s in (sock, peer):
                        if s is not None:
                            self._pairs.pop(s, None)
                            with contextlib.suppress(KeyError, ValueError):
                                sel.unregister(s)
                            s.close()
                    continue
                with contextlib.suppress(OSError):
                    peer.sendall(data)
        sel.close()

    def blackhole(self) -> None:
        """Stop forwarding in both directions; sockets stay open."""
        self.blackholed.set()

    def restore(self) -> None:
        """Forward new connections again (blackholed ones stay dead; the client has to reconnect)."""
        self.blackholed.clear()

    def close(self) -> None:
        """Stop the proxy and close every socket."""
        self._stop.set()
        self._thread.join(2)
        for s in list(self._pairs):
            s.close()
        self._listener.close()


def make_certs(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, a server certificate for the wrong name, a client cert."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, k: ec.EllipticCurvePrivateKey | None) -> None:
        (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if k is not None:
            pem = k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            (directory / f"{stem}.key").write_bytes(pem)

    def ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(k, hashes.SHA256())
        )
        return cert, k

    def leaf(
        cn: str,
        sans: list[x509.GeneralName],
        issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
        usage: x509.ObjectIdentifier,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer[0].subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(issuer[1], hashes.SHA256())
        )
        return cert, k

    the_ca = ca("edge-agent test CA")
    write("ca", the_ca[0], the_ca[1])
    good = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write("server", *leaf("localhost", good, the_ca, ExtendedKeyUsageOID.SERVER_AUTH))
    wrong = [x509.DNSName("broker.elsewhere.example")]
    write("wrongname", *leaf("broker.elsewhere.example", wrong, the_ca, ExtendedKeyUsageOID.SERVER_AUTH))
    rogue = ca("someone else's CA")
    write("rogue-ca", rogue[0], rogue[1])
    write("rogue", *leaf("localhost", good, rogue, ExtendedKeyUsageOID.SERVER_AUTH))
    write("client", *leaf("edge-agent-client", [x509.DNSName("client")], the_ca, ExtendedKeyUsageOID.CLIENT_AUTH))
    return {p.stem if p.suffix == ".crt" else p.stem + ".key": p for p in directory.iterdir()}


SHA = "ab" * 32


def make_event(
    kind: EventType, *, seq: int, model: str = "pump", anomaly_id: str | None = None, t: float | None = None
) -> AnomalyEvent:
    """A synthetic anomaly event, shaped like the detector's."""
    t = time.time() if t is None else t
    return AnomalyEvent(
        type=kind,
        event_id=new_event_id(t, seq),
        anomaly_id=anomaly_id or secrets.token_hex(8),
        seq=seq,
        agent="agent-1",
        site="plant-a",
        model=model,
        model_version="1.0.0",
        model_sha256=SHA,
        window_start=t - 10,
        window_end=t,
        score=2.5,
        threshold=1.0,
        severity=Severity.MAJOR,
        contributions={"pump1.pressure": 0.7, "pump1.flow": 0.3},
        values={"pump1.pressure": 4.2, "pump1.flow": None},
        started_at=t,
        peak_score=2.5,
        reason="" if kind is EventType.START else "recovered",
    )


def mqtt_config(url: str, **kw: Any) -> MqttSection:
    """An mqtt section with fast reconnects, as the tests want them."""
    base: dict[str, Any] = {
        "url": url,
        "topic_prefix": PREFIX,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.5,
        "status_interval": 1.0,
        "keepalive": 5,
    }
    base.update(kw)
    return MqttSection.model_validate(base)


@dataclass
class Publishing:
    """The outbox stage and the MQTT sink, wired as the agent wires them."""

    outbox: OutboxWriter
    sink: MqttPublisher

    async def run(self) -> None:
        """Both stages until the sink stops; then the outbox closes (what was queued is written)."""
        await deliver(self.outbox, self.sink)


def publisher(mqtt: MqttSection, path: Path, **kw: Any) -> Publishing:
    """An outbox at `path` (outbox={...} for more settings) and a sink for agent-1 at plant-a."""
    box: dict[str, Any] = {"path": path}
    box.update(kw.pop("outbox", {}))
    writer = OutboxWriter(OutboxSection.model_validate(box), mqtt, agent_id="agent-1", site="plant-a")
    return Publishing(writer, MqttPublisher(mqtt, writer, agent_id="agent-1", site="plant-a", version="test", **kw))


@contextlib.asynccontextmanager
async def running(pub: Publishing) -> AsyncIterator[Publishing]:
    """Run both in a task; stop them cleanly afterwards."""
    await pub.outbox.open()
    task = asyncio.create_task(pub.run(), name="publisher")
    try:
        yield pub
    finally:
        pub.sink.stop()
        await asyncio.wait_for(task, 10)


def check_delivery(received: list[Received], expected: list[str], *, max_duplicates: int) -> dict[str, Any]:
    """Every expected event_id arrived, exactly once after de-duplication, in order per topic; returns id → payload."""
    first: dict[str, Any] = {}
    per_topic: dict[str, list[int]] = {}
    for m in received:
        doc = m.json()
        if doc["event_id"] in first:
            continue
        first[doc["event_id"]] = doc
        per_topic.setdefault(m.topic, []).append(doc["seq"])
    assert set(first) == set(expected), f"missing {set(expected) - set(first)}, unexpected {set(first) - set(expected)}"
    for topic, seqs in per_topic.items():
        assert seqs == sorted(seqs), f"out of order on {topic}"
    assert len(received) - len(first) <= max_duplicates
    return first
