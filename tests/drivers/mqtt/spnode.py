"""A Sparkplug B edge node for the MQTT input driver's tests, encoded with tests/sparkplug_wire.py (not protobuf).

In-process (`SparkplugNode`) or as a subprocess (`python spnode.py PORT GROUP NODE DEVICE BDSEQ`) that a test kills
with SIGKILL, so the broker sends its will (NDEATH) as it would for a crashed gateway. It answers
NCMD `Node Control/Rebirth` with NBIRTH and DBIRTH, and numbers every node message with the next seq.
"""

from __future__ import annotations

import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for sparkplug_wire when run as a script
from sparkplug_wire import DataType, Metric, Payload, decode, encode

# the metrics the tests' node has on its device: name → (alias, datatype, first value)
METRICS: dict[str, tuple[int, DataType, Any]] = {
    "Temperature": (1, DataType.FLOAT, 20.5),
    "Pressure": (2, DataType.DOUBLE, 1.25),
    "Offset": (3, DataType.INT16, -2),
    "Running": (4, DataType.BOOLEAN, True),
    "Mode": (5, DataType.STRING, "auto"),
    "Counter": (6, DataType.UINT64, 2**60 + 1),
}


class SparkplugNode:
    """One edge node with one device; births, data by alias, deaths, and rebirth on command."""

    def __init__(
        self,
        port: int,
        group: str,
        node: str,
        device: str,
        *,
        bdseq: int = 0,
        metrics: dict[str, tuple[int, DataType, Any]] | None = None,
    ) -> None:
        self.group, self.node, self.device, self.bdseq = group, node, device, bdseq
        self.metrics = METRICS if metrics is None else metrics
        self.values = {name: v for name, (_, _, v) in self.metrics.items()}
        self.seq = 0
        self.rebirths = 0  # NCMD rebirth requests answered
        self._lock = threading.Lock()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"spnode-{secrets.token_hex(3)}"
        )
        # the will: NDEATH with this session's bdSeq, QoS 1, not retained (Sparkplug 3.0)
        self.client.will_set(self.topic("NDEATH"), self._death(), qos=1, retain=False)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        self.client.subscribe(self.topic("NCMD"), qos=1)
        if not subscribed.wait(5):
            raise RuntimeError("the Sparkplug node did not subscribe to its NCMD topic")

    def topic(self, kind: str, device: bool = False) -> str:
        """spBv1.0/{group}/{kind}/{node}[/{device}]."""
        return f"spBv1.0/{self.group}/{kind}/{self.node}" + (f"/{self.device}" if device else "")

    def _death(self) -> bytes:
        return encode(
            Payload(timestamp=_ms(), metrics=[Metric(name="bdSeq", datatype=DataType.UINT64, value=self.bdseq)])
        )

    def _next(self) -> int:
        seq, self.seq = self.seq, (self.seq + 1) % 256
        return seq

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Publish and wait for the broker's PUBACK, so a test knows who was subscribed when it arrived.

        (Sparkplug sends births and data at QoS 0; at QoS 0 a test could not tell whether a driver that
        subscribes just after received a message sent just before.)
        """
        self.client.publish(topic, payload, qos=qos).wait_for_publish(5)

    def birth(self) -> None:
        """NBIRTH (seq 0, bdSeq, Node Control/Rebirth) and DBIRTH with every metric's name, alias, type, value."""
        with self._lock:
            self.seq = 0
            nbirth = Payload(
                timestamp=_ms(),
                seq=self._next(),
                metrics=[
                    Metric(name="bdSeq", datatype=DataType.UINT64, value=self.bdseq),
                    Metric(name="Node Control/Rebirth", datatype=DataType.BOOLEAN, value=False),
                ],
            )
            self.publish(self.topic("NBIRTH"), encode(nbirth))
            metrics = [
                Metric(name=name, alias=alias, datatype=dt, value=self.values[name])
                for name, (alias, dt, _) in self.metrics.items()
            ]
            self.publish(
                self.topic("DBIRTH", True), encode(Payload(timestamp=_ms(), seq=self._next(), metrics=metrics))
            )

    def data(self, values: dict[str, Any], *, by_alias: bool = True) -> None:
        """DDATA with the given metrics, by alias (as after a birth) or by name."""
        with self._lock:
            self.values.update(values)
            metrics = [
                Metric(alias=self.metrics[n][0], datatype=self.metrics[n][1], value=v)
                if by_alias
                else Metric(name=n, datatype=self.metrics[n][1], value=v)
                for n, v in values.items()
            ]
            self.publish(self.topic("DDATA", True), encode(Payload(timestamp=_ms(), seq=self._next(), metrics=metrics)))

    def skip_seq(self) -> None:
        """Lose one message: the next one's seq leaves a gap."""
        with self._lock:
            self._next()

    def device_death(self) -> None:
        """DDEATH: the device behind the node is unreachable."""
        with self._lock:
            self.publish(self.topic("DDEATH", True), encode(Payload(timestamp=_ms(), seq=self._next())))

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        cmd = decode(msg.payload)
        if any(m.name == "Node Control/Rebirth" and m.value is True for m in cmd.metrics):
            self.rebirths += 1
            threading.Thread(target=self.birth, daemon=True).start()  # not on paho's thread: birth waits for it

    def close(self, *, death: bool = True) -> None:
        """Publish NDEATH (as a node that shuts down cleanly does) and disconnect."""
        if death:
            self.publish(self.topic("NDEATH"), self._death(), qos=1)
        self.client.disconnect()
        self.client.loop_stop()


def _ms() -> int:
    return int(time.time() * 1000)


def main(argv: list[str]) -> None:
    """Births, then DDATA (Temperature rising) every 50 ms for at most 10 minutes, until killed."""
    port, group, node, device, bdseq = int(argv[0]), argv[1], argv[2], argv[3], int(argv[4])
    sp = SparkplugNode(port, group, node, device, bdseq=bdseq)
    sp.birth()
    print("born", flush=True)
    for i in range(12000):
        time.sleep(0.05)
        sp.data({"Temperature": 20.5 + (i % 100) * 0.1})


if __name__ == "__main__":
    main(sys.argv[1:])
