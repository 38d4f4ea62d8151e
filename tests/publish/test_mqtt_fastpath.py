"""The publisher's hot path pieces: latency buckets, the buffered broker socket, the paho internals it relies on."""

from __future__ import annotations

import collections
import inspect
import math
import random
import socket
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from edge_agent.publish.client import SOCKET_BUFFER, BufferedSocket, Client
from edge_agent.publish.stats import DELIVERY_BUCKETS, PUBLISH_BUCKETS, LatencyHistogram

# ------------------------------------------------------------ LatencyHistogram


def test_histogram_buckets_are_inclusive_upper_bounds() -> None:
    """A duration equal to a bound counts in that bucket (Prometheus `le`); beyond the last one only in +Inf."""
    h = LatencyHistogram((0.01, 0.1, 1.0))
    for seconds in (0.0, 0.01, 0.010001, 0.1, 0.5, 1.0, 7.0):
        h.observe(seconds)
    assert h.cumulative() == [(0.01, 2), (0.1, 4), (1.0, 6), (math.inf, 7)]
    assert h.count == 7
    assert h.sum == pytest.approx(0.0 + 0.01 + 0.010001 + 0.1 + 0.5 + 1.0 + 7.0)


def test_histogram_counts_a_negative_duration_as_zero() -> None:
    """A wall clock stepped back must not make a negative latency (nor lower the sum)."""
    h = LatencyHistogram((0.01, 0.1))
    h.observe(-3.0)
    assert h.cumulative() == [(0.01, 1), (0.1, 1), (math.inf, 1)]
    assert h.sum == 0.0


def test_histogram_memory_is_fixed() -> None:
    """A million observations keep one counter per bucket."""
    h = LatencyHistogram(PUBLISH_BUCKETS)
    for i in range(1_000_000):
        h.observe((i % 1000) / 100)
    assert len(h.counts) == len(PUBLISH_BUCKETS) + 1
    assert h.count == 1_000_000
    cumulative = [n for _, n in h.cumulative()]
    assert cumulative == sorted(cumulative)


def test_bucket_bounds_ascend() -> None:
    for bounds in (PUBLISH_BUCKETS, DELIVERY_BUCKETS):
        assert list(bounds) == sorted(set(bounds))


# ------------------------------------------------------------ BufferedSocket (a real socket pair)


class Counting:
    """A socket that counts the recv and send calls reaching it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls: collections.Counter[str] = collections.Counter()

    def recv(self, size: int) -> bytes:
        self.calls["recv"] += 1
        return self.sock.recv(size)

    def send(self, data: bytes) -> int:
        self.calls["send"] += 1
        return self.sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def test_reads_of_a_burst_take_one_syscall(pair: tuple[socket.socket, socket.socket]) -> None:
    """Three PUBACKs read the way paho reads them (1, 1, 2 bytes each) cost one recv on the socket."""
    ours, broker = pair
    inner = Counting(ours)
    sock = BufferedSocket(inner, collections.deque())
    pubacks = b"".join(bytes([0x40, 2, 0, mid]) for mid in (1, 2, 3))
    broker.send(pubacks)
    got = []
    for _ in range(3):
        got.append(sock.recv(1) + sock.recv(1) + sock.recv(2))
        assert sock.pending() == len(pubacks) - 4 * len(got)
    assert b"".join(got) == pubacks
    assert inner.calls["recv"] == 1
    with pytest.raises(BlockingIOError):
        sock.recv(1)  # nothing left, and nothing on the socket: paho waits in select again


def test_writes_wait_for_the_last_queued_packet(pair: tuple[socket.socket, socket.socket]) -> None:
    """While paho has more packets queued, bytes are kept; the last one sends all, in order, in one go."""
    ours, broker = pair
    inner = Counting(ours)
    queue: collections.deque[bytes] = collections.deque([b"2", b"3"])
    sock = BufferedSocket(inner, queue)
    assert sock.send(b"one,") == 4
    queue.popleft()
    assert sock.send(b"two,") == 4
    assert read_all(broker) == b""  # kept so far
    queue.popleft()
    assert sock.send(b"three") == 5
    assert read_all(broker) == b"one,two,three"
    assert inner.calls["send"] == 2  # the kept bytes, then the last packet


def test_close_sends_what_was_kept(pair: tuple[socket.socket, socket.socket]) -> None:
    """paho closes the socket right after writing DISCONNECT: it must not stay in the buffer."""
    ours, broker = pair
    sock = BufferedSocket(ours, collections.deque([b"more"]))
    sock.send(b"\xe0\x00")  # DISCONNECT
    sock.close()
    assert read_all(broker) == b"\xe0\x00"


class Stingy:
    """A socket whose first send takes 3 bytes and every later one all: the buffer drained in between."""

    def __init__(self) -> None:
        self.stream = bytearray()
        self.sends = 0

    def send(self, data: bytes) -> int:
        self.sends += 1
        taken = bytes(data[:3]) if self.sends == 1 else bytes(data)
        self.stream += taken
        return len(taken)


def test_kept_bytes_that_cannot_all_go_hold_back_the_next_packet() -> None:
    """Kept bytes are only partly sent: the new packet must wait (EAGAIN to paho), even if the socket has room."""
    inner = Stingy()
    queue = collections.deque([b"next"])
    sock = BufferedSocket(inner, queue)
    sock.send(b"abcdef")
    queue.clear()
    with pytest.raises(BlockingIOError):
        sock.send(b"XYZ")
    assert sock.send(b"XYZ") == 3  # paho tries the same packet again once the socket is writable
    assert bytes(inner.stream) == b"abcdefXYZ"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stream_keeps_its_order_under_backpressure(pair: tuple[socket.socket, socket.socket], seed: int) -> None:
    """paho's write loop on a full socket (partial writes, EAGAIN, retries): every byte arrives, in order."""
    ours, broker = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    rng = random.Random(seed)
    packets = [bytes([i % 251]) * rng.choice((4, 90, 700, 3000, SOCKET_BUFFER + 10)) for i in range(400)]
    queue: collections.deque[dict[str, Any]] = collections.deque({"packet": p, "pos": 0} for p in packets)
    sock = BufferedSocket(ours, queue)
    received = bytearray()
    blocked = 0
    while queue:  # what paho's _packet_write does, with the broker reading whenever the socket is full
        item = queue.popleft()
        try:
            n = sock.send(item["packet"][item["pos"] :])
        except BlockingIOError:
            blocked += 1
            queue.appendleft(item)
            received += read_all(broker)
            continue
        assert n > 0  # paho drops a packet on a zero-length write
        item["pos"] += n
        if item["pos"] < len(item["packet"]):
            queue.appendleft(item)
        if rng.random() < 0.05:
            received += read_all(broker)
    sock.close()
    received += read_all(broker)
    assert bytes(received) == b"".join(packets)
    assert blocked > 10  # the socket really was full, many times


