"""Publishing events: payloads now; the MQTT client and outbox arrive with the MQTT issue."""
