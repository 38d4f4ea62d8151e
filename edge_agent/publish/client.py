"""The paho client as the publisher uses it: TLS set-up, a buffered socket, a cheaper PUBACK path, failure text.

Two paho internals are overridden (see `Client`): paho is pinned to the minor versions they were checked
against, and a unit test checks that they still exist.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Sized
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import MqttSection, TlsVerify
from edge_agent.errors import EdgeAgentError
from edge_agent.tls import TlsSetupError, client_context

SOCKET_BUFFER = 65536  # bytes paho's thread reads at once, or gathers for one send()


class MqttSetupError(EdgeAgentError):
    """The publisher cannot start as configured (a TLS file that cannot be read or used)."""


def make_client(
    mqtt: MqttSection,
    *,
    client_id: str,
    max_inflight: int,
    max_queued: int,
    will: tuple[str, bytes],
    will_retain: bool = True,
    json: bool = True,
) -> tuple[Client, Properties | None]:
    """A paho client as configured (protocol, session, credentials, TLS, the will: retained unless asked not),
    and the PUBLISH properties to send with every message (MQTT 5 and `json`: UTF-8 JSON payloads; None for
    binary ones such as Sparkplug's). Reads TLS files: run in a thread."""
    v5 = mqtt.protocol == "5"
    client = Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=None if v5 else mqtt.session == "clean",
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        reconnect_on_failure=True,
    )
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(max_queued)
    if mqtt.username is not None or mqtt.password is not None:
        password = mqtt.password.get_secret_value() if mqtt.password is not None else None
        client.username_pw_set(mqtt.username or "", password)
    if urlsplit(mqtt.url).scheme == "mqtts":
        client.tls_set_context(tls_context(mqtt))
        if mqtt.tls is not None and mqtt.tls.verify is TlsVerify.NONE:
            client.tls_insecure_set(True)
    client.will_set(will[0], will[1], qos=1, retain=will_retain)
    if not v5 or not json:
        return client, None
    props = Properties(PacketTypes.PUBLISH)
    props.PayloadFormatIndicator = 1
    props.ContentType = "application/json"
    return client, props


def connect_args(mqtt: MqttSection) -> dict[str, Any]:
    """Extra CONNECT arguments: MQTT 5 clean start and session expiry."""
    if mqtt.protocol != "5":
        return {}
    persistent = mqtt.session == "persistent"
    props = Properties(PacketTypes.CONNECT)
    if persistent:
        props.SessionExpiryInterval = int(mqtt.session_expiry)
    return {"clean_start": not persistent, "properties": props}


def tls_problems(mqtt: MqttSection) -> list[tuple[str, str]]:
    """(field, message) for each TLS file that cannot be read or used; reads the files, no network (for `check`)."""
    try:
        tls_context(mqtt)
    except MqttSetupError as exc:
        field, _, message = str(exc).partition(": ")
        return [(field, message)]
    return []


def tls_context(mqtt: MqttSection) -> ssl.SSLContext:
    """The TLS context the config asks for (reads the CA, certificate and key files)."""
    try:
        return client_context(mqtt.tls, "mqtt.tls")
    except TlsSetupError as exc:
        raise MqttSetupError(str(exc)) from None


# shared by every fast-path PUBACK: the callback only reads them
_PUBACK_OK = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)


