"""Serve the pump skid over OPC UA (asyncua server) with security None and Basic256Sha256.

The address space is a contract (examples/simulator-opcua.yaml is written against it). Every node
lives in the namespace `urn:edge-agent:simulator` under Objects/PumpSkid, with string node ids:

    ns=<idx>;s=PumpSkid.SuctionPressure … PumpSkid.ValvePosition   Double    the eight signals (SIGNALS order),
                                                                         each with an EngineeringUnits property
    ns=<idx>;s=PumpSkid.MotorRunning, .FaultActive, .HighVibration  Boolean
    ns=<idx>;s=PumpSkid.PumpRun                                     Boolean   read/write: False stops the pump
    ns=<idx>;s=PumpSkid.FaultReset                                  Boolean   write True to end every fault
    ns=<idx>;s=PumpSkid.RunSeconds                                  UInt32
    ns=<idx>;s=PumpSkid.Model                                       String    "EA-PUMP-SKID-01"
    ns=<idx>;s=PumpSkid.SampleTime                                  DateTime  wall-clock time of the tick

The namespace index is 2 on this server, but clients should name it by URI (nsu=urn:edge-agent:simulator;s=…).
Values are written at each new plant tick with that time as source timestamp, so subscriptions see
one change per tick. Writes from clients are picked up at the next refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import tempfile
from pathlib import Path
from typing import Any, cast

from asyncua import Server, ua
from asyncua.common.node import Node

from edge_agent.drivers.opcua.certs import CertPurpose, generate_certificate, thumbprint
from edge_agent.drivers.opcua.certs import load_certificate as _load_cert

from .plant import SIGNALS, UNITS, PlantPort, PlantState

log = logging.getLogger(__name__)

__all__ = ["APPLICATION_URI", "DEFAULT_PORT", "ENDPOINT_PATH", "MODEL", "NAMESPACE_URI", "OpcUaPlantServer"]

DEFAULT_PORT = 4840
NAMESPACE_URI = "urn:edge-agent:simulator"
APPLICATION_URI = "urn:edge-agent:simulator:server"
ENDPOINT_PATH = "/edge-agent/simulator"
MODEL = "EA-PUMP-SKID-01"
CERT_FILE, KEY_FILE = "simulator-server.der", "simulator-server-key.pem"
_POLICIES = [
    ua.SecurityPolicyType.NoSecurity,
    ua.SecurityPolicyType.Basic256Sha256_Sign,
    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
]


# UNECE Recommendation 20 codes of the plant's units, which OPC UA's EUInformation carries (Part 8, 5.6.3)
_UNECE = {"bar": "BAR", "m3/h": "MQH", "A": "AMP", "mm/s": "C16", "°C": "CEL", "%": "P1"}
_UNECE_URI = "http://www.opcfoundation.org/UA/units/un/cefact"


def engineering_units(unit: str) -> ua.EUInformation:
    """The EUInformation of a plant unit: its UNECE code as UnitId, the unit as display name."""
    code = _UNECE[unit]
    unit_id = 0
    for c in code:
        unit_id = unit_id << 8 | ord(c)
    return ua.EUInformation(
        NamespaceUri=_UNECE_URI, UnitId=unit_id, DisplayName=ua.LocalizedText(unit), Description=ua.LocalizedText(unit)
    )


def node_name(signal: str) -> str:
    """`suction_pressure` -> `SuctionPressure`: the browse name of a signal's variable."""
    return "".join(part.capitalize() for part in signal.split("_"))


def _variables(state: PlantState, now: dt.datetime) -> dict[str, ua.Variant]:
    out = {
        node_name(s): ua.Variant(float(v), ua.VariantType.Double) for s, v in zip(SIGNALS, state.values, strict=True)
    }
    out["MotorRunning"] = ua.Variant(state.motor_running, ua.VariantType.Boolean)
    out["FaultActive"] = ua.Variant(state.fault_active, ua.VariantType.Boolean)
    out["HighVibration"] = ua.Variant(state.high_vibration, ua.VariantType.Boolean)
    out["PumpRun"] = ua.Variant(state.pump_run, ua.VariantType.Boolean)
    out["RunSeconds"] = ua.Variant(state.run_seconds & 0xFFFFFFFF, ua.VariantType.UInt32)
    out["SampleTime"] = ua.Variant(now, ua.VariantType.DateTime)
    return out


