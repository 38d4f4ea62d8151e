"""`outbox stats | export | drain`: the operators' view of the durable outbox."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from edge_agent import __version__
from edge_agent.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, _iso, _load


def cmd_outbox(args: argparse.Namespace) -> int:
    """Operators' view of an outbox: stats, export, drain."""
    from edge_agent.outbox import OutboxError, export, outbox_stats  # stats and export need no broker (no paho)

    try:
        if args.outbox_command == "stats":
            st = outbox_stats(args.path)
            if args.json:
                print(json.dumps(st.as_dict(), indent=2))
            else:
                oldest = "-" if st.oldest is None else _iso(st.oldest)
                print(
                    f"{st.path}: {st.total} messages ({', '.join(f'{k} {v}' for k, v in st.depth.items())}), "
                    f"{st.bytes} of {st.max_bytes} bytes, oldest {oldest}, open anomalies {st.open_anomalies}"
                )
                print(f"  limits: max_bytes {st.max_bytes}, max_age {st.max_age:g}s, when_full {st.when_full}")
                print(
                    f"  dropped: {', '.join(f'{k} {v}' for k, v in st.dropped_by_kind().items())} "
                    f"(by reason: {', '.join(f'{k} {v}' for k, v in st.dropped_by_reason().items())}); "
                    f"last event seq {st.last_seq}"
                )
                if st.corrupt_files:
                    print(
                        f"  damaged files moved aside: {st.corrupt_files}, "
                        f"committed transactions lost with them: {st.lost_transactions}"
                    )
            return EXIT_OK
        if args.outbox_command == "export":
            if args.out in (None, "-"):
                n = export(args.path, sys.stdout)
            else:
                with open(args.out, "w", encoding="utf-8") as f:
                    n = export(args.path, f)
            print(f"{n} messages exported", file=sys.stderr)
            return EXIT_OK
        cfg = _load(args.config)
        if cfg is None:
            return EXIT_CONFIG
        if cfg.mqtt is None:
            print(f"{args.config}: no mqtt section: nowhere to drain to", file=sys.stderr)
            return EXIT_CONFIG
        from edge_agent.publish import drain

        result = asyncio.run(
            drain(
                cfg.mqtt,
                cfg.outbox,
                agent_id=cfg.agent.id,
                site=cfg.agent.site,
                version=__version__,
                max_seconds=args.timeout or None,
            )
        )
        print(f"{result.sent} sent, {result.left} left, {result.seconds:.1f} s")
        return EXIT_OK if result.complete else EXIT_FAIL
    except OutboxError as exc:
        print(f"outbox: {exc}", file=sys.stderr)
        return EXIT_FAIL


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the parsers of outbox stats, export and drain."""
    ob = sub.add_parser("outbox", help="inspect, export or drain the durable outbox")
    obsub = ob.add_subparsers(dest="outbox_command", required=True)
    st = obsub.add_parser("stats", help="depth, bytes, oldest message and drops (safe while the agent runs)")
    st.add_argument("path", help="the outbox file (outbox.path in the config)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_outbox)
    ex = obsub.add_parser("export", help="every stored message as JSON lines (safe while the agent runs)")
    ex.add_argument("path")
    ex.add_argument("--out", help="file to write (default stdout)")
    ex.set_defaults(func=cmd_outbox)
    dr = obsub.add_parser("drain", help="publish everything in the outbox to the config's broker, then exit")
    dr.add_argument("config")
    dr.add_argument("--timeout", type=float, default=0, metavar="SECONDS", help="give up after this long (0: never)")
    dr.set_defaults(func=cmd_outbox)
