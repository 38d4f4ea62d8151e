"""OPC UA device and tag config: node ids as engineers write them, modes, security and identity.

Imports no protocol library: loading a config never needs asyncua. The certificate checks that
check_files() runs import cryptography (through certs) when a device names certificates.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast
from urllib.parse import quote, unquote

from pydantic import Field, PlainSerializer, PlainValidator, SecretStr, field_validator, model_validator

from edge_agent.drivers.base import DeadbandType, DeviceBase, TagBase
from edge_agent.errors import FieldError
from edge_agent.fields import StrictModel

if TYPE_CHECKING:
    from asyncua import ua
    from cryptography import x509


# ---------------------------------------------------------------- node ids

_NODE_HELP = (
    "write ns=<index>;s=<name>, ns=<index>;i=<number>, ns=<index>;g=<GUID>, ns=<index>;b=<base64> "
    "or nsu=<namespace URI>;s=<name> (namespace 0 may be left out: i=2258)"
)
_GUID_RE = re.compile(r"^\{?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\}?$")
_DIGITS_RE = re.compile(r"^[0-9]+$")
MAX_NODE_ID_LENGTH = 4096  # OPC UA Part 3: string and opaque identifiers up to 4096 characters / bytes
NodeKind = Literal["i", "s", "g", "b"]


@dataclass(frozen=True, slots=True)
class NodeRef:
    """A parsed node id: its identifier and a namespace given by index or by URI."""

    kind: NodeKind
    identifier: int | str | uuid.UUID | bytes
    ns: int | None = 0  # None when the namespace is named by `uri`
    uri: str | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text or format_node_id(self)

    def resolve(self, namespaces: Sequence[str]) -> ua.NodeId | None:
        """The node id on a server with this namespace array; None when the server lacks the URI."""
        from asyncua import ua  # imported here: loading a config must not import asyncua

        ns = self.ns
        if self.uri is not None:
            ns = namespaces.index(self.uri) if self.uri in namespaces else None
        if ns is None:
            return None
        return ua.NodeId(cast(Any, self.identifier), ua.Int16(ns))


def format_node_id(ref: NodeRef) -> str:
    """The standard text form of a node id (ns=2;s=…, nsu=urn:…;i=…)."""
    if isinstance(ref.identifier, bytes):
        ident = base64.b64encode(ref.identifier).decode("ascii")
    else:
        ident = str(ref.identifier)
    if ref.uri is not None:
        # ';' and '%' inside the URI are percent-escaped (OPC UA Part 6, 5.3.1.11)
        return f"nsu={quote(ref.uri, safe=':/?#[]@!$&()*+,=-._~')};{ref.kind}={ident}"
    prefix = f"ns={ref.ns};" if ref.ns else ""
    return f"{prefix}{ref.kind}={ident}"


def parse_node_id(value: Any) -> NodeRef:
    """Parse `ns=2;s=Tank.Level`, `ns=3;i=1001`, `ns=2;g=<GUID>`, `ns=2;b=<base64>`, `nsu=urn:…;s=…`, `i=2258`."""
    if isinstance(value, NodeRef):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a node id: {_NODE_HELP}; quote it in YAML")
    text, rest = value, value
    ns: int | None = 0
    uri: str | None = None
    if rest.startswith("nsu="):
        uri_text, sep, rest = rest[4:].partition(";")
        if not sep:
            raise ValueError(f"{text!r}: the namespace URI must be followed by ;s=…, ;i=…, ;g=… or ;b=…")
        uri, ns = unquote(uri_text), None
        if not uri.strip():
            raise ValueError(f"{text!r}: the namespace URI is empty")
    elif rest.startswith("ns="):
        index, sep, rest = rest[3:].partition(";")
        if not sep or not _DIGITS_RE.match(index):
            raise ValueError(
                f"{text!r}: ns= takes a namespace index (0 to 65535) followed by ;, e.g. ns=2;s=Tank.Level"
            )
        ns = int(index)
        if ns > 65535:
            raise ValueError(f"{text!r}: namespace index {ns} is out of range: 0 to 65535")
    if len(rest) < 2 or rest[1] != "=" or rest[0] not in "isgb":
        if rest[:2].lower() in ("i=", "s=", "g=", "b=") or rest[:3].lower() in ("ns=", "nsu"):
            raise ValueError(f"{text!r}: node id keys are lower case: ns=, nsu=, i=, s=, g=, b=")
        raise ValueError(f"{text!r} is not a node id: {_NODE_HELP}")
    kind, ident = rest[0], rest[2:]
    identifier: int | str | uuid.UUID | bytes
    if kind == "i":
        if not _DIGITS_RE.match(ident) or int(ident) > 0xFFFFFFFF:
            raise ValueError(f"{text!r}: a numeric identifier (i=) is a whole number from 0 to 4294967295")
        identifier = int(ident)
    elif kind == "s":
        if not ident:
            raise ValueError(f"{text!r}: the string identifier after s= is empty")
        if len(ident) > MAX_NODE_ID_LENGTH:
            raise ValueError(f"{text[:40]!r}…: a string identifier has at most {MAX_NODE_ID_LENGTH} characters")
        identifier = ident
    elif kind == "g":
        m = _GUID_RE.match(ident)
        if not m or (ident.startswith("{") != ident.endswith("}")):
            raise ValueError(f"{text!r}: a GUID identifier looks like g=09087e75-8e5e-499b-954f-f2a9603db28a")
        identifier = uuid.UUID(m.group(1))
    else:
        try:
            raw = base64.b64decode(ident, validate=True)
        except ValueError:
            raw = b""
        if not raw:
            raise ValueError(
                f"{text!r}: an opaque identifier (b=) is non-empty base64, e.g. b=M/RbKBsRVkePCePcx24oRA=="
            )
        if len(raw) > MAX_NODE_ID_LENGTH:
            raise ValueError(f"{text[:40]!r}…: an opaque identifier has at most {MAX_NODE_ID_LENGTH} bytes")
        identifier = raw
    return NodeRef(kind, identifier, ns, uri, text)  # type: ignore[arg-type]


NodeId = Annotated[NodeRef, PlainValidator(parse_node_id), PlainSerializer(str)]


# ---------------------------------------------------------------- config


class Mode(StrEnum):
    """How values are fetched."""

    READ = "read"  # the Read service on each tag's poll interval
    SUBSCRIBE = "subscribe"  # monitored items: the server sends changes


class SecurityPolicy(StrEnum):
    """Message security policy of the secure channel."""

    NONE = "None"
    BASIC256SHA256 = "Basic256Sha256"


class SecurityMode(StrEnum):
    """What the policy does to each message."""

    SIGN = "Sign"
    SIGN_AND_ENCRYPT = "SignAndEncrypt"


class Timestamps(StrEnum):
    """Which time a subscribed data change is stored under."""

    SOURCE = "source"  # when the value changed at its source (else the server's time, else arrival)
    SERVER = "server"  # when the server saw it
    AGENT = "agent"  # when the agent received it (for servers whose clocks cannot be trusted)


class Security(StrictModel):
    """The secure channel: policy, mode, this agent's certificate, and which servers it trusts."""

    policy: SecurityPolicy = SecurityPolicy.NONE
    mode: SecurityMode = Field(SecurityMode.SIGN_AND_ENCRYPT, description="Sign or SignAndEncrypt")
    certificate: Path | None = Field(None, description="this agent's certificate (DER or PEM)")
    private_key: Path | None = Field(None, description="its private key (PEM or DER, unencrypted)")
    trust_dir: Path | None = Field(None, description="folder of trusted server (or CA) certificates")
    rejected_dir: Path | None = Field(
        None, description="where refused server certificates are saved; default: trust_dir/../rejected"
    )
    application_uri: str | None = Field(None, description="must be the URI in the certificate (the default)")

    @model_validator(mode="after")
    def _fields_fit_policy(self) -> Security:
        if self.policy is SecurityPolicy.NONE:
            for name in ("mode", "certificate", "private_key", "trust_dir", "rejected_dir"):
                if name in self.model_fields_set:
                    raise FieldError(name, "applies to policy Basic256Sha256; policy None neither signs nor encrypts")
            return self
        if self.certificate is None:
            raise FieldError(
                "certificate",
                f"policy {self.policy} needs this agent's certificate and private_key "
                "(edge-agent opcua gen-cert makes a pair)",
            )
        if self.private_key is None:
            raise FieldError("private_key", "required with certificate: the certificate's private key file")
        if self.trust_dir is None:
            raise FieldError(
                "trust_dir",
                f"policy {self.policy} needs a folder of trusted server certificates; an unchecked server "
                "could be anyone (put the server's certificate file in that folder)",
            )
        return self


