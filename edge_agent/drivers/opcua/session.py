"""The OPC UA session of a driver: connect (security, identity, trust), the server's namespaces and limits, close.

OpcUaSession holds the state reads and subscriptions share: the asyncua client, each group's tags
and its Read requests planned for this connection, and the tags whose trouble was logged.
`_send_encoded` sends a request encoded once, through a few asyncua internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState
from asyncua.common.utils import Buffer
from asyncua.crypto import security_policies, uacrypto
from asyncua.ua.ua_binary import struct_to_binary
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edge_agent.drivers.base import DriverBase, ScanGroup, group_by_interval
from edge_agent.drivers.opcua import certs, logs
from edge_agent.drivers.opcua.codecs import _KIND, _from_datavalue, _status_name, _Unusable
from edge_agent.drivers.opcua.config import Mode, OpcUaDevice, OpcUaTag, SecurityPolicy, _uri_problem, _why
from edge_agent.errors import DeviceError
from edge_agent.types import SampleBatch

if TYPE_CHECKING:
    from edge_agent.drivers.opcua.subscribe import _Sub

log = logging.getLogger("edge_agent.drivers.opcua")


_SERVER_LIMITS = (
    ua.ObjectIds.Server_NamespaceArray,
    ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
    ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
)
_IDENTITY_REFUSED = {
    ua.StatusCodes.BadUserAccessDenied,
    ua.StatusCodes.BadIdentityTokenRejected,
    ua.StatusCodes.BadIdentityTokenInvalid,
}
_CERT_REFUSED = {
    ua.StatusCodes.BadSecurityChecksFailed,
    ua.StatusCodes.BadCertificateUntrusted,
    ua.StatusCodes.BadCertificateInvalid,
    ua.StatusCodes.BadCertificateUriInvalid,
    ua.StatusCodes.BadCertificateUseNotAllowed,
    ua.StatusCodes.BadCertificateTimeInvalid,
    ua.StatusCodes.BadCertificateIssuerTimeInvalid,
    ua.StatusCodes.BadCertificateRevocationUnknown,
    ua.StatusCodes.BadCertificateIssuerRevocationUnknown,
    ua.StatusCodes.BadCertificateRevoked,
    ua.StatusCodes.BadSecurityPolicyRejected,
}
MONITORED_ITEMS_PER_CALL = 1000  # when the server states no limit: keeps each request a modest size
SESSION_TIMEOUT = 30.0  # seconds a server keeps our session after the agent vanishes: sessions are scarce on PLCs
SUPERVISOR_PROBE = 10.0  # asyncua's own liveness read; also keeps the session alive between slow polls
Sink = Callable[[SampleBatch], None]


@dataclass
class _Chunk:
    """One Read request of a group, encoded once per connection: only its header changes per send."""

    params: ua.ReadParameters
    cols: list[int]
    encoded: bytes = b""  # the binary ReadParameters (asyncua's generic encoder: ~4 µs a node)
    header: ua.RequestHeader = field(default_factory=ua.RequestHeader)

    @classmethod
    def of(cls, nodes: list[ua.ReadValueId], cols: list[int]) -> _Chunk:
        """A chunk reading `nodes` into the group's `cols`."""
        params = ua.ReadParameters()
        params.MaxAge = 0
        params.TimestampsToReturn = ua.TimestampsToReturn.Neither  # polled values take the read time
        params.NodesToRead = nodes
        return cls(params, cols, struct_to_binary(params))


@dataclass
class _Plan:
    chunks: list[_Chunk]
    missing: list[int]  # columns whose namespace URI the server does not have


