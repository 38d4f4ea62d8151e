"""Walk an OPC UA server's address space into a device section: one tag per variable `read` finds good.

The walk browses forward hierarchical references (objects and variables) breadth first from a root,
to a depth and up to a node count, one Browse request per batch of nodes (the server's
MaxNodesPerBrowse). It then reads each variable's value and data type, and the EUInformation of its
EngineeringUnits property, in batched Read requests. A variable becomes a tag when the driver would
read it good now: a scalar of a type it decodes, with a good status, judged by the driver's own
conversion. The others (arrays, structures, values bad or uncertain now) are listed as comments.

The session is the driver's (OpcUaSession.connect): the same security, identity and trust checks as
`run`, so a server whose certificate is not in trust_dir is refused here as it is there. Every
request has the device's timeout; the walk is bounded by its depth and node count.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from asyncua import Client, ua

from edge_agent.drivers.base import TAG_NAME
from edge_agent.drivers.opcua.codecs import _convert, _from_datavalue, _status_name, _Unusable
from edge_agent.drivers.opcua.config import NodeKind, NodeRef, OpcUaDevice, format_node_id, parse_node_id
from edge_agent.drivers.opcua.session import OpcUaSession, _describe
from edge_agent.errors import DeviceError

OBJECTS = "i=85"  # the Objects folder: the default root
DEPTH = 6
MAX_NODES = 5000
_HAS_PROPERTY = ua.NodeId(ua.Int32(ua.ObjectIds.HasProperty))
_EU_PROPERTY = "EngineeringUnits"
_READ_CAP = 300  # values per Read request at most, whatever the server allows: a browse reads unknown sizes
_REFS_PER_NODE = 1000  # references asked for per node and Browse; more come through BrowseNext
_BROWSE_NEXT_LIMIT = 1000  # BrowseNext rounds per batch: bounds a server that keeps handing continuation points
_KINDS: dict[ua.NodeIdType, NodeKind] = {
    ua.NodeIdType.TwoByte: "i",
    ua.NodeIdType.FourByte: "i",
    ua.NodeIdType.Numeric: "i",
    ua.NodeIdType.String: "s",
    ua.NodeIdType.Guid: "g",
    ua.NodeIdType.ByteString: "b",
}
_PLAIN = re.compile(r"[A-Za-z0-9_./][A-Za-z0-9_./\-]*")  # no YAML indicator inside: safe in flow mappings too
_BUILTIN_TYPES = {t.value: t.name for t in ua.VariantType if 1 <= t.value <= 25}


@dataclass(frozen=True)
class Variable:
    """A variable found by the walk: where it is, what it holds, and whether it makes a tag as it is."""

    path: tuple[str, ...]  # browse names below the root
    node: str  # node id text, namespace by URI: nsu=<URI>;s=… (namespace 0: i=…)
    type: str  # data type name (Double, Boolean, …); Double[5] for an array of 5
    unit: str | None  # the display name of its EUInformation
    why_not: str | None = None  # None: a tag; else why `read` would not find it good as it is
    array: int | None = None  # the number of elements of an array value


@dataclass
class Walk:
    """What a walk found, and where it stopped."""

    root: str  # the root's node id
    depth: int
    root_name: str = ""  # its browse name
    variables: list[Variable] = field(default_factory=list)
    nodes: int = 0  # objects and variables visited
    limit_hit: bool = False  # stopped at max_nodes
    below: int = 0  # nodes one level below the depth, not visited
    unbrowsable: int = 0  # nodes whose Browse answered a bad status
    skipped_standard: bool = False  # namespace 0 (Server, Aliases, Locations) left out under Objects

    @property
    def tags(self) -> list[Variable]:
        """The variables that become tags."""
        return [v for v in self.variables if v.why_not is None]


def device_for_browse(fields: dict[str, Any]) -> OpcUaDevice:
    """The device a browse connects as: the fields given (endpoint, security, auth, timeout) and one stand-in tag.

    A device needs a tag; the server's state (i=2259, which every server has) stands in and is never written
    out. Raises pydantic's ValidationError with the same messages a config file gets.
    """
    return OpcUaDevice.model_validate(
        {"type": "opcua", "name": "browse", **fields, "tags": [{"name": "server_state", "node": "i=2259"}]}
    )


@dataclass
class _Found:
    node: ua.NodeId
    path: tuple[str, ...]
    order: tuple[int, ...]  # sibling positions from the root: the tree's order
    is_variable: bool


class OpcUaBrowser(OpcUaSession):
    """The driver's session, walking the address space instead of reading tags."""

    async def walk(self, root: str | None = None, depth: int = DEPTH, max_nodes: int = MAX_NODES) -> Walk:
        """Browse from `root` (default the Objects folder) to `depth` levels, up to `max_nodes` nodes; read them."""
        client = self._live()
        ref = parse_node_id(root or OBJECTS)
        root_id = ref.resolve(self._namespaces)
        if root_id is None:
            raise DeviceError(
                self.name, f"the server has no namespace {ref.uri} (it has {', '.join(self._namespaces)})"
            )
        top = await self._read(client, [(root_id, ua.AttributeIds.NodeClass), (root_id, ua.AttributeIds.BrowseName)])
        status = top[0].StatusCode.value if top[0].StatusCode is not None else 0
        if status >> 31 or top[0].Value is None:
            raise DeviceError(self.name, f"--root {ref}: the server has no such node ({_status_name(status)})")
        qn = top[1].Value.Value if top[1].Value is not None else None
        root_name = qn.Name if isinstance(qn, ua.QualifiedName) and qn.Name else str(ref)
        result = Walk(str(ref), depth, root_name=root_name)
        skip_standard = root_id == ua.NodeId(ua.Int32(ua.ObjectIds.ObjectsFolder))
        per_browse = await self._limit(client, ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerBrowse)
        per_browse = min(per_browse or 100, 1000)
        seen = {root_id}
        variables: list[_Found] = []
        if top[0].Value.Value == ua.NodeClass.Variable:  # a variable as the root: listed too, under its own name
            level = [_Found(root_id, (root_name,), (), True)]
            variables.append(level[0])
        else:
            level = [_Found(root_id, (), (), False)]
        units: dict[ua.NodeId, ua.NodeId] = {}  # variable -> its EngineeringUnits property
        for d in range(depth + 1):
            found: list[_Found] = []
            for start in range(0, len(level), per_browse):
                batch = level[start : start + per_browse]
                refs = await self._browse(client, [f.node for f in batch], result)
                for parent, children in zip(batch, refs, strict=True):
                    for i, child in enumerate(children):
                        node = self._local(child.NodeId)
                        if node is None:
                            continue
                        if child.ReferenceTypeId == _HAS_PROPERTY:
                            # properties describe (EngineeringUnits, EURange, nameplate data): not tags
                            if parent.is_variable and child.BrowseName.Name == _EU_PROPERTY:
                                units[parent.node] = node
                            continue
                        if skip_standard and node.NamespaceIndex == 0:
                            result.skipped_standard = True  # Server, Aliases, Locations: the standard's own
                            continue
                        if node in seen:
                            continue
                        if d == depth:  # one level below the depth: counted, not visited
                            result.below += 1
                            continue
                        if len(seen) > max_nodes:  # the root is not counted
                            result.limit_hit = True
                            continue
                        seen.add(node)
                        name = child.BrowseName.Name or child.DisplayName.Text or str(node.Identifier)
                        is_var = child.NodeClass == ua.NodeClass.Variable
                        f = _Found(node, (*parent.path, name), (*parent.order, i), is_var)
                        found.append(f)
                        if is_var:
                            variables.append(f)
            level = found
            if not level:
                break
        result.nodes = len(seen) - 1
        result.variables = await self._describe(client, sorted(variables, key=lambda f: f.order), units)
        return result

    async def _request(self, what: str, call: Any) -> Any:
        """One service call with the device's timeout; DeviceError when it fails."""
        timeout = self.config.timeout
        try:
            async with asyncio.timeout(timeout + 1.0):
                return await call
        except (OSError, TimeoutError, ua.UaError, ValueError) as exc:
            raise DeviceError(self.name, f"{what} failed: {_describe(exc, timeout)}") from exc

    async def _limit(self, client: Client, node: int) -> int:
        params = ua.ReadParameters()
        params.NodesToRead = [ua.ReadValueId(NodeId=ua.NodeId(ua.Int32(node)), AttributeId=ua.AttributeIds.Value)]
        status, vt, value, _ = _from_datavalue((await self._request("Read", client.uaclient.read(params)))[0])
        return int(value or 0) if status == 0 and 2 <= vt <= 9 else 0

    async def _browse(self, client: Client, nodes: Sequence[ua.NodeId], walk: Walk) -> list[list[Any]]:
        """The forward hierarchical references (to objects and variables) of each node, continuation points followed."""
        params = ua.BrowseParameters()
        params.RequestedMaxReferencesPerNode = _REFS_PER_NODE
        params.NodesToBrowse = [
            ua.BrowseDescription(
                NodeId=n,
                BrowseDirection=ua.BrowseDirection.Forward,
                ReferenceTypeId=ua.NodeId(ua.Int32(ua.ObjectIds.HierarchicalReferences)),
                IncludeSubtypes=True,
                NodeClassMask=ua.NodeClass.Object | ua.NodeClass.Variable,
                ResultMask=ua.BrowseResultMask.All,
            )
            for n in nodes
        ]
        results = await self._request(f"Browse of {len(nodes)} nodes", client.uaclient.browse(params))
        if len(results) != len(nodes):
            raise DeviceError(self.name, f"Browse of {len(nodes)} nodes answered {len(results)} results")
        refs: list[list[Any]] = []
        pending: dict[int, bytes] = {}
        for i, res in enumerate(results):
            if res.StatusCode.value >> 31:
                walk.unbrowsable += 1
                refs.append([])
                continue
            refs.append(list(res.References))
            if res.ContinuationPoint:
                pending[i] = res.ContinuationPoint
        for _ in range(_BROWSE_NEXT_LIMIT):
            if not pending:
                break
            nxt = ua.BrowseNextParameters()
            nxt.ReleaseContinuationPoints = False
            nxt.ContinuationPoints = list(pending.values())
            answers = await self._request("BrowseNext", client.uaclient.browse_next(nxt))
            done = pending
            pending = {}
            for i, res in zip(done, answers, strict=True):
                if res.StatusCode.value >> 31:
                    continue
                refs[i].extend(res.References)
                if res.ContinuationPoint:
                    pending[i] = res.ContinuationPoint
        if pending:  # a server that never finishes: let go of its continuation points
            nxt = ua.BrowseNextParameters()
            nxt.ReleaseContinuationPoints = True
            nxt.ContinuationPoints = list(pending.values())
            await self._request("BrowseNext", client.uaclient.browse_next(nxt))
        return refs

    def _local(self, node: ua.ExpandedNodeId) -> ua.NodeId | None:
        """A reference's target as a node id of this server; None when it lives on another server."""
        if getattr(node, "ServerIndex", 0):
            return None
        ns = int(node.NamespaceIndex)
        uri = getattr(node, "NamespaceUri", None)
        if uri:
            if uri not in self._namespaces:
                return None
            ns = self._namespaces.index(uri)
        return ua.NodeId(node.Identifier, ua.Int16(ns), node.NodeIdType)

    async def _read(self, client: Client, items: list[tuple[ua.NodeId, int]]) -> list[ua.DataValue]:
        cap = min(self._max_per_read or _READ_CAP, _READ_CAP)
        out: list[ua.DataValue] = []
        for start in range(0, len(items), cap):
            params = ua.ReadParameters()
            params.NodesToRead = [ua.ReadValueId(NodeId=n, AttributeId=a) for n, a in items[start : start + cap]]
            answer = await self._request(f"Read of {len(params.NodesToRead)} attributes", client.uaclient.read(params))
            if len(answer) != len(params.NodesToRead):
                raise DeviceError(self.name, f"Read of {len(params.NodesToRead)} attributes answered {len(answer)}")
            out.extend(answer)
        return out

    async def _describe(self, client: Client, found: list[_Found], units: dict[ua.NodeId, ua.NodeId]) -> list[Variable]:
        """Each variable's value (as the driver would judge it), data type and unit."""
        value, dtype = ua.AttributeIds.Value, ua.AttributeIds.DataType
        answers = await self._read(client, [(f.node, a) for f in found for a in (value, dtype)])
        eu_nodes = sorted({n for f in found if (n := units.get(f.node)) is not None}, key=str)
        eu_values = await self._read(client, [(n, value) for n in eu_nodes])
        unit_of = {n: _unit_text(dv) for n, dv in zip(eu_nodes, eu_values, strict=True)}
        type_ids = [dv.Value.Value if dv.Value is not None else None for dv in answers[1::2]]
        names = await self._type_names(client, [t for t in type_ids if isinstance(t, ua.NodeId)])
        out = []
        for f, dv, type_id in zip(found, answers[0::2], type_ids, strict=True):
            type_name = names.get(type_id, "?") if isinstance(type_id, ua.NodeId) else "?"
            unit = unit_of.get(units[f.node]) if f.node in units else None
            out.append(self._variable(f, dv, type_name, unit))
        return out

    async def _type_names(self, client: Client, ids: list[ua.NodeId]) -> dict[ua.NodeId, str]:
        """Names of data types: builtin ones by number, the others (Duration, enumerations) by their browse name."""
        names: dict[ua.NodeId, str] = {}
        others = []
        for t in set(ids):
            if t.NamespaceIndex == 0 and isinstance(t.Identifier, int) and t.Identifier in _BUILTIN_TYPES:
                names[t] = _BUILTIN_TYPES[t.Identifier]
            else:
                others.append(t)
        for t, dv in zip(
            others, await self._read(client, [(t, ua.AttributeIds.BrowseName) for t in others]), strict=True
        ):
            qn = dv.Value.Value if dv.Value is not None else None
            names[t] = qn.Name if isinstance(qn, ua.QualifiedName) and qn.Name else str(t)
        return names

    def _variable(self, f: _Found, dv: ua.DataValue, type_name: str, unit: str | None) -> Variable:
        node = self._node_text(f.node)
        try:
            parse_node_id(node)  # what the config will parse (a string id past 4096 characters is refused)
        except ValueError as exc:
            return Variable(f.path, node, type_name, unit, f"its node id cannot be written in a config: {exc}")
        status, vt, v, is_array = _from_datavalue(dv)
        if status >> 30:
            quality = "bad" if status >> 31 else "uncertain"
            return Variable(f.path, node, type_name, unit, f"reads {_status_name(status)} now ({quality})")
        if is_array:
            n = len(v) if isinstance(v, list) else 0
            why = f"an array of {n}: a tag with index: N reads one element (0 … {n - 1})" if n else "an empty array"
            return Variable(f.path, node, f"{type_name}[{n}]", unit, why, n)
        try:
            _convert(vt, v)
        except _Unusable as exc:
            why = str(exc)  # the driver's words; the type is named beside them already
            return Variable(
                f.path, node, type_name, unit, why.partition(", ")[2] if why.startswith("has type ") else why
            )
        return Variable(f.path, node, type_name, unit)

    def _node_text(self, node: ua.NodeId) -> str:
        """The node id as a config writes it: the namespace by URI, so indexes may move (namespace 0 by index)."""
        ident: int | str | uuid.UUID | bytes = node.Identifier
        kind = _KINDS[node.NodeIdType]
        if kind == "b" and isinstance(ident, str):
            ident = ident.encode("utf-8")
        ns = int(node.NamespaceIndex)
        if ns == 0 or ns >= len(self._namespaces):
            return format_node_id(NodeRef(kind, ident, ns))
        return format_node_id(NodeRef(kind, ident, None, self._namespaces[ns]))


