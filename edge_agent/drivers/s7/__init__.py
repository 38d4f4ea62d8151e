"""Siemens S7 over ISO-on-TCP (python-snap7): the `s7` device type."""

import logging

from edge_agent.drivers.base import DriverPlugin
from edge_agent.drivers.s7.config import S7Device


def _quiet_snap7() -> None:
    """python-snap7 logs every connect, disconnect and PDU negotiation at INFO; the driver reports those."""
    lib = logging.getLogger("snap7")
    if lib.level == logging.NOTSET:
        lib.setLevel(logging.WARNING)


_quiet_snap7()  # at registration, as before the split: a logger level only, python-snap7 is not imported

PLUGIN = DriverPlugin(
    key="s7",
    config=S7Device,
    runtime="edge_agent.drivers.s7.driver:S7Driver",
    extra="s7",
    library="snap7",
    simulator="edge_agent.simulate.s7_server:S7PlantServer",
    simulator_port=1102,
)