class BufferedSocket:
    """The broker socket with buffers both ways, so paho's network thread makes one syscall per burst.

    paho reads a PUBACK as three recv() calls (1, 1 and 2 bytes) and writes every packet with its own
    send(); each syscall releases and retakes the GIL, which the event loop and the outbox thread want too.
    Reads: one recv() takes all that arrived, `pending()` tells paho's loop to read again before it waits.
    Writes: while paho's write loop has more packets queued behind this one, the bytes are kept and go out
    with the last one; bytes kept always go out before any later ones, so the stream keeps its order.
    """

    def __init__(self, sock: Any, queue: Sized) -> None:
        self._sock = sock
        self._queue = queue  # paho's queue of packets to write
        self._in = b""
        self._pos = 0
        self._out = bytearray()

    def recv(self, size: int) -> bytes:
        """Up to `size` bytes: from the buffer, or from one recv() of everything that arrived."""
        if self._pos >= len(self._in):
            data: bytes = self._sock.recv(max(size, SOCKET_BUFFER))
            if len(data) <= size:
                return data
            self._in, self._pos = data, 0
        start = self._pos
        self._pos = min(start + size, len(self._in))
        return self._in[start : self._pos]

    def pending(self) -> int:
        """Bytes readable now without waiting (paho's loop skips its select wait while there are any)."""
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0  # TLS keeps decrypted bytes too
        return len(self._in) - self._pos + int(inner)

    def send(self, data: bytes | bytearray) -> int:
        """Take `data` (kept while paho has more to write), or send what was kept and then it."""
        if len(self._queue) and len(self._out) + len(data) <= SOCKET_BUFFER:
            self._out += data
            return len(data)
        if self._out:
            # kept bytes first; while they cannot all go, `data` waits too (paho retries it once writable)
            sent = self._sock.send(self._out)
            del self._out[:sent]
            if self._out:
                raise BlockingIOError
        return int(self._sock.send(data))

    def close(self) -> None:
        """Send what was kept (a DISCONNECT is often among it), then close."""
        if self._out:
            with contextlib.suppress(OSError):
                self._sock.send(self._out)
            self._out.clear()
        self._sock.close()

    def fileno(self) -> int:
        """The socket's descriptor (paho selects on it)."""
        return int(self._sock.fileno())

    def setblocking(self, flag: bool) -> None:
        """Set the socket's blocking mode."""
        self._sock.setblocking(flag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)  # setsockopt, getpeercert, …


class Client(paho.Client):
    """paho's client, remembering why the last connection attempt failed, with a cheaper path per PUBACK.

    Two paho internals are overridden, alike in paho-mqtt 2.1 and 2.2 (a unit test checks them and the
    attributes they use): `_create_socket`, to wrap the socket in BufferedSocket, and `_handle_pubackcomp`,
    because paho builds a ReasonCode and a Properties object for every PUBACK (~18 µs, a third of its
    time per message).
    """

    last_error: BaseException | None = None

    def _create_socket(self) -> Any:
        return BufferedSocket(super()._create_socket(), self._out_packet)

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)  # PUBCOMP, or an MQTT 5 PUBACK with a reason code
        mid = (packet[0] << 8) | packet[1]  # 2 bytes: MQTT 3.1.1, or MQTT 5 "Success" without properties
        self._easy_log(paho.MQTT_LOG_DEBUG, "Received PUBACK (Mid: %d)", mid)
        with self._out_message_mutex:
            if mid not in self._out_messages:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            # paho now sends the next queued message from this thread and would write a byte to its socket
            # pair to wake this very thread: skip that syscall (its loop checks for packets to write before
            # it waits again, so a publish() from another thread meanwhile is not missed either)
            wake, self._sockpairW = self._sockpairW, None
            try:
                return self._do_on_publish(mid, _PUBACK_OK, _NO_PROPERTIES)
            finally:
                self._sockpairW = wake

    def reconnect(self) -> MQTTErrorCode:
        """Connect again, keeping the exception of a failed attempt for the error log."""
        try:
            return super().reconnect()
        except OSError as exc:
            self.last_error = exc
            raise


def describe_failure(exc: BaseException | None, host: str, port: int) -> tuple[str, str]:
    """(kind, sentence) for a failed connection attempt; the kind decides whether it is logged again."""
    where = f"MQTT broker {host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or str(exc)
        return "tls-verify", (
            f"{where}: its TLS certificate does not verify ({detail}); check mqtt.tls.ca and that the "
            f"certificate names {host}"
        )
    if isinstance(exc, ssl.SSLError):
        return "tls", f"{where}: TLS handshake failed ({exc.reason or exc}); check mqtt.tls and the broker's listener"
    if isinstance(exc, OSError):
        return "unreachable", f"{where} is unreachable ({exc.strerror or exc})"
    return "unreachable", f"{where} is unreachable"