class OpcUaSession(DriverBase):
    """One OPC UA server over one session: the connection, and the state reads and subscriptions share."""

    def __init__(self, config: OpcUaDevice) -> None:
        super().__init__(config.name)
        self.config = config
        self._tags: dict[ScanGroup, list[OpcUaTag]] = {}
        for interval, tags in group_by_interval(config, config.tags):
            group = ScanGroup(interval, tuple(t.name for t in tags))
            self._tags[group] = tags
            (self.subscriptions if config.mode is Mode.SUBSCRIBE else self.groups).append(group)
        self._client: Client | None = None
        self._generation = 0  # bumps at every connect/close: late callbacks of an old session are ignored
        self._namespaces: list[str] = []
        self._max_per_read = config.max_nodes_per_read or 0  # 0: no limit known
        self._learned_cap = 0  # a limit found by BadTooManyOperations, kept across reconnects
        self._max_items_per_call = MONITORED_ITEMS_PER_CALL
        self._plans: dict[ScanGroup, _Plan] = {}
        self._subs: dict[int, _Sub] = {}
        self._sub_failure: str | None = None
        self._lost: str | None = None
        self._bad: dict[str, str] = {}  # tag -> why it is not good (logged once)
        self._sink: Sink | None = None
        self._fast = True  # Read requests encoded once and answers decoded here (see _send_encoded)
        self.request_errors = 0  # bad values of single tags (and refused requests), each counted
        self._warned_plain_password = False

    def _plan(self, group: ScanGroup) -> _Plan:
        tags = self._tags[group]
        resolved: list[tuple[int, ua.ReadValueId]] = []
        missing: list[int] = []
        for col, tag in enumerate(tags):
            node = tag.node.resolve(self._namespaces)
            if node is None:
                missing.append(col)
                continue
            rv = ua.ReadValueId(NodeId=node, AttributeId=ua.AttributeIds.Value)
            if tag.index is not None:
                rv.IndexRange = str(tag.index)
            resolved.append((col, rv))
        cap = self._max_per_read or max(1, len(resolved))
        chunks = []
        for start in range(0, len(resolved), cap):
            part = resolved[start : start + cap]
            chunks.append(_Chunk.of([rv for _, rv in part], [c for c, _ in part]))
        return _Plan(chunks, missing)

    # -- connection ----------------------------------------------------------------------

    def _live(self) -> Client:
        client = self._client
        if client is None:
            raise DeviceError(self.name, "not connected")
        if client.uaclient.state is not UaClientState.CONNECTED:
            raise DeviceError(
                self.name, f"connection to {self.config.endpoint} lost" + (f": {self._lost}" if self._lost else "")
            )
        return client

    async def connect(self) -> None:
        """Open the secure channel and session, then learn the namespace array and operation limits."""
        await self.close()
        cfg = self.config
        client = Client(cfg.endpoint, timeout=cfg.timeout, watchdog_intervall=SUPERVISOR_PROBE)
        client.name = "edge-agent"
        client.description = f"edge-agent {cfg.name}"  # the session name operators see in server diagnostics
        client.product_uri = "urn:edge-agent"
        client.session_timeout = int(SESSION_TIMEOUT * 1000)
        self._lost = None

        async def lost(exc: Exception) -> None:
            self._lost = _describe(exc, cfg.timeout)

        client.connection_lost_callback = lost
        logs.install()
        logs.ONE_LINE.forget(self.name)  # a new session: its first failure is logged again
        device = logs.DEVICE.set(self.name)  # asyncua's tasks started now name this device in their log lines
        try:
            async with asyncio.timeout(cfg.timeout * 8 + 2.0):
                await self._prepare(client)
                await client.connect()
                await self._learn_server(client)
        except DeviceError:
            await _teardown(client, cfg.timeout)
            raise
        except BaseException as exc:
            await _teardown(client, cfg.timeout)
            if isinstance(exc, Exception) and _is_device_failure(exc):
                raise DeviceError(self.name, self._connect_failure(exc)) from exc
            raise
        finally:
            logs.DEVICE.reset(device)
        self._client = client
        self._generation += 1
        self._fast = _fast_path_available(client)
        if not self._fast:
            log.info("device %s: this asyncua lacks the internals of the fast Read path; using its read()", self.name)
        self._plans = {g: self._plan(g) for g in [*self.groups, *self.subscriptions]}
        missing = [t.name for g, p in self._plans.items() for t in (self._tags[g][c] for c in p.missing)]
        if missing:
            uris = sorted({str(t.node.uri) for t in self.config.tags if t.name in set(missing)})
            log.warning(
                "device %s: the server has no namespace %s (it has %s); tags %s read as bad",
                self.name,
                ", ".join(uris),
                ", ".join(self._namespaces),
                ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""),
            )

    async def _prepare(self, client: Client) -> None:
        """Security and identity before the session: load files, check the server's certificate."""
        cfg = self.config
        sec, auth = cfg.security, cfg.auth
        if sec.policy is not SecurityPolicy.NONE:
            assert sec.certificate is not None and sec.private_key is not None and sec.trust_dir is not None
            cert, key_der = await asyncio.to_thread(self._load_pair, sec.certificate, sec.private_key, "security")
            uri = _uri_problem(sec, cert)  # checked at load too; the file may have changed since
            if uri is not None:
                raise DeviceError(self.name, f"security.{uri[0]}: {uri[1]}")
            client.application_uri = certs.application_uri_of(cert) or "urn:edge-agent"
            policy_cls = security_policies.SecurityPolicyBasic256Sha256
            mode = getattr(ua.MessageSecurityMode, sec.mode.value)
            server_cert = await self._server_certificate(client, policy_cls.URI, mode)
            verdict = await asyncio.to_thread(self._trust_verdict, server_cert)
            if verdict is not None:
                raise DeviceError(self.name, verdict)
            await client.set_security(
                policy_cls,
                certificate=cert.public_bytes(serialization.Encoding.DER),
                private_key=key_der,
                server_certificate=server_cert.public_bytes(serialization.Encoding.DER),
                mode=mode,
            )
        elif sec.application_uri:
            client.application_uri = sec.application_uri
        if auth.username is not None:
            if sec.policy is SecurityPolicy.NONE and not self._warned_plain_password:
                self._warned_plain_password = True
                log.warning(
                    "device %s: user %r logs in over security policy None: the password goes to a server whose "
                    "certificate nobody checked; use policy Basic256Sha256 with a trust_dir",
                    self.name,
                    auth.username,
                )
            client.set_user(auth.username)
            client.set_password(await asyncio.to_thread(self._password))
        elif auth.certificate is not None:
            assert auth.private_key is not None
            user_cert, user_key = await asyncio.to_thread(self._load_pair, auth.certificate, auth.private_key, "auth")
            client.user_certificate = user_cert
            client.user_private_key = serialization.load_der_private_key(user_key, password=None)

    def _load_pair(self, cert_path: Path, key_path: Path, section: str) -> tuple[x509.Certificate, bytes]:
        try:
            cert = certs.load_certificate(cert_path)
        except (OSError, ValueError) as exc:
            raise DeviceError(self.name, f"{section}.certificate: cannot load {cert_path}: {_why(exc)}") from exc
        try:
            key = certs.load_private_key(key_path)
        except (OSError, ValueError, TypeError) as exc:
            raise DeviceError(self.name, f"{section}.private_key: cannot load {key_path}: {_why(exc)}") from exc
        der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert, der

    def _password(self) -> str:
        auth = self.config.auth
        if auth.password is not None:
            return auth.password.get_secret_value()
        assert auth.password_file is not None
        try:
            return auth.password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise DeviceError(
                self.name, f"auth.password_file: cannot read the secret {auth.password_file}: {_why(exc)}"
            ) from exc

    async def _server_certificate(
        self, client: Client, policy_uri: str, mode: ua.MessageSecurityMode
    ) -> x509.Certificate:
        endpoints = await client.connect_and_get_server_endpoints()
        for ep in endpoints:
            if ep.SecurityPolicyUri == policy_uri and ep.SecurityMode == mode and ep.ServerCertificate:
                cert: x509.Certificate | None = uacrypto.x509_from_der(ep.ServerCertificate)
                if cert is not None:
                    return cert
        offered = sorted(
            {f"{ep.SecurityPolicyUri.rpartition('#')[2]} {ep.SecurityMode.name.rstrip('_')}" for ep in endpoints}
        )
        sec = self.config.security
        raise DeviceError(
            self.name,
            f"security: the server offers no {sec.policy} {sec.mode} endpoint; "
            f"it offers {', '.join(offered) or 'none'}",
        )

    def _trust_verdict(self, cert: x509.Certificate) -> str | None:
        sec = self.config.security
        assert sec.trust_dir is not None
        folder = certs.TrustFolder(sec.trust_dir, sec.rejected_dir)
        try:
            why = folder.verdict(cert)
        except OSError as exc:
            return f"security.trust_dir: cannot read {sec.trust_dir}: {_why(exc)}"
        if why is None:
            return None
        saved = folder.reject(cert)
        what = f"the server certificate {certs.describe(cert)} is not trusted: {why}"
        if saved is None:
            return (
                f"{what}; could not save it into {folder.rejected_dir}: "
                f"get the server's certificate file and copy it into {sec.trust_dir}"
            )
        return f"{what}; it was saved as {saved}: if it is the right server, copy that file into {sec.trust_dir}"

    def _connect_failure(self, exc: Exception) -> str:
        cfg = self.config
        why = _describe(exc, cfg.timeout)
        code = getattr(exc, "code", None)
        if code in _IDENTITY_REFUSED:
            if cfg.auth.username is not None:
                return f"the server refused user {cfg.auth.username!r} ({why}): check auth.username and the password"
            if cfg.auth.certificate is not None:
                return (
                    f"the server refused the user certificate {cfg.auth.certificate} ({why}): "
                    "register it as a user on the server"
                )
            return f"the server refused an anonymous session ({why}): set auth.username or auth.certificate"
        if code == ua.StatusCodes.BadCertificateUriInvalid and cfg.security.policy is not SecurityPolicy.NONE:
            return (
                f"the server refused this agent's certificate {cfg.security.certificate} ({why}): it finds the "
                "application URI in it wrong (some servers want the host name in it too): make a pair with "
                "edge-agent opcua gen-cert --application-uri … --hostname …"
            )
        if code in _CERT_REFUSED and cfg.security.policy is not SecurityPolicy.NONE:
            return (
                f"the server refused this agent's certificate {cfg.security.certificate} ({why}): "
                "trust it on the server (most servers keep refused certificates in a 'rejected' list to approve)"
            )
        return f"cannot connect to {cfg.endpoint}: {why}"

    async def _learn_server(self, client: Client) -> None:
        params = ua.ReadParameters()
        params.NodesToRead = [
            ua.ReadValueId(NodeId=ua.NodeId(ua.Int32(i)), AttributeId=ua.AttributeIds.Value) for i in _SERVER_LIMITS
        ]
        ns, per_read, per_call = [_from_datavalue(dv) for dv in await client.uaclient.read(params)]
        if ns[0] >> 30 or not isinstance(ns[2], list):
            raise DeviceError(self.name, f"cannot read the server's namespace array: {_status_name(ns[0])}")
        self._namespaces = [str(u) for u in ns[2]]
        # a server without OperationLimits answers BadNodeIdUnknown: no stated limit
        limit = int(per_read[2] or 0) if per_read[0] == 0 and per_read[1] in _KIND else 0
        caps = [x for x in (limit, self.config.max_nodes_per_read or 0, self._learned_cap) if x]
        self._max_per_read = min(caps) if caps else 0
        items = int(per_call[2] or 0) if per_call[0] == 0 and per_call[1] in _KIND else 0
        self._max_items_per_call = min(items, MONITORED_ITEMS_PER_CALL) if items else MONITORED_ITEMS_PER_CALL

    async def close(self) -> None:
        """Close the session (deleting its subscriptions) and the connection; safe to call twice."""
        client, self._client = self._client, None
        self._generation += 1
        self._plans = {}
        self._subs = {}
        self._sub_failure = None
        if client is not None:
            await _teardown(client, self.config.timeout)

    def _report(
        self, tags: Sequence[OpcUaTag], problems: Sequence[tuple[int, str | _Unusable]], good: Iterable[int]
    ) -> None:
        """Count each tag's trouble; log it once when it starts (DEBUG while it lasts) and once when it ends.

        A tag is logged again when the kind of trouble changes (`_Unusable.key`), not when only its details
        do (an array whose length changes at every read); a bad node never fails the device.
        """
        fresh = []
        for col, problem in problems:
            tag = tags[col]
            why = str(problem)
            key = problem.key if isinstance(problem, _Unusable) else why
            self.request_errors += 1
            if self._bad.get(tag.name) == key:
                log.debug("device %s: %s %s (still)", self.name, tag.name, why)
                continue
            self._bad[tag.name] = key
            fresh.append(f"{tag.name} ({tag.node}{f'[{tag.index}]' if tag.index is not None else ''}) {why}")
        if fresh:
            more = f"; and {len(fresh) - 5} more" if len(fresh) > 5 else ""
            log.warning("device %s: %s%s", self.name, "; ".join(fresh[:5]), more)
        if self._bad:
            for col in good:
                name = tags[col].name
                if name in self._bad:
                    del self._bad[name]
                    log.info("device %s: tag %s reads again", self.name, name)