def _unit_text(dv: ua.DataValue) -> str | None:
    eu = dv.Value.Value if dv.Value is not None else None
    if isinstance(eu, ua.EUInformation) and eu.DisplayName is not None and eu.DisplayName.Text:
        return str(eu.DisplayName.Text)
    return None


# ---------------------------------------------------------------- the device section


def tag_names(paths: Sequence[tuple[str, ...]]) -> list[str]:
    """A valid, unique tag name per browse path: names joined with '.', other characters '_', _2 … on a clash."""
    out: list[str] = []
    taken: set[str] = set()
    for path in paths:
        parts = [re.sub(r"[^A-Za-z0-9_.\-]+", "_", p).strip("_.") or "_" for p in path] or ["_"]
        name = ".".join(parts)
        if not re.match(r"[A-Za-z_]", name):
            name = "_" + name
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}_{n}"
        assert TAG_NAME.match(unique), unique
        taken.add(unique)
        out.append(unique)
    return out


def _q(text: str) -> str:
    """`text` as a YAML scalar the config loader reads back as it is: plain when YAML keeps it a string
    (PumpSkid.Flow, 2s), else double-quoted."""
    if _PLAIN.fullmatch(text) and yaml.safe_load(text) == text:
        return text
    return _quoted(text)


def _quoted(text: str) -> str:
    """`text` double-quoted for YAML: JSON's escapes, unprintable characters escaped, $ doubled (the loader
    reads ${ENV} in every string)."""
    quoted = json.dumps(text.replace("$", "$$"), ensure_ascii=False)
    return "".join(
        c if c.isprintable() else f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}" for c in quoted
    )


