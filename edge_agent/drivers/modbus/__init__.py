"""Modbus TCP, RTU over TCP and serial RTU (pymodbus): the `modbus` device type."""

from edge_agent.drivers.base import DriverPlugin
from edge_agent.drivers.modbus.config import ModbusDevice

PLUGIN = DriverPlugin(
    key="modbus",
    config=ModbusDevice,
    runtime="edge_agent.drivers.modbus.driver:ModbusDriver",
    extra="modbus",
    library="pymodbus",
    simulator="edge_agent.simulate.modbus_server:ModbusPlantServer",
    simulator_port=5020,
)