async def _send_encoded(
    client: Client, type_id: bytes, header: ua.RequestHeader, body: bytes, wait: float, what: str = "ReadRequest"
) -> bytes:
    """Send a request whose body was encoded once, the way asyncua's UASocketProtocol sends any request.

    This reaches into the protocol object (request ids, the pending-answer map, the secure
    connection): `_fast_path_available` checks those are there at connect, and the driver falls back
    to asyncua's public read() when they are not.
    """
    proto = client.uaclient.protocol
    if proto is None or proto.transport is None:
        raise ConnectionError("connection is closed")
    proto._setup_request_header(header, wait)
    message = b"".join((type_id, struct_to_binary(header), body))
    proto.revolve_security_token()
    request_id = proto._request_id + 1
    data = proto._connection.message_to_binary(message, request_id=request_id)  # a SecureMessage
    proto._request_id = request_id
    future: asyncio.Future[Buffer] = asyncio.get_running_loop().create_future()
    proto._callbackmap[request_id] = future
    proto.transport.write(data)
    answer = await asyncio.wait_for(future, wait or None)  # 0: no limit (a Publish waits for data)
    proto.check_answer(answer, f" in response to {what}")  # raises on a ServiceFault
    return bytes(answer)


def _fast_path_available(client: Client) -> bool:
    """Whether this asyncua still has the protocol internals `_send_encoded` uses."""
    proto = client.uaclient.protocol
    needed = ("_setup_request_header", "_connection", "_request_id", "_callbackmap", "transport", "check_answer")
    return proto is not None and all(hasattr(proto, n) for n in needed)


