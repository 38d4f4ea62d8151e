"""`opcua gen-cert`: the agent's OPC UA client certificate."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from edge_agent.cli.common import EXIT_FAIL, EXIT_OK


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


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the parsers of opcua gen-cert."""
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