def render(
    walk: Walk,
    device: dict[str, Any],
    *,
    command: str,
) -> str:
    """The config text: a header saying what was walked, one device section, a tag per line, the rest as comments.

    `device` holds the device's fields before its tags, as plain values (name, endpoint, timeout, security, auth).
    """
    tags = walk.tags
    others = [v for v in walk.variables if v.why_not is not None]
    lines = [f"# {command}", f"# {_summary(walk)}"]
    if walk.skipped_standard:
        lines.append(
            "# The standard's own nodes under Objects (Server, Aliases, Locations) are left out: --root i=2253"
        )
        lines.append("# walks the Server object.")
    if walk.below:
        n = walk.below
        lines.append(f"# {n} node{'s lie' if n != 1 else ' lies'} below depth {walk.depth}, not walked: raise --depth.")
    if walk.limit_hit:
        lines.append("# The walk stopped at --max-nodes: raise it, or walk a part with --root.")
    if walk.unbrowsable:
        n = walk.unbrowsable
        lines.append(f"# {n} node{'s' if n != 1 else ''} could not be browsed (the server answered a bad status).")
    lines += ["devices:"]
    first = True
    for key, value in device.items():
        lines += _field(key, value, "  - " if first else "    ")
        first = False
    lines.append("    tags:")
    names = dict(zip(walk.variables, tag_names([v.path for v in walk.variables]), strict=True))
    for v in tags:
        lines.append(f"      - {_tag(names[v], v)}  # {v.type}")
    if others:
        lines.append("      # Variables that are not tags: `read` would not find them good as they are.")
        for v in others:
            lines.append(f"      # - {_tag(names[v], v)}  # {v.type}: {v.why_not}")
    return "\n".join(lines) + "\n"


def _summary(walk: Walk) -> str:
    n = len(walk.variables)
    tags = len(walk.tags)
    rest = n - tags
    return (
        f"{walk.nodes} nodes under {walk.root_name} ({walk.root}) to depth {walk.depth}: "
        f"{n} variable{'s' if n != 1 else ''}, {tags} tag{'s' if tags != 1 else ''}"
        + (f", {rest} listed as comments" if rest else "")
    )


def _tag(name: str, v: Variable) -> str:
    fields = [f"name: {_q(name)}", f"node: {_quoted(v.node)}"]
    if v.array:
        fields.append("index: 0")
    if v.unit:
        fields.append(f"unit: {_q(v.unit)}")
    return "{" + ", ".join(fields) + "}"


def _field(key: str, value: Any, indent: str) -> list[str]:
    if isinstance(value, dict):
        out = [f"{indent}{key}:"]
        for k, v in value.items():
            out.append(f"      {k}: {_q(str(v)) if isinstance(v, str | Path) else v}")
        return out
    return [f"{indent}{key}: {_q(str(value)) if isinstance(value, str | Path) else value}"]