class Auth(StrictModel):
    """Who the session runs as: anonymous (default), a user name and password, or a user certificate."""

    username: str | None = Field(None, min_length=1)
    password: SecretStr | None = None
    password_file: Path | None = Field(None, description="file holding the password (container secrets)")
    certificate: Path | None = Field(None, description="user certificate for X.509 identity (DER or PEM)")
    private_key: Path | None = Field(None, description="its private key")

    @model_validator(mode="after")
    def _one_identity(self) -> Auth:
        if self.username is not None:
            if self.certificate is not None:
                raise FieldError("certificate", "give username/password or a user certificate, not both")
            if self.password is not None and self.password_file is not None:
                raise FieldError("password_file", "give password or password_file, not both")
            if self.password is None and self.password_file is None:
                raise FieldError("username", "needs password or password_file (password: '' for an empty one)")
            return self
        for name in ("password", "password_file"):
            if getattr(self, name) is not None:
                raise FieldError(name, "applies with username; set auth.username too")
        if self.certificate is not None and self.private_key is None:
            raise FieldError("private_key", "required with auth.certificate: the user certificate's private key")
        if self.private_key is not None and self.certificate is None:
            raise FieldError("certificate", "auth.private_key needs auth.certificate, the user certificate")
        return self


class OpcUaTag(TagBase):
    """One variable on an OPC UA server."""

    node: NodeId = Field(description="node id: ns=2;s=…, ns=2;i=…, ns=2;g=…, ns=2;b=…, nsu=<URI>;s=…")
    index: int | None = Field(None, ge=0, le=2**31 - 1, description="element of an array value (0-based)")
    queue_size: int = Field(1, ge=1, le=10000, description="subscribe mode: changes the server keeps between publishes")

    def where(self) -> str:
        """The node id as written."""
        return str(self.node)

    @property
    def server_span(self) -> bool:
        """A percent deadband without `range` rests on the node's EURange (subscribe mode: the server filters)."""
        return True


