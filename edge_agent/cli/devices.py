"""`check` (a config and its model bundles, without touching the network) and `read` (every tag once)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from edge_agent.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, _fmt, _iso, _load, _load_with_models
from edge_agent.errors import DeviceError

if TYPE_CHECKING:
    from edge_agent.drivers import DeviceBase, Driver
    from edge_agent.types import Sample

# ---------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a config file and its model bundles without touching the network."""
    from edge_agent.drivers import REGISTRY, DriverUnavailable

    cfg, models = _load_with_models(args.config)
    if cfg is None:
        return EXIT_CONFIG
    n_tags = sum(len(d.tags) for d in cfg.devices)
    print(
        f"{args.config}: OK: {len(cfg.devices)} device{'s' if len(cfg.devices) != 1 else ''}, "
        f"{n_tags} tags, {len(cfg.models)} models"
    )
    unavailable = []
    for dev in cfg.devices:
        try:
            driver = REGISTRY[dev.type].build(dev)
        except DriverUnavailable as exc:
            unavailable.append(str(exc))
            continue
        print(f"  {dev.name} ({dev.type}): {', '.join(driver.plan())}")
        if args.plan:
            _print_requests(driver, sys.stdout)
    for m in models:  # which file will score: the configured one, or a saved startup calibration of it
        print(f"  model {m.section.name}: {m.describe()}")
    for line in unavailable:  # an install problem, found before anything starts: as bad as a config error
        print(f"{args.config}: {line}", file=sys.stderr)
    return EXIT_CONFIG if unavailable else EXIT_OK


def _print_requests(driver: Driver, out: TextIO) -> None:
    """Every request of each group, as the driver names it (the notation of its tags), with the tags it brings."""
    subscribed = {id(g) for g in driver.subscriptions}
    for group, requests in driver.requests().items():
        when = f"subscribed, sampling {group.interval:g}s" if id(group) in subscribed else f"every {group.interval:g}s"
        for req in requests:
            n = len(req.tags)
            names = ", ".join(req.tags) if n <= 2 else f"{req.tags[0]} … {req.tags[-1]}"
            out.write(f"    {when}: {req.label}: {n} tag{'s' if n != 1 else ''} ({names})\n")


# ---------------------------------------------------------------- read


async def _read_device(dev: DeviceBase) -> tuple[list[Sample], str | None]:
    from edge_agent.drivers import REGISTRY, DriverUnavailable
    from edge_agent.types import Quality, Sample

    try:
        driver = REGISTRY[dev.type].build(dev)
    except DriverUnavailable as exc:  # its tags are unreadable here, like a device that does not answer
        now = time.time()
        return [Sample(dev.name, t.name, now, None, Quality.BAD) for t in dev.tags], str(exc)
    samples: list[Sample] = []
    try:
        await driver.connect()
        for group in [*driver.groups, *driver.subscriptions]:
            async with asyncio.timeout(dev.timeout * (1 + len(group.tags) // 50) + 1.0):
                samples.extend((await driver.read(group)).samples())
        return samples, None
    except (DeviceError, TimeoutError) as exc:
        now = time.time()
        have = {s.tag for s in samples}
        samples.extend(Sample(dev.name, t.name, now, None, Quality.COMMS_LOST) for t in dev.tags if t.name not in have)
        return samples, str(exc) if isinstance(exc, DeviceError) else f"device {dev.name}: read timed out"
    finally:
        await driver.close()


def cmd_read(args: argparse.Namespace) -> int:
    """Read every tag once and print it (commissioning)."""
    from edge_agent.types import Quality

    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    devices = [d for d in cfg.devices if args.device in (None, d.name)]
    if not devices:
        print(f"no device named {args.device!r}; devices: {', '.join(d.name for d in cfg.devices)}", file=sys.stderr)
        return EXIT_CONFIG

    async def read_all() -> list[tuple[list[Sample], str | None]]:
        return list(await asyncio.gather(*(_read_device(d) for d in devices)))

    results = asyncio.run(read_all())
    meta = {(d.name, t.name): (t, d) for d in devices for t in d.tags}
    rows: list[Sample] = []
    for samples, error in results:
        if error:
            print(error, file=sys.stderr)
        rows.extend(samples)
    if args.json:
        for s in rows:
            tag, _ = meta[(s.device, s.tag)]
            print(
                json.dumps(
                    {
                        "device": s.device,
                        "tag": s.tag,
                        "value": tag.json_value(s.value),
                        "quality": s.quality.label,
                        "ts": _iso(s.ts),
                        "unit": tag.unit,
                        "address": tag.where(),
                    }
                )
            )
    else:
        _print_table(rows, meta, sys.stdout)
    return EXIT_OK if all(s.quality is Quality.GOOD for s in rows) else EXIT_FAIL


def _print_table(rows: Sequence[Sample], meta: dict[tuple[str, str], Any], out: TextIO) -> None:
    table = [("DEVICE", "TAG", "VALUE", "UNIT", "QUALITY", "ADDRESS")]
    for s in rows:
        tag, _ = meta[(s.device, s.tag)]
        table.append((s.device, s.tag, _fmt(s.value), tag.unit or "", s.quality.label, tag.where()))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the parsers of check and read."""
    c = sub.add_parser("check", help="validate a config file (exit 0 when valid, 2 when not)")
    c.add_argument("config")
    c.add_argument(
        "--plan", action="store_true", help="list every request each device will make, in the tags' notation"
    )
    c.set_defaults(func=cmd_check)

    r = sub.add_parser("read", help="read every tag once and print it (exit 1 if any tag is not good)")
    r.add_argument("config")
    r.add_argument("--device", help="only this device")
    r.add_argument("--json", action="store_true", help="one JSON object per tag per line")
    r.set_defaults(func=cmd_read)
