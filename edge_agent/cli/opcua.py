"""`opcua gen-cert`: the agent's OPC UA client certificate; `browse`: a server's variables as a device section."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK

if TYPE_CHECKING:
    from pydantic import ValidationError

    from edge_agent.drivers.opcua.browse import Walk
    from edge_agent.drivers.opcua.config import OpcUaDevice


def cmd_opcua_gen_cert(args: argparse.Namespace) -> int:
    """Make a self-signed client certificate whose application URI matches what the agent sends."""
    from edge_agent.drivers.opcua.certs import generate_certificate

    try:
        info = generate_certificate(
            Path(args.cert),
            Path(args.key),
            application_uri=args.application_uri,
            hostname=args.hostname,
            days=args.days,
            overwrite=args.force,
        )
    except (FileExistsError, OSError, ValueError) as exc:
        print(f"gen-cert: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"certificate {args.cert}\nprivate key {args.key} (mode 0600)")
    print(
        f"application URI {info.application_uri}, thumbprint {info.thumbprint}, valid until {info.not_after:%Y-%m-%d}"
    )
    print("put certificate/private_key under security: in the device, and trust the certificate on the server")
    return EXIT_OK


# ---------------------------------------------------------------- browse

# option -> the device field it sets, as a config file names it
_SECURITY = {
    "policy": "policy",
    "security_mode": "mode",
    "certificate": "certificate",
    "private_key": "private_key",
    "trust_dir": "trust_dir",
    "rejected_dir": "rejected_dir",
    "application_uri": "application_uri",
}
_AUTH = {
    "username": "username",
    "password_file": "password_file",
    "user_certificate": "certificate",
    "user_private_key": "private_key",
}
_OPTION: dict[tuple[str, ...], str] = {
    **{("security", f): f"--{o.replace('_', '-')}" for o, f in _SECURITY.items()},
    **{("auth", f): f"--{o.replace('_', '-')}" for o, f in _AUTH.items()},
    ("name",): "--name",
    ("timeout",): "--timeout",
    ("endpoint",): "ENDPOINT",
}


def cmd_browse(args: argparse.Namespace) -> int:
    """Walk an OPC UA server's address space and write a device section: one tag per variable that reads good."""
    from pydantic import ValidationError

    from edge_agent.drivers.opcua.browse import device_for_browse, render
    from edge_agent.drivers.opcua.config import parse_node_id
    from edge_agent.errors import DeviceError

    if args.depth < 0 or args.max_nodes < 1:
        print("browse: --depth is 0 or more, --max-nodes 1 or more", file=sys.stderr)
        return EXIT_CONFIG
    try:
        parse_node_id(args.root or "i=85")
    except ValueError as exc:
        print(f"browse: --root: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    security = {f: getattr(args, o) for o, f in _SECURITY.items() if getattr(args, o) is not None}
    auth = {f: getattr(args, o) for o, f in _AUTH.items() if getattr(args, o) is not None}
    fields: dict[str, Any] = {"name": args.name or _default_name(args.endpoint), "endpoint": args.endpoint}
    fields["timeout"] = args.timeout
    if security:
        fields["security"] = security
    if auth:
        fields["auth"] = auth
    try:
        device = device_for_browse(fields)
    except ValidationError as exc:
        for line in _option_errors(exc):
            print(f"browse: {line}", file=sys.stderr)
        return EXIT_CONFIG
    problems = device.check_files()
    for loc, message in problems:
        print(f"browse: {_OPTION.get(tuple(map(str, loc)), '.'.join(map(str, loc)))}: {message}", file=sys.stderr)
    if problems:
        return EXIT_CONFIG
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.force:
        print(f"browse: {out} exists: --force overwrites it", file=sys.stderr)
        return EXIT_FAIL
    try:
        walk = asyncio.run(_walk(device, args.root, args.depth, args.max_nodes))
    except DeviceError as exc:
        print(f"browse: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if not walk.tags:
        n = len(walk.variables)
        print(
            f"browse: no variable under {walk.root} (depth {walk.depth}) reads good: {n} found, nothing written",
            file=sys.stderr,
        )
        return EXIT_FAIL
    base = out.parent if out is not None else None
    section: dict[str, Any] = {"name": device.name, "type": "opcua", "endpoint": device.endpoint}
    section["timeout"] = args.timeout
    if security:
        section["security"] = {k: _path_for(v, base) if isinstance(v, Path) else v for k, v in security.items()}
    if auth:
        section["auth"] = {k: _path_for(v, base) if isinstance(v, Path) else v for k, v in auth.items()}
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = render(walk, section, command=f"edge-agent browse {device.endpoint}, {when}")
    if out is None:
        sys.stdout.write(text)
    else:
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, out)
        except OSError as exc:
            print(f"browse: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAIL
    rest = len(walk.variables) - len(walk.tags)
    print(
        f"browse: {len(walk.tags)} tags"
        + (f", {rest} variables listed as comments" if rest else "")
        + (f" in {out}" if out is not None else "")
        + ("; the walk stopped at --max-nodes" if walk.limit_hit else "")
        + (f"; {walk.below} nodes lie below --depth {walk.depth}" if walk.below else ""),
        file=sys.stderr,
    )
    return EXIT_OK


async def _walk(device: OpcUaDevice, root: str | None, depth: int, max_nodes: int) -> Walk:
    from edge_agent.drivers.opcua.browse import OpcUaBrowser

    browser = OpcUaBrowser(device)
    try:
        await browser.connect()
        return await browser.walk(root, depth, max_nodes)
    finally:
        await browser.close()


def _default_name(endpoint: str) -> str:
    """The host of the endpoint when it makes a device name (plc1.local), else opcua-<host> with _ for the rest."""
    host = endpoint.partition("://")[2].partition("/")[0]
    host = host.rsplit(":", 1)[0] if re.search(r":\d+$", host) else host
    host = re.sub(r"[^A-Za-z0-9_.\-]+", "_", host.strip("[]")).strip("_") or "server"
    return host if re.match(r"[A-Za-z_]", host) else f"opcua-{host}"


def _path_for(path: Path, base: Path | None) -> str:
    """A file named on the command line as the written config names it: relative to the config's folder."""
    if base is None:
        return str(path)
    return os.path.relpath(path.resolve(), base.resolve())


def _option_errors(exc: ValidationError) -> list[str]:
    """Pydantic's errors as `--option: message`, the messages a config file gets."""
    from edge_agent.errors import FieldError

    out = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        error = (err.get("ctx") or {}).get("error")
        if isinstance(error, FieldError):
            loc = (*loc, error.field)
        msg = str(err["msg"]).removeprefix("Value error, ")
        out.append(f"{_OPTION.get(loc, '.'.join(loc))}: {msg}")
    return out


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the parsers of opcua gen-cert and browse."""
    o = sub.add_parser("opcua", help="OPC UA helpers")
    osub = o.add_subparsers(dest="opcua_command", required=True)
    g = osub.add_parser("gen-cert", help="make a self-signed client certificate and key for OPC UA security")
    g.add_argument("--cert", required=True, help="certificate file (.der, or .pem)")
    g.add_argument("--key", required=True, help="private key file (PEM)")
    host = socket.gethostname()
    g.add_argument("--application-uri", default=f"urn:{host}:edge-agent", help="default urn:HOSTNAME:edge-agent")
    g.add_argument("--hostname", default=host, help=f"DNS name in the certificate (default {host})")
    g.add_argument("--days", type=int, default=730)
    g.add_argument("--force", action="store_true", help="overwrite existing files")
    g.set_defaults(func=cmd_opcua_gen_cert)

    b = sub.add_parser(
        "browse",
        help="walk an OPC UA server and write a device section: one tag per variable",
        description=(
            "Walk an OPC UA server's address space and write a config with one device: a tag per variable that "
            "reads good (node ids by namespace URI, the data type, the unit from EUInformation, the browse path as "
            "the name); arrays, structures and values not good now are listed as comments. The result passes "
            "`check` and `read` as it is. The session is the agent's: an untrusted server is refused as `run` "
            "refuses it."
        ),
    )
    b.add_argument("endpoint", metavar="ENDPOINT", help="opc.tcp://HOST:PORT[/path]")
    b.add_argument("--root", help="node id to start from (default i=85, the Objects folder)")
    b.add_argument("--depth", type=int, default=6, help="levels below the root to walk (default 6)")
    b.add_argument("--max-nodes", type=int, default=5000, help="stop after this many nodes (default 5000)")
    b.add_argument("--timeout", default="2s", help="per request, also written into the device (default 2s)")
    b.add_argument("--name", help="device name (default: the host)")
    b.add_argument("--out", help="write the config here (default: standard output)")
    b.add_argument("--force", action="store_true", help="overwrite --out")
    s = b.add_argument_group("security (as security: in a device)")
    s.add_argument("--policy", choices=["None", "Basic256Sha256"])
    s.add_argument("--security-mode", choices=["Sign", "SignAndEncrypt"], help="security.mode")
    s.add_argument("--certificate", type=Path, help="this agent's certificate")
    s.add_argument("--private-key", type=Path, help="its private key")
    s.add_argument("--trust-dir", type=Path, help="folder of trusted server certificates")
    s.add_argument("--rejected-dir", type=Path, help="where a refused server certificate is saved")
    s.add_argument("--application-uri")
    a = b.add_argument_group("identity (as auth: in a device)")
    a.add_argument("--username")
    a.add_argument("--password-file", type=Path, help="file holding the password")
    a.add_argument("--user-certificate", type=Path, help="user certificate (X.509 identity)")
    a.add_argument("--user-private-key", type=Path, help="its private key")
    b.set_defaults(func=cmd_browse)