_ENDPOINT_RE = re.compile(r"^opc\.tcp://(\[[0-9A-Fa-f:.]+\]|[^\s/:@\[\]]+)(?::(\d{1,5}))?(/\S*)?$")


class OpcUaDevice(DeviceBase):
    """An OPC UA server, read by polling or by subscription."""

    type: Literal["opcua"]
    endpoint: str = Field(description="opc.tcp://host:4840/path")
    mode: Mode = Mode.READ
    timestamps: Timestamps = Field(Timestamps.SOURCE, description="subscribe mode: which time a change is stored under")
    security: Security = Security()
    auth: Auth = Auth()
    max_nodes_per_read: int | None = Field(
        None, ge=1, le=100_000, description="nodes per Read request; the server's own MaxNodesPerRead applies too"
    )
    tags: list[OpcUaTag] = Field(min_length=1)

    @field_validator("endpoint")
    @classmethod
    def _endpoint_ok(cls, v: str) -> str:
        if "@" in v.partition("://")[2].partition("/")[0]:
            raise ValueError("credentials do not go into the endpoint: use auth.username and auth.password_file")
        m = _ENDPOINT_RE.match(v)
        if not m:
            raise ValueError(f"{v!r} is not an OPC UA endpoint: write opc.tcp://HOST:4840 (with an optional /path)")
        if m.group(2) is not None and not 1 <= int(m.group(2)) <= 65535:
            raise ValueError(f"{v!r}: port {m.group(2)} is out of range 1..65535")
        return v

    def check(self) -> list[tuple[tuple[str | int, ...], str]]:
        """The same node twice, subscription settings on a polled device, percent deadbands without a span."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        seen: dict[tuple[str, int | None], int] = {}
        for i, tag in enumerate(self.tags):
            key = (format_node_id(tag.node), tag.index)
            if key in seen:
                first = self.tags[seen[key]]
                what = f"{tag.node}" + (f" index {tag.index}" if tag.index is not None else "")
                problems.append((("tags", i, "node"), f"{what} is already read by tags[{seen[key]}] ({first.name})"))
            seen.setdefault(key, i)
            if self.mode is Mode.READ:
                if "queue_size" in tag.model_fields_set:
                    problems.append((("tags", i, "queue_size"), "applies to mode: subscribe; this device reads"))
                db = tag.deadband
                if db is not None and db.type is DeadbandType.PERCENT and tag.range is None:
                    problems.append(
                        (
                            ("tags", i, "deadband"),
                            "a percent deadband on a device that reads needs the tag's span: give range: [low, high]"
                            " (only a subscription's server applies the node's EURange)",
                        )
                    )
        return problems

    def relative_to(self, base: Path) -> OpcUaDevice:
        """This device with relative file paths (certificates, keys, folders, password file) taken under `base`."""

        def under(model: Security | Auth, names: tuple[str, ...]) -> Any:
            fixed = {n: base / p for n in names if (p := getattr(model, n)) is not None and not p.is_absolute()}
            return model.model_copy(update=fixed) if fixed else model

        security = under(self.security, ("certificate", "private_key", "trust_dir", "rejected_dir"))
        auth = under(self.auth, ("password_file", "certificate", "private_key"))
        if security is self.security and auth is self.auth:
            return self
        return self.model_copy(update={"security": security, "auth": auth})

    def check_files(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Certificates, keys, the trust folder and the password file that cannot be used, read now, not at connect."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for section, owner in (("security", self.security), ("auth", self.auth)):
            if owner.certificate is None or owner.private_key is None:
                continue
            from edge_agent.drivers.opcua import certs  # cryptography: only for devices that name certificates

            cert, why = _try_load(certs.load_certificate, owner.certificate, "a certificate (PEM or DER)")
            if why is not None:
                problems.append(((section, "certificate"), why))
            key, why = _try_load(certs.load_private_key, owner.private_key, "an unencrypted private key (PEM or DER)")
            if why is not None:
                problems.append(((section, "private_key"), why))
            if cert is not None and key is not None and not _same_key(cert, key):
                problems.append(
                    ((section, "private_key"), f"{owner.private_key} is not the key of {owner.certificate}")
                )
            if section == "security" and cert is not None and (uri := _uri_problem(self.security, cert)) is not None:
                problems.append((("security", uri[0]), uri[1]))
        trust = self.security.trust_dir
        if trust is not None:
            try:
                if not trust.is_dir():
                    problems.append(
                        (
                            ("security", "trust_dir"),
                            f"{trust} is not a folder: create it and copy the server's certificate into it",
                        )
                    )
                else:
                    next(trust.iterdir(), None)
            except OSError as exc:
                problems.append((("security", "trust_dir"), f"cannot read {trust}: {_why(exc)}"))
        secret = self.auth.password_file
        if secret is not None:
            try:
                secret.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                problems.append((("auth", "password_file"), f"cannot read the secret {secret}: {_why(exc)}"))
        return problems


def _try_load(load: Callable[[Path], Any], path: Path, what: str) -> tuple[Any, str | None]:
    """(what `load` made of the file, None) or (None, why it could not)."""
    try:
        return load(path), None
    except OSError as exc:
        return None, f"cannot read {path}: {_why(exc)}"
    except (ValueError, TypeError):
        return None, f"{path} is not {what}"


def _same_key(cert: x509.Certificate, key: Any) -> bool:
    from cryptography.hazmat.primitives import serialization

    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki))


def _uri_problem(sec: Security, cert: x509.Certificate) -> tuple[str, str] | None:
    """(field, why) when the application URI the agent would announce is not the one in its certificate.

    Servers compare the two and refuse the session (BadCertificateUriInvalid) with nothing that says which.
    """
    from edge_agent.drivers.opcua import certs

    in_cert = certs.application_uri_of(cert)
    if in_cert is None:
        return "certificate", (
            f"{sec.certificate} holds no application URI (a URI in its subjectAltName), which OPC UA servers "
            "require: make a pair with edge-agent opcua gen-cert --application-uri urn:HOST:edge-agent"
        )
    if sec.application_uri is not None and sec.application_uri != in_cert:
        return "application_uri", (
            f"{sec.application_uri!r} is not the application URI in the certificate {sec.certificate} "
            f"({in_cert!r}), and servers refuse a mismatch: leave application_uri out to use the certificate's, "
            f"or make a matching pair with edge-agent opcua gen-cert --application-uri {sec.application_uri} "
            "--cert … --key …"
        )
    return None


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
