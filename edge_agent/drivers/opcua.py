"""OPC UA driver (asyncua client): config model, node ids, batched reads, subscriptions, security and trust.

`mode: read` polls with the Read service, one request per chunk of the server's MaxNodesPerRead.
`mode: subscribe` creates one subscription per sampling interval; its data changes reach the
buffers under the server's timestamps. asyncua runs the connection (secure channel, session,
publish loop), but Read requests are encoded once and Read and Publish answers are decoded here
from the wire bytes, straight into the batch's columns: asyncua's generic codec builds a DataValue,
a Variant and two datetimes per value, ~15 µs a value, three times the rest of the agent's work.
That path uses a few asyncua internals (see _send_encoded); without them the driver falls back to
asyncua's public read() and decoder.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import math
import re
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, cast
from urllib.parse import quote, unquote

import numpy as np
from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState
from asyncua.common.utils import Buffer
from asyncua.crypto import security_policies, uacrypto
from asyncua.ua.ua_binary import (
    extensionobject_from_binary,
    nodeid_from_binary,
    nodeid_to_binary,
    struct_from_binary,
    struct_to_binary,
    variant_from_binary,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import Field, PlainSerializer, PlainValidator, SecretStr, field_validator, model_validator

from edge_agent import opcua_certs
from edge_agent.drivers.base import DeviceBase, DriverBase, DriverPlugin, ScanGroup, TagBase
from edge_agent.errors import DeviceError, FieldError
from edge_agent.fields import StrictModel
from edge_agent.types import Quality, SampleBatch, Value

log = logging.getLogger(__name__)

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


class DeadbandType(StrEnum):
    """How far a value must move before the server reports it."""

    ABSOLUTE = "absolute"  # in the value's own unit
    PERCENT = "percent"  # of the node's EURange (the server must know it)


class Deadband(StrictModel):
    """A data-change filter: smaller changes are not sent."""

    type: DeadbandType
    value: float = Field(ge=0, description="threshold: in the value's unit, or percent of its EURange")

    @model_validator(mode="after")
    def _percent_range(self) -> Deadband:
        if self.type is DeadbandType.PERCENT and self.value > 100:
            raise FieldError("value", f"a percent deadband is 0 to 100, not {self.value:g}")
        return self


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
    deadband: Deadband | None = Field(None, description="subscribe mode: changes smaller than this are not sent")
    queue_size: int = Field(1, ge=1, le=10000, description="subscribe mode: changes the server keeps between publishes")

    def where(self) -> str:
        """The node id as written."""
        return str(self.node)


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
        """The same node twice, and subscription settings on a polled device."""
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
                for name in ("deadband", "queue_size"):
                    if name in tag.model_fields_set:
                        problems.append((("tags", i, name), "applies to mode: subscribe; this device reads"))
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
            cert, why = _try_load(opcua_certs.load_certificate, owner.certificate, "a certificate (PEM or DER)")
            if why is not None:
                problems.append(((section, "certificate"), why))
            key, why = _try_load(
                opcua_certs.load_private_key, owner.private_key, "an unencrypted private key (PEM or DER)"
            )
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
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki))


def _uri_problem(sec: Security, cert: x509.Certificate) -> tuple[str, str] | None:
    """(field, why) when the application URI the agent would announce is not the one in its certificate.

    Servers compare the two and refuse the session (BadCertificateUriInvalid) with nothing that says which.
    """
    in_cert = opcua_certs.application_uri_of(cert)
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


# ---------------------------------------------------------------- values

_EPOCH_TICKS = 116_444_736_000_000_000  # 100 ns ticks from 1601-01-01 (OPC UA's epoch) to 1970-01-01
_KIND = {1: "bool", 2: "int", 3: "int", 4: "int", 5: "int", 6: "int", 7: "int", 8: "int", 9: "int", 10: "float"}
_KIND[11] = "float"
_TYPE_NAMES = {t.value: t.name for t in ua.VariantType}
_EXACT_LIMIT = 2**53  # integers beyond this do not survive float64


class _Unusable(Exception):
    """A value with a good status that cannot become a sample (an array, a structure, …)."""


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _pick(v: Any, index: int | None, ranged: bool) -> Any:
    """One element of an array value, for a tag with `index`; `ranged`: the request carried IndexRange `index`."""
    if index is None:
        raise _Unusable(f"is an array of {len(v)} values; set index: N on the tag to read one element")
    n = len(v)
    if n == 1 and ranged:
        return v[0]  # the server applied the IndexRange and sent just that element
    if index < n:
        return v[index]  # the whole array: the server ignored the IndexRange (or none was asked for)
    raise _Unusable(f"has no element {index}: the array has {n}")


def _convert(vt: int, v: Any) -> tuple[float, Value | None, str]:
    """(float for the buffers, exact value or None, kind) of one scalar; DateTime arrives as epoch seconds."""
    kind = _KIND.get(vt)
    if kind == "float":
        return float(v), None, kind
    if kind == "int":
        return float(v), (int(v) if not -_EXACT_LIMIT <= v <= _EXACT_LIMIT else None), kind
    if kind == "bool":
        return (1.0 if v else 0.0), None, kind
    if vt == 12:
        if v is None:
            raise _Unusable("is a null string")
        return math.nan, str(v), "str"
    if vt == 13:
        if v is None or v <= -11_644_473_600.0:  # DateTime 0: OPC UA's null time
            raise _Unusable("is a null DateTime")
        return float(v), _iso(v), "str"
    if vt == 0:
        raise _Unusable("has no value (null)")
    raise _Unusable(f"has type {_TYPE_NAMES.get(vt, vt)}, not a number, boolean, string or DateTime")


def _from_datavalue(dv: ua.DataValue) -> tuple[int, int, Any, bool]:
    """(status, variant type, value, is_array) of a decoded DataValue; DateTime as epoch seconds."""
    status = dv.StatusCode.value if dv.StatusCode is not None else 0
    var = dv.Value
    if var is None or var.VariantType is None:
        return status, 0, None, False
    vt, v = var.VariantType.value, var.Value
    if vt == 13:
        v = [_epoch(x) for x in v] if var.is_array else _epoch(v)
    return status, vt, v, bool(var.is_array)


def _epoch(d: dt.datetime | None) -> float | None:
    if d is None:
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    return d.timestamp()


# fixed-size scalars on the wire, by variant type id (13: DateTime, 100 ns ticks since 1601)
_FIXED: dict[int, struct.Struct] = {
    vt: struct.Struct(fmt)
    for vt, fmt in enumerate(("<?", "<b", "<B", "<h", "<H", "<i", "<I", "<q", "<Q", "<f", "<d", "", "<q"), start=1)
    if fmt
}
_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")
_U32 = struct.Struct("<I")
_READ_REQUEST = nodeid_to_binary(ua.FourByteNodeId(ua.Int32(ua.ObjectIds.ReadRequest_Encoding_DefaultBinary)))
_PUBLISH_REQUEST = nodeid_to_binary(ua.FourByteNodeId(ua.Int32(ua.ObjectIds.PublishRequest_Encoding_DefaultBinary)))
_PUBLISH_RESPONSE = ua.FourByteNodeId(ua.Int32(ua.ObjectIds.PublishResponse_Encoding_DefaultBinary))
_DATA_CHANGE = ua.FourByteNodeId(ua.Int32(ua.ObjectIds.DataChangeNotification_Encoding_DefaultBinary))
_READ_RESPONSE = ua.FourByteNodeId(ua.Int32(ua.ObjectIds.ReadResponse_Encoding_DefaultBinary))
# DataValue fields after the variant, by mask bit: status, source ts, server ts, source ps, server ps
_TAIL_BYTES = [sum(n for bit, n in ((2, 4), (4, 8), (8, 8), (16, 2), (32, 2)) if m & bit) for m in range(64)]


def _variant(raw: bytes, pos: int) -> tuple[int, Any, bool, int]:
    """(variant type, value, is_array, next position) of the Variant at `pos`; DateTime as epoch seconds.

    Scalars of the builtin types are unpacked here; anything else (arrays, structures, localized
    text, …) goes through asyncua's variant decoder.
    """
    enc = raw[pos]
    vt = enc & 0x3F
    if enc & 0xC0 == 0:
        s = _FIXED.get(vt)
        if s is not None:
            v = s.unpack_from(raw, pos + 1)[0]
            if vt == 13:
                v = (v - _EPOCH_TICKS) / 1e7 if v > 0 else None
            return vt, v, False, pos + 1 + s.size
        if vt == 12:
            (n,) = _I32.unpack_from(raw, pos + 1)
            if n < 0:
                return vt, None, False, pos + 5
            return vt, raw[pos + 5 : pos + 5 + n].decode("utf-8", "replace"), False, pos + 5 + n
    vbuf = Buffer(raw, pos)
    var = variant_from_binary(vbuf)
    _, vt, v, is_array = _from_datavalue(ua.DataValue(var))
    return vt, v, is_array, vbuf.cur_pos


def _ticks(raw: bytes, pos: int) -> float | None:
    (t,) = _I64.unpack_from(raw, pos)
    return (t - _EPOCH_TICKS) / 1e7 if t > 0 else None


def _header(raw: bytes, expected: ua.NodeId) -> tuple[int, int]:
    """Check the type id, decode the ResponseHeader: (service result, position after it)."""
    buf = Buffer(raw)
    type_id = nodeid_from_binary(buf)
    if type_id != expected:
        raise ua.UaError(f"expected type {expected}, got {type_id}")
    header = struct_from_binary(ua.ResponseHeader, buf)
    return header.ServiceResult.value, buf.cur_pos


def decode_read_response(raw: bytes) -> tuple[int, list[tuple[int, int, Any, bool]]]:
    """Decode a Read response body: (service result, [(status, variant type, value, is_array)] per node).

    Timestamps are skipped: polled values take the read time.
    """
    service, pos = _header(raw, _READ_RESPONSE)
    (count,) = _I32.unpack_from(raw, pos)
    pos += 4
    out: list[tuple[int, int, Any, bool]] = []
    append = out.append
    tail = _TAIL_BYTES
    variant = _variant
    for _ in range(max(count, 0)):
        mask = raw[pos]
        pos += 1
        vt, v, is_array = 0, None, False
        if mask & 1:
            vt, v, is_array, pos = variant(raw, pos)
        status = 0
        if mask & 2:
            (status,) = _U32.unpack_from(raw, pos)
        pos += tail[mask & 0x3F]
        append((status, vt, v, is_array))
    return service, out


Change = tuple[
    int, int, int, Any, bool, float | None, float | None
]  # handle, status, type, value, array, source, server


@dataclass
class DataChanges:
    """The monitored items of one DataChangeNotification, decoded here."""

    items: list[Change]


@dataclass
class _Message:
    SequenceNumber: int
    NotificationData: list[Any]


@dataclass
class _PublishResult:
    SubscriptionId: int
    NotificationMessage: _Message


@dataclass
class _PublishResponse:
    Parameters: _PublishResult  # the shape asyncua's publish loop reads


def decode_publish_response(raw: bytes) -> _PublishResponse:
    """Decode a Publish response body; data changes become DataChanges, other notifications asyncua objects."""
    service, pos = _header(raw, _PUBLISH_RESPONSE)
    if service >> 31:
        raise ua.UaStatusCodeError(service)  # BadTimeout, BadNoSubscription: the publish loop knows these
    (sub_id,) = _U32.unpack_from(raw, pos)
    (n,) = _I32.unpack_from(raw, pos + 4)
    pos += 8 + 4 * max(n, 0) + 1  # available sequence numbers, MoreNotifications
    (seq,) = _U32.unpack_from(raw, pos)
    (n_data,) = _I32.unpack_from(raw, pos + 12)  # after the PublishTime
    pos += 16
    data: list[Any] = []
    for _ in range(max(n_data, 0)):
        start = pos
        tbuf = Buffer(raw, pos)
        type_id = nodeid_from_binary(tbuf)
        pos = tbuf.cur_pos
        if raw[pos] != 1 or type_id != _DATA_CHANGE:
            ebuf = Buffer(raw, start)
            data.append(extensionobject_from_binary(ebuf))
            pos = ebuf.cur_pos
            continue
        (length,) = _I32.unpack_from(raw, pos + 1)
        end = pos + 5 + length
        (m,) = _I32.unpack_from(raw, pos + 5)
        pos += 9
        items: list[Change] = []
        for _ in range(max(m, 0)):
            (handle,) = _U32.unpack_from(raw, pos)
            mask = raw[pos + 4]
            pos += 5
            vt, v, is_array = 0, None, False
            if mask & 1:
                vt, v, is_array, pos = _variant(raw, pos)
            status = src = srv = None
            if mask & 2:
                (status,) = _U32.unpack_from(raw, pos)
                pos += 4
            # OPC UA Part 6 order: source timestamp, source picoseconds, server timestamp, server picoseconds
            if mask & 4:
                src = _ticks(raw, pos)
                pos += 8
            if mask & 16:
                pos += 2
            if mask & 8:
                srv = _ticks(raw, pos)
                pos += 8
            if mask & 32:
                pos += 2
            items.append((handle, status or 0, vt, v, is_array, src, srv))
        data.append(DataChanges(items))
        pos = end
    return _PublishResponse(_PublishResult(sub_id, _Message(seq, data)))


def _change(item: ua.MonitoredItemNotification) -> Change:
    """The same tuple from an item asyncua decoded (its fallback path, and inform_subscriptions)."""
    status, vt, v, is_array = _from_datavalue(item.Value)
    return (
        item.ClientHandle,
        status,
        vt,
        v,
        is_array,
        _epoch(item.Value.SourceTimestamp),
        _epoch(item.Value.ServerTimestamp),
    )


# ---------------------------------------------------------------- runtime

_SERVER_LIMITS = (
    ua.ObjectIds.Server_NamespaceArray,
    ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
    ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
)
_TOO_BIG = {
    ua.StatusCodes.BadTooManyOperations,
    ua.StatusCodes.BadResponseTooLarge,
    ua.StatusCodes.BadEncodingLimitsExceeded,
}
_IDENTITY_REFUSED = {
    ua.StatusCodes.BadUserAccessDenied,
    ua.StatusCodes.BadIdentityTokenRejected,
    ua.StatusCodes.BadIdentityTokenInvalid,
}
_CERT_REFUSED = {
    ua.StatusCodes.BadSecurityChecksFailed,
    ua.StatusCodes.BadCertificateUntrusted,
    ua.StatusCodes.BadCertificateInvalid,
    ua.StatusCodes.BadCertificateUriInvalid,
    ua.StatusCodes.BadCertificateUseNotAllowed,
    ua.StatusCodes.BadCertificateTimeInvalid,
    ua.StatusCodes.BadCertificateIssuerTimeInvalid,
    ua.StatusCodes.BadCertificateRevocationUnknown,
    ua.StatusCodes.BadCertificateIssuerRevocationUnknown,
    ua.StatusCodes.BadCertificateRevoked,
    ua.StatusCodes.BadSecurityPolicyRejected,
}
_FILTER_REFUSED = {
    ua.StatusCodes.BadFilterNotAllowed,
    ua.StatusCodes.BadMonitoredItemFilterInvalid,
    ua.StatusCodes.BadMonitoredItemFilterUnsupported,
    ua.StatusCodes.BadDeadbandFilterInvalid,
}
MONITORED_ITEMS_PER_CALL = 1000  # when the server states no limit: keeps each request a modest size
KEEPALIVE_TARGET = 5.0  # seconds between keep-alives of a quiet subscription
SESSION_TIMEOUT = 30.0  # seconds a server keeps our session after the agent vanishes: sessions are scarce on PLCs
SUPERVISOR_PROBE = 10.0  # asyncua's own liveness read; also keeps the session alive between slow polls
Sink = Callable[[SampleBatch], None]


@dataclass
class _Chunk:
    """One Read request of a group, encoded once per connection: only its header changes per send."""

    params: ua.ReadParameters
    cols: list[int]
    encoded: bytes = b""  # the binary ReadParameters (asyncua's generic encoder: ~4 µs a node)
    header: ua.RequestHeader = field(default_factory=ua.RequestHeader)

    @classmethod
    def of(cls, nodes: list[ua.ReadValueId], cols: list[int]) -> _Chunk:
        """A chunk reading `nodes` into the group's `cols`."""
        params = ua.ReadParameters()
        params.MaxAge = 0
        params.TimestampsToReturn = ua.TimestampsToReturn.Neither  # polled values take the read time
        params.NodesToRead = nodes
        return cls(params, cols, struct_to_binary(params))