class OpcUaPlantServer:
    """An OPC UA server for one plant; `start()` listens (~0.7 s of asyncua setup), `stop()` closes."""

    def __init__(
        self,
        plant: PlantPort,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        cert_dir: Path | None = None,
        refresh: float | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self._plant = plant
        self.host = host
        self.port = port
        # the server's certificate lives in cert_dir, or the simulator's state directory (a temp dir if neither)
        cert_dir = cert_dir if cert_dir is not None else state_dir
        self._cert_dir = Path(cert_dir) if cert_dir is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        # look for a new tick twice per plant tick: a value lags the plant by at most half a tick
        self._refresh = refresh if refresh is not None else float(getattr(plant, "dt", 0.1)) / 2
        self._server: Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._nodes: dict[str, ua.NodeId] = {}
        self._image_tick = -1
        self._pump_run_written: bool | None = None
        self.namespace_index = 0

    @property
    def certificate_path(self) -> Path:
        """The server certificate (DER): copy it into an agent's security.trust_dir to use Basic256Sha256."""
        base = self._cert_dir if self._cert_dir is not None else Path(self._tmp.name if self._tmp else ".")
        return base / CERT_FILE

    @property
    def url(self) -> str:
        """The endpoint URL clients connect to."""
        return f"opc.tcp://{self.host}:{self.port}{ENDPOINT_PATH}"

    @staticmethod
    def device_fields(host: str, port: int) -> dict[str, Any]:
        """The fields of a `type: opcua` device section that reads this server (security None)."""
        return {"type": "opcua", "endpoint": f"opc.tcp://{host}:{port}{ENDPOINT_PATH}"}

    @staticmethod
    def tag_fields(signal: str) -> dict[str, Any]:
        """Where a plant signal lives here, as a tag's fields (namespace URI, so indexes may move)."""
        return {"node": f"nsu={NAMESPACE_URI};s=PumpSkid.{node_name(signal)}"}

    @property
    def endpoint(self) -> str:
        """One line for humans: protocol, URL, security offered."""
        return f"opcua {self.url} (None, Basic256Sha256 Sign/SignAndEncrypt)"

    async def start(self) -> None:
        """Build the address space, then listen; OSError if the address cannot be used."""
        if self._cert_dir is None and self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edge-agent-opcua-")
        cert, key = await asyncio.to_thread(self._certificate)
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://{self.host}:{self.port}{ENDPOINT_PATH}")
        server.set_server_name("edge-agent pump skid simulator")
        server.product_uri = "urn:edge-agent:simulator"
        await server.set_application_uri(APPLICATION_URI)
        server.set_security_policy(_POLICIES)
        await server.load_certificate(cert)
        await server.load_private_key(key)
        idx = await server.register_namespace(NAMESPACE_URI)
        self.namespace_index = idx
        await self._build(server, idx)
        try:
            await server.start()
        except OSError as exc:
            with contextlib.suppress(Exception):
                await server.stop()
            raise OSError(f"opcua: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        if self.port == 0 and server.bserver is not None:
            self.port = int(server.bserver.port)
        self._server = server
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever(), name="opcua-refresh")
        log.info(
            "opcua: server certificate %s (thumbprint %s); copy it into an agent's security.trust_dir "
            "to connect with Basic256Sha256",
            cert,
            thumbprint(_load_cert(cert)),
        )

    def _certificate(self) -> tuple[Path, Path]:
        """The server's certificate pair in cert_dir, made on first use and kept for the next start."""
        cert = self.certificate_path
        key = cert.parent / KEY_FILE
        if not (cert.exists() and key.exists()):
            generate_certificate(
                cert,
                key,
                application_uri=APPLICATION_URI,
                hostname=socket.gethostname(),
                purpose=CertPurpose.SERVER,
                overwrite=True,
            )
        return cert, key

    async def _build(self, server: Server, idx: int) -> None:
        skid = await server.nodes.objects.add_object(
            ua.NodeId(ua.String("PumpSkid"), ua.Int16(idx)), ua.QualifiedName("PumpSkid", idx)
        )
        first = _variables(self._plant.state, dt.datetime.now(dt.UTC))
        first["Model"] = ua.Variant(MODEL, ua.VariantType.String)
        first["FaultReset"] = ua.Variant(False, ua.VariantType.Boolean)
        for name, variant in first.items():
            node: Node = await skid.add_variable(
                ua.NodeId(ua.String(f"PumpSkid.{name}"), ua.Int16(idx)),
                ua.QualifiedName(name, idx),
                variant,
                datatype=None,
            )
            if name in ("PumpRun", "FaultReset"):
                await node.set_writable()
            self._nodes[name] = node.nodeid
        for signal in SIGNALS:
            name = node_name(signal)
            await server.get_node(self._nodes[name]).add_property(
                ua.NodeId(ua.String(f"PumpSkid.{name}.EngineeringUnits"), ua.Int16(idx)),
                ua.QualifiedName("EngineeringUnits", 0),
                ua.Variant(engineering_units(UNITS[signal]), ua.VariantType.ExtensionObject),
                datatype=ua.NodeId(ua.Int32(ua.ObjectIds.EUInformation)),
            )

    async def stop(self) -> None:
        """Stop refreshing and close the server and every client connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh)
            await self.apply_writes()
            await self.refresh()

    async def apply_writes(self) -> None:
        """Pass client writes of PumpRun and FaultReset on to the plant."""
        server = self._server
        if server is None:
            return
        run = server.read_attribute_value(self._nodes["PumpRun"]).Value
        if run is not None and self._pump_run_written is not None and bool(run.Value) != self._pump_run_written:
            self._plant.pump_run = bool(run.Value)
            log.info("opcua: a client set PumpRun to %s", bool(run.Value))
        reset = server.read_attribute_value(self._nodes["FaultReset"]).Value
        if reset is not None and reset.Value:
            self._plant.reset_faults()
            await server.write_attribute_value(
                self._nodes["FaultReset"], ua.DataValue(ua.Variant(False, ua.VariantType.Boolean))
            )

    async def refresh(self) -> None:
        """Write the plant's latest tick into the variables, stamped with the current time."""
        server = self._server
        state = self._plant.state
        if server is None or state.tick == self._image_tick:
            return
        now = cast(ua.DateTime, dt.datetime.now(dt.UTC))
        for name, variant in _variables(state, now).items():
            dv = ua.DataValue(variant, SourceTimestamp=now, ServerTimestamp=now)
            await server.write_attribute_value(self._nodes[name], dv)
        self._pump_run_written = state.pump_run
        self._image_tick = state.tick
