"""OPC UA (asyncua): the `opcua` device type, read by polling or by subscription."""

from edge_agent.drivers.base import DriverPlugin
from edge_agent.drivers.opcua.config import OpcUaDevice

PLUGIN = DriverPlugin(
    key="opcua",
    config=OpcUaDevice,
    runtime="edge_agent.drivers.opcua.driver:OpcUaDriver",
    extra="opcua",
    library="asyncua",
    simulator="edge_agent.simulate.opcua_server:OpcUaPlantServer",
    simulator_port=4840,
)