@dataclass
class _Plan:
    chunks: list[_Chunk]
    missing: list[int]  # columns whose namespace URI the server does not have


@dataclass
class _Sub:
    group: ScanGroup
    subscription_id: int = 0
    silence_limit: float = 0.0  # seconds without any publish (data or keep-alive) that mean it is dead
    last_seen: float = field(default_factory=time.monotonic)
    ranged: set[int] = field(default_factory=set)  # columns monitored with an IndexRange


@dataclass
class _Round:
    """The k-th change of each tag in one publish: one batch for the buffers."""

    cols: list[int] = field(default_factory=list)
    vals: list[float] = field(default_factory=list)
    quals: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    exact: dict[int, Value] = field(default_factory=dict)


class OpcUaDriver(DriverBase):
    """Reads one OPC UA server over one session: batched Reads, or subscriptions with data-change filters."""

    def __init__(self, config: OpcUaDevice) -> None:
        super().__init__(config.name)
        self.config = config
        self._tags: dict[ScanGroup, list[OpcUaTag]] = {}
        by_interval: dict[float, list[OpcUaTag]] = {}
        for tag in config.tags:
            by_interval.setdefault(config.interval_of(tag), []).append(tag)
        for interval, tags in sorted(by_interval.items()):
            group = ScanGroup(interval, tuple(t.name for t in tags))
            self._tags[group] = tags
            (self.subscriptions if config.mode is Mode.SUBSCRIBE else self.groups).append(group)
        self._client: Client | None = None
        self._generation = 0  # bumps at every connect/close: late callbacks of an old session are ignored
        self._namespaces: list[str] = []
        self._max_per_read = config.max_nodes_per_read or 0  # 0: no limit known
        self._learned_cap = 0  # a limit found by BadTooManyOperations, kept across reconnects
        self._max_items_per_call = MONITORED_ITEMS_PER_CALL
        self._plans: dict[ScanGroup, _Plan] = {}
        self._subs: dict[int, _Sub] = {}
        self._sub_failure: str | None = None
        self._lost: str | None = None
        self._bad: dict[str, str] = {}  # tag -> why it is not good (logged once)
        self._sink: Sink | None = None
        self._fast = True  # Read requests encoded once and answers decoded here (see _send_encoded)
        self.request_errors = 0
        self._warned_plain_password = False

    # -- planning ------------------------------------------------------------------------

    @property
    def requests_per_cycle(self) -> dict[float, int]:
        """Read requests each polled group sends per cycle (by the server's limit once connected)."""
        out = {}
        for g in self.groups:
            plan = self._plans.get(g)
            if plan is not None:
                out[g.interval] = len(plan.chunks)
            else:
                cap = self._max_per_read or len(g.tags)
                out[g.interval] = math.ceil(len(g.tags) / cap)
        return out

    def plan(self) -> list[str]:
        """Subscribed tags per sampling interval, or Read requests per polled group."""
        lines = [f"{len(g.tags)} tags subscribed (sampling {g.interval:g}s)" for g in self.subscriptions]
        per = self.requests_per_cycle
        lines += [f"{len(g.tags)} tags every {g.interval:g}s in {per[g.interval]} requests" for g in self.groups]
        return lines

    def _plan(self, group: ScanGroup) -> _Plan:
        tags = self._tags[group]
        resolved: list[tuple[int, ua.ReadValueId]] = []
        missing: list[int] = []
        for col, tag in enumerate(tags):
            node = tag.node.resolve(self._namespaces)
            if node is None:
                missing.append(col)
                continue
            rv = ua.ReadValueId(NodeId=node, AttributeId=ua.AttributeIds.Value)
            if tag.index is not None:
                rv.IndexRange = str(tag.index)
            resolved.append((col, rv))
        cap = self._max_per_read or max(1, len(resolved))
        chunks = []
        for start in range(0, len(resolved), cap):
            part = resolved[start : start + cap]
            chunks.append(_Chunk.of([rv for _, rv in part], [c for c, _ in part]))
        return _Plan(chunks, missing)

    # -- connection ----------------------------------------------------------------------

    def _live(self) -> Client:
        client = self._client
        if client is None:
            raise DeviceError(self.name, "not connected")
        if client.uaclient.state is not UaClientState.CONNECTED:
            raise DeviceError(
                self.name, f"connection to {self.config.endpoint} lost" + (f": {self._lost}" if self._lost else "")
            )
        return client

    async def connect(self) -> None:
        """Open the secure channel and session, then learn the namespace array and operation limits."""
        await self.close()
        cfg = self.config
        client = Client(cfg.endpoint, timeout=cfg.timeout, watchdog_intervall=SUPERVISOR_PROBE)
        client.name = "edge-agent"
        client.description = f"edge-agent {cfg.name}"  # the session name operators see in server diagnostics
        client.product_uri = "urn:edge-agent"
        client.session_timeout = int(SESSION_TIMEOUT * 1000)
        self._lost = None

        async def lost(exc: Exception) -> None:
            self._lost = _describe(exc, cfg.timeout)

        client.connection_lost_callback = lost
        try:
            async with asyncio.timeout(cfg.timeout * 8 + 2.0):
                await self._prepare(client)
                await client.connect()
                await self._learn_server(client)
        except DeviceError:
            await _teardown(client, cfg.timeout)
            raise
        except BaseException as exc:
            await _teardown(client, cfg.timeout)
            if isinstance(exc, Exception) and _is_device_failure(exc):
                raise DeviceError(self.name, self._connect_failure(exc)) from exc
            raise
        self._client = client
        self._generation += 1
        self._fast = _fast_path_available(client)
        if not self._fast:
            log.info("device %s: this asyncua lacks the internals of the fast Read path; using its read()", self.name)
        self._plans = {g: self._plan(g) for g in [*self.groups, *self.subscriptions]}
        missing = [t.name for g, p in self._plans.items() for t in (self._tags[g][c] for c in p.missing)]
        if missing:
            uris = sorted({str(t.node.uri) for t in self.config.tags if t.name in set(missing)})
            log.warning(
                "device %s: the server has no namespace %s (it has %s); tags %s read as bad",
                self.name,
                ", ".join(uris),
                ", ".join(self._namespaces),
                ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""),
            )

    async def _prepare(self, client: Client) -> None:
        """Security and identity before the session: load files, check the server's certificate."""
        cfg = self.config
        sec, auth = cfg.security, cfg.auth
        if sec.policy is not SecurityPolicy.NONE:
            assert sec.certificate is not None and sec.private_key is not None and sec.trust_dir is not None
            cert, key_der = await asyncio.to_thread(self._load_pair, sec.certificate, sec.private_key, "security")
            uri = _uri_problem(sec, cert)  # checked at load too; the file may have changed since
            if uri is not None:
                raise DeviceError(self.name, f"security.{uri[0]}: {uri[1]}")
            client.application_uri = opcua_certs.application_uri_of(cert) or "urn:edge-agent"
            policy_cls = security_policies.SecurityPolicyBasic256Sha256
            mode = getattr(ua.MessageSecurityMode, sec.mode.value)
            server_cert = await self._server_certificate(client, policy_cls.URI, mode)
            verdict = await asyncio.to_thread(self._trust_verdict, server_cert)
            if verdict is not None:
                raise DeviceError(self.name, verdict)
            await client.set_security(
                policy_cls,
                certificate=cert.public_bytes(serialization.Encoding.DER),
                private_key=key_der,
                server_certificate=server_cert.public_bytes(serialization.Encoding.DER),
                mode=mode,
            )
        elif sec.application_uri:
            client.application_uri = sec.application_uri
        if auth.username is not None:
            if sec.policy is SecurityPolicy.NONE and not self._warned_plain_password:
                self._warned_plain_password = True
                log.warning(
                    "device %s: user %r logs in over security policy None: the password goes to a server whose "
                    "certificate nobody checked; use policy Basic256Sha256 with a trust_dir",
                    self.name,
                    auth.username,
                )
            client.set_user(auth.username)
            client.set_password(await asyncio.to_thread(self._password))
        elif auth.certificate is not None:
            assert auth.private_key is not None
            user_cert, user_key = await asyncio.to_thread(self._load_pair, auth.certificate, auth.private_key, "auth")
            client.user_certificate = user_cert
            client.user_private_key = serialization.load_der_private_key(user_key, password=None)

    def _load_pair(self, cert_path: Path, key_path: Path, section: str) -> tuple[x509.Certificate, bytes]:
        try:
            cert = opcua_certs.load_certificate(cert_path)
        except (OSError, ValueError) as exc:
            raise DeviceError(self.name, f"{section}.certificate: cannot load {cert_path}: {_why(exc)}") from exc
        try:
            key = opcua_certs.load_private_key(key_path)
        except (OSError, ValueError, TypeError) as exc:
            raise DeviceError(self.name, f"{section}.private_key: cannot load {key_path}: {_why(exc)}") from exc
        der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert, der

    def _password(self) -> str:
        auth = self.config.auth
        if auth.password is not None:
            return auth.password.get_secret_value()
        assert auth.password_file is not None
        try:
            return auth.password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise DeviceError(
                self.name, f"auth.password_file: cannot read the secret {auth.password_file}: {_why(exc)}"
            ) from exc

    async def _server_certificate(
        self, client: Client, policy_uri: str, mode: ua.MessageSecurityMode
    ) -> x509.Certificate:
        endpoints = await client.connect_and_get_server_endpoints()
        for ep in endpoints:
            if ep.SecurityPolicyUri == policy_uri and ep.SecurityMode == mode and ep.ServerCertificate:
                cert: x509.Certificate | None = uacrypto.x509_from_der(ep.ServerCertificate)
                if cert is not None:
                    return cert
        offered = sorted(
            {f"{ep.SecurityPolicyUri.rpartition('#')[2]} {ep.SecurityMode.name.rstrip('_')}" for ep in endpoints}
        )
        sec = self.config.security
        raise DeviceError(
            self.name,
            f"security: the server offers no {sec.policy} {sec.mode} endpoint; "
            f"it offers {', '.join(offered) or 'none'}",
        )

    def _trust_verdict(self, cert: x509.Certificate) -> str | None:
        sec = self.config.security
        assert sec.trust_dir is not None
        folder = opcua_certs.TrustFolder(sec.trust_dir, sec.rejected_dir)
        try:
            why = folder.verdict(cert)
        except OSError as exc:
            return f"security.trust_dir: cannot read {sec.trust_dir}: {_why(exc)}"
        if why is None:
            return None
        saved = folder.reject(cert)
        what = f"the server certificate {opcua_certs.describe(cert)} is not trusted: {why}"
        if saved is None:
            return (
                f"{what}; could not save it into {folder.rejected_dir}: "
                f"get the server's certificate file and copy it into {sec.trust_dir}"
            )
        return f"{what}; it was saved as {saved}: if it is the right server, copy that file into {sec.trust_dir}"

    def _connect_failure(self, exc: Exception) -> str:
        cfg = self.config
        why = _describe(exc, cfg.timeout)
        code = getattr(exc, "code", None)
        if code in _IDENTITY_REFUSED:
            if cfg.auth.username is not None:
                return f"the server refused user {cfg.auth.username!r} ({why}): check auth.username and the password"
            if cfg.auth.certificate is not None:
                return (
                    f"the server refused the user certificate {cfg.auth.certificate} ({why}): "
                    "register it as a user on the server"
                )
            return f"the server refused an anonymous session ({why}): set auth.username or auth.certificate"
        if code == ua.StatusCodes.BadCertificateUriInvalid and cfg.security.policy is not SecurityPolicy.NONE:
            return (
                f"the server refused this agent's certificate {cfg.security.certificate} ({why}): it finds the "
                "application URI in it wrong (some servers want the host name in it too): make a pair with "
                "edge-agent opcua gen-cert --application-uri … --hostname …"
            )
        if code in _CERT_REFUSED and cfg.security.policy is not SecurityPolicy.NONE:
            return (
                f"the server refused this agent's certificate {cfg.security.certificate} ({why}): "
                "trust it on the server (most servers keep refused certificates in a 'rejected' list to approve)"
            )
        return f"cannot connect to {cfg.endpoint}: {why}"

    async def _learn_server(self, client: Client) -> None:
        params = ua.ReadParameters()
        params.NodesToRead = [
            ua.ReadValueId(NodeId=ua.NodeId(ua.Int32(i)), AttributeId=ua.AttributeIds.Value) for i in _SERVER_LIMITS
        ]
        ns, per_read, per_call = [_from_datavalue(dv) for dv in await client.uaclient.read(params)]
        if ns[0] >> 30 or not isinstance(ns[2], list):
            raise DeviceError(self.name, f"cannot read the server's namespace array: {_status_name(ns[0])}")
        self._namespaces = [str(u) for u in ns[2]]
        # a server without OperationLimits answers BadNodeIdUnknown: no stated limit
        limit = int(per_read[2] or 0) if per_read[0] == 0 and per_read[1] in _KIND else 0
        caps = [x for x in (limit, self.config.max_nodes_per_read or 0, self._learned_cap) if x]
        self._max_per_read = min(caps) if caps else 0
        items = int(per_call[2] or 0) if per_call[0] == 0 and per_call[1] in _KIND else 0
        self._max_items_per_call = min(items, MONITORED_ITEMS_PER_CALL) if items else MONITORED_ITEMS_PER_CALL

    async def close(self) -> None:
        """Close the session (deleting its subscriptions) and the connection; safe to call twice."""
        client, self._client = self._client, None
        self._generation += 1
        self._plans = {}
        self._subs = {}
        self._sub_failure = None
        if client is not None:
            await _teardown(client, self.config.timeout)

    # -- reading -------------------------------------------------------------------------

    async def read(self, group: ScanGroup) -> SampleBatch:
        """Read a group (polled or subscribed) with as few Read requests as the server allows."""
        client = self._live()
        ts = time.time()
        n = len(group.tags)
        values = np.full(n, np.nan, dtype=np.float64)
        quality = np.full(n, Quality.BAD, dtype=np.uint8)
        exact: dict[int, Value] = {}
        kinds = ["float"] * n
        problems: list[tuple[int, str]] = []
        tags = self._tags[group]
        plan = self._plans[group]
        for chunk in plan.chunks:
            results = await self._read_chunk(client, group, chunk)
            for col, rv, (status, vt, v, is_array) in zip(chunk.cols, chunk.params.NodesToRead, results, strict=True):
                if status >> 30:  # severity bits: 01 uncertain, 10 and 11 bad
                    quality[col] = Quality.UNCERTAIN if status >> 30 == 1 else Quality.BAD
                    if status >> 31:
                        problems.append((col, f"reads {_status_name(status)}"))
                    continue
                try:
                    if is_array or tags[col].index is not None:
                        v = _pick(v, tags[col].index, bool(rv.IndexRange)) if is_array else _not_array(tags[col].index)
                    values[col], x, kinds[col] = _convert(vt, v)
                except _Unusable as exc:
                    problems.append((col, str(exc)))
                    continue
                quality[col] = Quality.GOOD
                if x is not None:
                    exact[col] = x
        for col in plan.missing:
            problems.append((col, f"is in namespace {tags[col].node.uri}, which the server does not have"))
        if problems or self._bad:
            self._report(tags, problems, np.flatnonzero(quality == Quality.GOOD).tolist())
        return SampleBatch(self.name, ts, group.tags, values, quality, exact, tuple(kinds))

    async def _read_chunk(self, client: Client, group: ScanGroup, chunk: _Chunk) -> list[tuple[int, int, Any, bool]]:
        timeout = self.config.timeout
        try:
            if self._fast:
                body = await _send_encoded(client, _READ_REQUEST, chunk.header, chunk.encoded, timeout)
                service, results = decode_read_response(body)
                if service >> 31:
                    raise ua.UaStatusCodeError(service)
            else:
                results = [_from_datavalue(dv) for dv in await client.uaclient.read(chunk.params)]
        except ua.UaStatusCodeError as exc:
            if exc.code in _TOO_BIG and len(chunk.cols) > 1:
                return await self._split(client, group, chunk, exc)
            raise DeviceError(self.name, f"Read of {len(chunk.cols)} nodes failed: {_describe(exc, timeout)}") from exc
        except (OSError, TimeoutError, ua.UaError, ValueError, IndexError, struct.error) as exc:
            raise DeviceError(self.name, f"Read failed: {_describe(exc, timeout)}") from exc
        if len(results) != len(chunk.cols):
            raise DeviceError(self.name, f"Read of {len(chunk.cols)} nodes answered {len(results)} values")
        return results

    async def _split(
        self, client: Client, group: ScanGroup, chunk: _Chunk, exc: ua.UaStatusCodeError
    ) -> list[tuple[int, int, Any, bool]]:
        """A server that rejects a request as too large without stating its limit: halve the requests from now on."""
        self.request_errors += 1
        half = max(1, len(chunk.cols) // 2)
        self._max_per_read = self._learned_cap = half
        log.warning(
            "device %s: Read of %d nodes refused (%s); reading %d nodes per request from now on",
            self.name,
            len(chunk.cols),
            _status_name(exc.code),
            half,
        )
        nodes = chunk.params.NodesToRead
        out: list[tuple[int, int, Any, bool]] = []
        for start in range(0, len(nodes), half):
            part = _Chunk.of(nodes[start : start + half], chunk.cols[start : start + half])
            out.extend(await self._read_chunk(client, group, part))
        self._plans[group] = self._plan(group)
        return out

    def _report(self, tags: Sequence[OpcUaTag], problems: list[tuple[int, str]], good: Iterable[int]) -> None:
        """Log each tag's trouble once, and its recovery once; a bad node never fails the device."""
        fresh = []
        for col, why in problems:
            name = tags[col].name
            if self._bad.get(name) != why:
                self._bad[name] = why
                fresh.append(
                    f"{name} ({tags[col].node}{f'[{tags[col].index}]' if tags[col].index is not None else ''}) {why}"
                )
        if fresh:
            self.request_errors += len(fresh)
            more = f"; and {len(fresh) - 5} more" if len(fresh) > 5 else ""
            log.warning("device %s: %s%s", self.name, "; ".join(fresh[:5]), more)
        if self._bad:
            for col in good:
                name = tags[col].name
                if name in self._bad:
                    del self._bad[name]
                    log.info("device %s: tag %s reads again", self.name, name)

    # -- subscriptions -------------------------------------------------------------------

    async def subscribe(self, sink: Sink) -> None:
        """One subscription per sampling interval; each publish reaches `sink` as batches of changes."""
        client = self._live()
        self._sink = sink
        generation = self._generation
        if self._fast:
            _install_fast_publish(client, self.name)
        try:
            for group in self.subscriptions:
                await self._subscribe_group(client, group, generation)
        except (OSError, TimeoutError, ua.UaError) as exc:
            raise DeviceError(
                self.name, f"cannot create the subscriptions: {_describe(exc, self.config.timeout)}"
            ) from exc

    async def _subscribe_group(self, client: Client, group: ScanGroup, generation: int) -> None:
        cfg = self.config
        ms = group.interval * 1000.0
        keepalive = max(3, math.ceil(KEEPALIVE_TARGET / group.interval))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=ms,
            RequestedLifetimeCount=keepalive * 10,  # the spec wants at least 3 keep-alive periods
            RequestedMaxKeepAliveCount=keepalive,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        sub = _Sub(group)
        result = await client.uaclient.create_subscription(params, self._on_publish(sub, generation))
        sub.subscription_id = result.SubscriptionId
        revised = max(result.RevisedPublishingInterval, 1.0) / 1000.0
        sub.silence_limit = 2.0 * revised * max(result.RevisedMaxKeepAliveCount, 1) + cfg.timeout + 1.0
        sub.last_seen = time.monotonic()
        self._subs[sub.subscription_id] = sub
        tags = self._tags[group]
        plan = self._plans[group]
        requests: list[tuple[int, ua.MonitoredItemCreateRequest]] = []
        ts_return = {
            Timestamps.SOURCE: ua.TimestampsToReturn.Both,
            Timestamps.SERVER: ua.TimestampsToReturn.Server,
            Timestamps.AGENT: ua.TimestampsToReturn.Neither,
        }[cfg.timestamps]
        for chunk in plan.chunks:
            for col, rv in zip(chunk.cols, chunk.params.NodesToRead, strict=True):
                tag = tags[col]
                mp = ua.MonitoringParameters()
                mp.ClientHandle = col
                mp.SamplingInterval = ms
                mp.QueueSize = tag.queue_size
                mp.DiscardOldest = True
                if tag.deadband is not None:
                    mp.Filter = ua.DataChangeFilter(
                        Trigger=ua.DataChangeTrigger.StatusValue,
                        DeadbandType=(
                            ua.DeadbandType.Absolute
                            if tag.deadband.type is DeadbandType.ABSOLUTE
                            else ua.DeadbandType.Percent
                        ).value,
                        DeadbandValue=tag.deadband.value,
                    )
                if rv.IndexRange:
                    sub.ranged.add(col)
                req = ua.MonitoredItemCreateRequest()
                req.ItemToMonitor = rv
                req.MonitoringMode = ua.MonitoringMode.Reporting
                req.RequestedParameters = mp
                requests.append((col, req))
        problems: list[tuple[int, str]] = [
            (c, f"is in namespace {tags[c].node.uri}, which the server does not have") for c in plan.missing
        ]
        step = self._max_items_per_call
        for start in range(0, len(requests), step):
            part = requests[start : start + step]
            create = ua.CreateMonitoredItemsParameters()
            create.SubscriptionId = sub.subscription_id
            create.TimestampsToReturn = ts_return
            create.ItemsToCreate = [r for _, r in part]
            results = await client.uaclient.create_monitored_items(create)
            for (col, _), res in zip(part, results, strict=True):
                if not res.StatusCode.is_good():
                    problems.append((col, f"cannot be monitored: {res.StatusCode.name}{_filter_hint(tags[col], res)}"))
        if problems:
            cols = [c for c, _ in problems]
            n = len(cols)
            q = np.full(n, Quality.BAD, dtype=np.uint8)
            self._report(tags, problems, ())
            if self._sink is not None:
                self._sink(
                    SampleBatch(self.name, time.time(), tuple(group.tags[c] for c in cols), np.full(n, np.nan), q)
                )

    def _on_publish(self, sub: _Sub, generation: int) -> Callable[[Any], None]:
        def callback(result: Any) -> None:  # a ua.PublishResult, or _PublishResult from decode_publish_response
            if generation != self._generation:
                return  # a late answer for a session already closed
            sub.last_seen = time.monotonic()
            data = result.NotificationMessage.NotificationData
            if not data:
                return  # keep-alive
            try:
                for notification in data:
                    if isinstance(notification, DataChanges):
                        self._deliver(sub, notification.items)
                    elif isinstance(notification, ua.DataChangeNotification):
                        self._deliver(sub, [_change(i) for i in notification.MonitoredItems])
                    elif isinstance(notification, ua.StatusChangeNotification):
                        status = notification.Status
                        if status is not None and not status.is_good():
                            self._sub_failure = f"subscription {sub.subscription_id} ended: {status.name}"
            except Exception:  # the publish loop would swallow it: say once what went wrong
                if self._sub_failure is None:
                    log.exception("device %s: cannot handle a data change", self.name)
                self._sub_failure = "a data change could not be handled (see the log)"

        return callback

    def _deliver(self, sub: _Sub, items: Iterable[Change]) -> None:
        """Turn one publish's data changes into batches: round k holds the k-th change of each tag."""
        group = sub.group
        tags = self._tags[group]
        now = time.time()
        stamp = self.config.timestamps
        # servers list a tag's queued changes together (queue_size > 1); one batch per change would
        # cost a buffer write each, so changes are dealt into rounds, and each tag's order is kept
        rounds: list[_Round] = []
        depth: dict[int, int] = {}
        problems: list[tuple[int, str]] = []
        good: list[int] = []
        for col, status, vt, v, is_array, src, srv in items:
            if col >= len(tags):
                continue
            k = depth.get(col, 0)
            depth[col] = k + 1
            if k == len(rounds):
                rounds.append(_Round())
            r = rounds[k]
            t = now
            if stamp is Timestamps.SOURCE:
                t = src or srv or now
            elif stamp is Timestamps.SERVER:
                t = srv or now
            r.cols.append(col)
            r.times.append(t)
            value, q, kind = math.nan, Quality.BAD, "float"
            if status >> 30:
                q = Quality.UNCERTAIN if status >> 30 == 1 else Quality.BAD
                if status >> 31:
                    problems.append((col, f"reads {_status_name(status)}"))
            else:
                try:
                    if is_array or tags[col].index is not None:
                        v = _pick(v, tags[col].index, col in sub.ranged) if is_array else _not_array(tags[col].index)
                    value, x, kind = _convert(vt, v)
                    q = Quality.GOOD
                    if x is not None:
                        r.exact[len(r.cols) - 1] = x
                except _Unusable as exc:
                    problems.append((col, str(exc)))
            r.vals.append(value)
            r.quals.append(q)
            r.kinds.append(kind)
            if q == Quality.GOOD:
                good.append(col)
        for r in rounds:
            self._emit(group, r.cols, r.vals, r.quals, r.times, r.kinds, r.exact, now)
        if problems or self._bad:
            self._report(tags, problems, good)

    def _emit(
        self,
        group: ScanGroup,
        cols: list[int],
        vals: list[float],
        quals: list[int],
        times: list[float],
        kinds: list[str],
        exact: dict[int, Value],
        now: float,
    ) -> None:
        sink = self._sink
        if sink is None:
            return
        n = len(cols)
        if n == len(group.tags):
            # every tag of the group changed: hand over the group's own tuple, in its order (buffers' fast path)
            order = np.argsort(np.asarray(cols, dtype=np.intp), kind="stable")
            remap = {int(old): new for new, old in enumerate(order)}
            batch = SampleBatch(
                self.name,
                now,
                group.tags,
                np.asarray(vals, dtype=np.float64)[order],
                np.asarray(quals, dtype=np.uint8)[order],
                {remap[i]: x for i, x in exact.items()},
                tuple(kinds[i] for i in order),
                np.asarray(times, dtype=np.float64)[order],
            )
        else:
            names = group.tags
            batch = SampleBatch(
                self.name,
                now,
                tuple(names[c] for c in cols),
                np.asarray(vals, dtype=np.float64),
                np.asarray(quals, dtype=np.uint8),
                dict(exact),
                tuple(kinds),
                np.asarray(times, dtype=np.float64),
            )
        sink(batch)

    async def check(self) -> None:
        """Raise DeviceError when the session, or a subscription, is dead: state, keep-alives, then a cheap read."""
        client = self._live()
        if self._sub_failure is not None:
            raise DeviceError(self.name, self._sub_failure)
        now = time.monotonic()
        for sub in self._subs.values():
            silent = now - sub.last_seen
            if silent > sub.silence_limit:
                raise DeviceError(
                    self.name,
                    f"subscription {sub.subscription_id} ({len(sub.group.tags)} tags at {sub.group.interval:g}s) "
                    f"sent nothing, not even a keep-alive, for {silent:.0f}s",
                )
        params = ua.ReadParameters()
        params.NodesToRead = [
            ua.ReadValueId(
                NodeId=ua.NodeId(ua.Int32(ua.ObjectIds.Server_ServerStatus_CurrentTime)),
                AttributeId=ua.AttributeIds.Value,
            )
        ]
        try:
            async with asyncio.timeout(self.config.timeout + 0.5):
                await client.uaclient.read(params)
        except (OSError, TimeoutError, ua.UaError) as exc:
            raise DeviceError(self.name, f"no answer to a status read: {_describe(exc, self.config.timeout)}") from exc


async def _send_encoded(
    client: Client, type_id: bytes, header: ua.RequestHeader, body: bytes, wait: float, what: str = "ReadRequest"
) -> bytes:
    """Send a request whose body was encoded once, the way asyncua's UASocketProtocol sends any request.

    This reaches into the protocol object (request ids, the pending-answer map, the secure
    connection): `_fast_path_available` checks those are there at connect, and the driver falls back
    to asyncua's public read() when they are not.
    """
    proto = client.uaclient.protocol
    if proto is None or proto.transport is None:
        raise ConnectionError("connection is closed")
    proto._setup_request_header(header, wait)
    message = b"".join((type_id, struct_to_binary(header), body))
    proto.revolve_security_token()
    request_id = proto._request_id + 1
    data = proto._connection.message_to_binary(message, request_id=request_id)  # a SecureMessage
    proto._request_id = request_id
    future: asyncio.Future[Buffer] = asyncio.get_running_loop().create_future()
    proto._callbackmap[request_id] = future
    proto.transport.write(data)
    answer = await asyncio.wait_for(future, wait or None)  # 0: no limit (a Publish waits for data)
    proto.check_answer(answer, f" in response to {what}")  # raises on a ServiceFault
    return bytes(answer)


def _install_fast_publish(client: Client, device: str) -> bool:
    """Have asyncua's publish loop send through `_send_encoded` and decode with decode_publish_response.

    asyncua's generic decoder costs ~10 µs per data change; the loop itself (acknowledgements,
    BadTimeout and BadNoSubscription handling) stays asyncua's. Replaces `publish` on this client's
    session object only.
    """
    session = client.uaclient.session
    if not hasattr(session, "_publish_loop") or not callable(getattr(session, "publish", None)):
        return False
    failed = False

    async def publish(acks: list[ua.SubscriptionAcknowledgement] | None) -> Any:
        nonlocal failed
        params = ua.PublishParameters()
        params.SubscriptionAcknowledgements = list(acks or [])
        body = await _send_encoded(
            client, _PUBLISH_REQUEST, ua.RequestHeader(), struct_to_binary(params), 0, "PublishRequest"
        )
        if not failed:
            try:
                return decode_publish_response(body)
            except (ValueError, IndexError, struct.error, ua.UaError) as exc:
                if isinstance(exc, ua.UaStatusCodeError):
                    raise
                failed = True  # something this decoder does not know: asyncua's own from now on
                log.warning("device %s: cannot decode a Publish answer (%s); using asyncua's decoder", device, exc)
        return struct_from_binary(ua.PublishResponse, Buffer(body))

    session.publish = publish  # type: ignore[method-assign]
    return True


def _fast_path_available(client: Client) -> bool:
    """Whether this asyncua still has the protocol internals `_send_encoded` uses."""
    proto = client.uaclient.protocol
    needed = ("_setup_request_header", "_connection", "_request_id", "_callbackmap", "transport", "check_answer")
    return proto is not None and all(hasattr(proto, n) for n in needed)


def _status_name(code: int) -> str:
    return ua.StatusCode(ua.UInt32(code)).name


def _filter_hint(tag: OpcUaTag, result: ua.MonitoredItemCreateResult) -> str:
    """What to do when a server refuses a tag's deadband (the tag goes bad, the device stays up)."""
    if tag.deadband is None or result.StatusCode.value not in _FILTER_REFUSED:
        return ""
    if tag.deadband.type is DeadbandType.PERCENT:
        return " (the server refuses its percent deadband, which needs an EURange on the node): use type: absolute"
    return " (the server refuses its deadband): remove it, or ask the server's vendor which filters it supports"


def _not_array(index: int | None) -> Any:
    raise _Unusable(f"is not an array, but the tag asks for index {index}")


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _describe(exc: BaseException, timeout: float) -> str:
    """One phrase for an asyncua or socket failure."""
    if isinstance(exc, ua.UaStatusCodeError):
        return _status_name(exc.code)
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.errno is None and str(exc):
        text = str(exc)  # asyncua's own: "Connection is closed", "connection lost"
        return text[0].lower() + text[1:]
    if isinstance(exc, OSError):
        return _why(exc)
    return str(exc) or type(exc).__name__


def _is_device_failure(exc: Exception) -> bool:
    return isinstance(exc, OSError | TimeoutError | ua.UaError | ValueError | EOFError)


async def _teardown(client: Client, wait: float) -> None:
    """Close a client whatever state it is in, leaving no task or socket behind.

    A live session is closed politely (CloseSession deletes its subscriptions on the server). A dead
    one is not talked to: asyncua would log a warning or a traceback for each step that cannot reach
    the server, so its loops are cancelled and the socket dropped here instead.
    """
    uac = client.uaclient
    protocol = uac.protocol
    if uac.state is UaClientState.CONNECTED and protocol is not None and not protocol.is_closed:
        try:
            async with asyncio.timeout(wait + 0.5):
                await client.disconnect()
            return
        except (OSError, TimeoutError, ua.UaError):
            pass
    uac.request_disconnect()
    uac.pre_request_hook = None
    tasks = [
        getattr(client, "_supervisor_task", None),
        getattr(client, "_stale_watchdog_task", None),
        getattr(client, "_renew_channel_task", None),
        getattr(uac.session, "_publish_task", None),
    ]
    for task in tasks:
        if task is not None and not task.done():
            task.cancel()
    for task in tasks:
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    uac.disconnect_socket()


PLUGIN = DriverPlugin(
    key="opcua",
    config=OpcUaDevice,
    runtime="edge_agent.drivers.opcua:OpcUaDriver",
    extra="opcua",
    library="asyncua",
    simulator="edge_agent.simulate.opcua_server:OpcUaPlantServer",
)