def _describe(exc: BaseException, timeout: float) -> str:
    """One phrase for an asyncua or socket failure."""
    if isinstance(exc, ua.UaStatusCodeError):
        return _status_name(exc.code)
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.errno is None and str(exc):
        text = str(exc)  # asyncua's own: "Connection is closed", "connection lost"
        return text[0].lower() + text[1:]
    if isinstance(exc, OSError):
        return _why(exc)
    return str(exc) or type(exc).__name__


def _is_device_failure(exc: Exception) -> bool:
    return isinstance(exc, OSError | TimeoutError | ua.UaError | ValueError | EOFError)


async def _teardown(client: Client, wait: float) -> None:
    """Close a client whatever state it is in, leaving no task or socket behind.

    A live session is closed politely (CloseSession deletes its subscriptions on the server). A dead
    one is not talked to: asyncua would log a warning or a traceback for each step that cannot reach
    the server, so its loops are cancelled and the socket dropped here instead.
    """
    uac = client.uaclient
    protocol = uac.protocol
    if uac.state is UaClientState.CONNECTED and protocol is not None and not protocol.is_closed:
        try:
            async with asyncio.timeout(wait + 0.5):
                await client.disconnect()
            return
        except (OSError, TimeoutError, ua.UaError):
            pass
    uac.request_disconnect()
    uac.pre_request_hook = None
    tasks = [
        getattr(client, "_supervisor_task", None),
        getattr(client, "_stale_watchdog_task", None),
        getattr(client, "_renew_channel_task", None),
        getattr(uac.session, "_publish_task", None),
    ]
    for task in tasks:
        if task is not None and not task.done():
            task.cancel()
    for task in tasks:
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    uac.disconnect_socket()