# ------------------------------------------------------------ the paho internals the client overrides


def test_paho_still_has_the_internals_we_override() -> None:
    """A paho upgrade that renames these would silently lose the fast path (or break it): fail here first."""
    client = Client(callback_api_version=paho.CallbackAPIVersion.VERSION2)
    for name in ("_in_packet", "_out_message_mutex", "_out_messages", "_out_packet", "_sockpairW"):
        assert hasattr(client, name), name
    assert "packet" in client._in_packet
    for name in ("_create_socket", "_handle_pubackcomp", "_easy_log"):
        assert callable(getattr(paho.Client, name, None)), name
    assert list(inspect.signature(paho.Client._do_on_publish).parameters) == [
        "self",
        "mid",
        "reason_code",
        "properties",
    ]
    # the publisher's client wraps every socket it creates
    assert Client._create_socket is not paho.Client._create_socket


def puback(protocol: MQTTProtocolVersion, packet: bytes) -> tuple[list[tuple[int, int, Any]], Client]:
    """Feed one PUBACK body to a client holding message 1 in flight; returns what on_publish saw."""
    client = Client(callback_api_version=paho.CallbackAPIVersion.VERSION2, protocol=protocol)
    seen: list[tuple[int, int, Any]] = []
    client.on_publish = lambda c, u, mid, reason, props: seen.append((mid, reason.value, c._sockpairW))
    info = client.publish("t/1", b"x", qos=1)  # not connected: paho keeps it, as it does messages in flight
    assert info.mid == 1
    wake = object()
    client._sockpairW = wake  # type: ignore[assignment]
    client._in_packet["packet"] = bytearray(packet)
    client._handle_pubackcomp("PUBACK")
    assert client._sockpairW is wake  # put back after the callback
    client._sockpairW = None
    return seen, client


@pytest.mark.parametrize("protocol", [MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5])
def test_short_puback_takes_the_fast_path(protocol: MQTTProtocolVersion) -> None:
    """A 2-byte PUBACK: success for that mid, the message released, no wake-up byte written meanwhile."""
    seen, client = puback(protocol, b"\x00\x01")
    assert seen == [(1, 0, None)]
    assert 1 not in client._out_messages
    again, _ = puback(protocol, b"\x00\x07")  # a mid nobody waits for: ignored
    assert again == []


def test_mqtt5_puback_with_a_reason_code_goes_through_paho() -> None:
    """MQTT 5 failure codes (here 0x87, not authorized) still reach the callback, decoded by paho."""
    seen, _ = puback(MQTTProtocolVersion.MQTTv5, b"\x00\x01\x87")
    assert [(mid, code) for mid, code, _ in seen] == [(1, 0x87)]
