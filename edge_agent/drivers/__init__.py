"""Protocol drivers. Importing this package registers every built-in driver."""

from edge_agent.drivers import (
    modbus,  # noqa: F401  (registers the driver)
    opcua,  # noqa: F401
    s7,  # noqa: F401
)
from edge_agent.drivers.base import REGISTRY, DeviceBase, Driver, DriverPlugin, ScanGroup, TagBase

__all__ = ["REGISTRY", "DeviceBase", "Driver", "DriverPlugin", "ScanGroup", "TagBase"]
