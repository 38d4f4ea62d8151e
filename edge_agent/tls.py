"""TLS to an MQTT broker, shared by the publisher (`mqtt.tls`) and the MQTT input driver (a device's `tls`).

The config model and the SSL context it describes; pydantic and the standard library only, so the config
schema and the drivers (which sit below it) can both use it.
"""

from __future__ import annotations

import ssl
from enum import StrEnum
from pathlib import Path

from pydantic import Field, model_validator

from edge_agent.errors import EdgeAgentError
from edge_agent.fields import StrictModel


class TlsVerify(StrEnum):
    """Whether the broker's certificate and hostname are checked."""

    FULL = "full"
    NONE = "none"  # test benches only


class TlsSection(StrictModel):
    """TLS to the broker: the CA that signed its certificate, an optional client certificate, verification."""

    ca: Path | None = Field(None, description="CA certificates (PEM) that signed the broker's; default: the system's")
    cert: Path | None = Field(None, description="client certificate (PEM), for brokers that require one")
    key: Path | None = Field(None, description="the client certificate's private key (PEM); may be inside cert")
    verify: TlsVerify = Field(TlsVerify.FULL, description="full: certificate chain and hostname; none: test benches")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsSection:
        if self.key is not None and self.cert is None:
            raise ValueError("key is set without cert: give the client certificate too")
        return self


class TlsSetupError(EdgeAgentError):
    """A TLS file that cannot be read or used; the message starts with the field it blames (`mqtt.tls.ca: …`)."""


def client_context(tls: TlsSection | None, where: str) -> ssl.SSLContext:
    """The client TLS context `tls` asks for (reads the CA, certificate and key files); `where` prefixes field names."""
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca) if tls is not None and tls.ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"{where}.ca: cannot use {tls.ca if tls else 'the system CAs'}: {exc}") from None
    if tls is not None and tls.cert is not None:
        try:
            ctx.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError(f"{where}.cert: cannot use {tls.cert} (key {tls.key}): {exc}") from None
    if tls is not None and tls.verify is TlsVerify.NONE:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
