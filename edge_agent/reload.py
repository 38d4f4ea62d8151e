"""Live reconfiguration, decided as plain data: what differs between the running config and a new one, and
when the file changed. The agent applies the `Plan` (agent.py, "live reconfiguration").

- devices, by name: unchanged when their validated section is equal (they keep polling and keep their
  rings), changed (their poller restarts; a tag whose definition and whose device's other settings stayed
  keeps its history), added, removed;
- models, by name: unchanged when their section and their configured bundle's sha256 are equal; replaced,
  added, removed (an open anomaly of a replaced or removed model ends with reason `reconfigured`);
- mqtt: any change restarts the sink on the same outbox; outbox bounds apply at once; buffers grow to what
  the models now need (rings never shrink while running);
- what cannot change under a running agent (the outbox's path, adding or removing mqtt, the agent's id and
  site, observe) refuses the whole reload with FILE:LINE: nothing is applied, the old config runs on.

`ConfigWatch` says when to reload: the config path's sha256 (stat follows the path, so a ConfigMap's
symlink swap is seen like an edit) and the mtime and size of every bundle the running config names.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.config import Config, load_config
from edge_agent.drivers import DeviceBase
from edge_agent.errors import ConfigIssue
from edge_agent.scoring.monitor import LoadedModel, load_models

log = logging.getLogger(__name__)

WATCH_INTERVAL = 2.0  # seconds between looks at the config file (and the bundles it names)
RESULTS = ("ok", "invalid", "failed")  # applied; the file did not validate; valid but not applied
MAX_HASHED = 16 * 1024**2 + 1  # the loader refuses larger configs; hash no more than that


@dataclass(frozen=True, slots=True)
class ReloadStats:
    """Reloads so far by result, the last result, and the sha256 of the config file running now."""

    ok: int
    invalid: int
    failed: int
    last: str | None
    config_sha256: str

    def by_result(self) -> dict[str, int]:
        """{ok, invalid, failed: count}, for the metric."""
        return {"ok": self.ok, "invalid": self.invalid, "failed": self.failed}


@dataclass(frozen=True, slots=True)
class Plan:
    """What a reload changes, by name. Empty tuples everywhere (and no refusals): nothing to do."""

    devices_changed: tuple[str, ...] = ()
    devices_added: tuple[str, ...] = ()
    devices_removed: tuple[str, ...] = ()
    carry: Mapping[str, frozenset[str]] = field(default_factory=dict)  # changed device → tags keeping history
    models_replaced: tuple[str, ...] = ()
    models_added: tuple[str, ...] = ()
    models_removed: tuple[str, ...] = ()
    mqtt: bool = False  # the sink restarts with the new section
    outbox: bool = False  # bounds, policy or commit rhythm (never the path) change
    buffers: bool = False
    refused: tuple[ConfigIssue, ...] = ()  # why it cannot be applied live

    @property
    def devices_stopped(self) -> frozenset[str]:
        """Devices whose poller ends: changed and removed ones."""
        return frozenset((*self.devices_changed, *self.devices_removed))

    @property
    def devices_started(self) -> frozenset[str]:
        """Devices that get a new poller: changed and added ones."""
        return frozenset((*self.devices_changed, *self.devices_added))

    @property
    def models_stopped(self) -> frozenset[str]:
        """Models whose monitor ends: replaced and removed ones."""
        return frozenset((*self.models_replaced, *self.models_removed))

    @property
    def models_started(self) -> frozenset[str]:
        """Models that get a new monitor: replaced and added ones."""
        return frozenset((*self.models_replaced, *self.models_added))

    def describe(self) -> str:
        """One line for the log: what changes."""
        parts = []
        for what, names in (
            ("devices restarted", self.devices_changed),
            ("devices added", self.devices_added),
            ("devices removed", self.devices_removed),
            ("models replaced", self.models_replaced),
            ("models added", self.models_added),
            ("models removed", self.models_removed),
        ):
            if names:
                parts.append(f"{what}: {', '.join(names)}")
        parts += [text for flag, text in ((self.mqtt, "MQTT reconnects"), (self.outbox, "outbox bounds")) if flag]
        if self.buffers:
            parts.append("buffers")
        return "; ".join(parts) or "no changes"


def plan(old: Config, old_models: Sequence[LoadedModel], new: Config, new_models: Sequence[LoadedModel]) -> Plan:
    """What applying `new` (validated, its bundles loaded) to an agent running `old` changes."""
    before = {d.name: d for d in old.devices}
    after = {d.name: d for d in new.devices}
    changed = tuple(n for n in after if n in before and before[n] != after[n])
    carry = {n: _kept_tags(before[n], after[n]) for n in changed}
    old_m = {m.section.name: m.identity for m in old_models}
    new_m = {m.section.name: m.identity for m in new_models}
    both_mqtt = old.mqtt is not None and new.mqtt is not None
    return Plan(
        devices_changed=changed,
        devices_added=tuple(n for n in after if n not in before),
        devices_removed=tuple(n for n in before if n not in after),
        carry={n: tags for n, tags in carry.items() if tags},
        models_replaced=tuple(n for n in new_m if n in old_m and old_m[n] != new_m[n]),
        models_added=tuple(n for n in new_m if n not in old_m),
        models_removed=tuple(n for n in old_m if n not in new_m),
        mqtt=both_mqtt and old.mqtt != new.mqtt,
        outbox=both_mqtt and old.outbox.model_copy(update={"path": new.outbox.path}) != new.outbox,
        buffers=old.buffers != new.buffers,
        refused=tuple(_refusals(old, new)),
    )


def _kept_tags(old: DeviceBase, new: DeviceBase) -> frozenset[str]:
    """Tags of a changed device that read the same thing as before: same definition, same device settings."""
    if type(old) is not type(new) or old.model_dump(exclude={"tags"}) != new.model_dump(exclude={"tags"}):
        return frozenset()
    defined = {t.name: t for t in old.tags}
    return frozenset(t.name for t in new.tags if defined.get(t.name) == t)


def _refusals(old: Config, new: Config) -> list[ConfigIssue]:
    """What a running agent cannot take: each located in the new file."""
    out = []

    def refuse(loc: tuple[str, ...], message: str) -> None:
        at = new.where(*loc)
        out.append(ConfigIssue(at.source, at.path, message))

    if old.agent != new.agent:
        refuse(("agent",), "the agent's id and site name its topics, client id and events: restart to change them")
    if (old.mqtt is None) != (new.mqtt is None):
        what = "adding" if old.mqtt is None else "removing"
        refuse(("mqtt",) if new.mqtt is not None else (), f"{what} the mqtt section takes a restart of the agent")
    elif new.mqtt is not None and old.outbox.path != new.outbox.path:
        refuse(
            ("outbox", "path"),
            f"the outbox cannot move under a running agent: it keeps writing to {old.outbox.path}; "
            f"restart the agent to use {new.outbox.path} (what the old file holds is not carried over)",
        )
    if old.observe != new.observe:
        refuse(("observe",), "the metrics address and the log format take a restart of the agent")
    return out


def load(path: Path) -> tuple[Config, list[LoadedModel], dict[Path, FileState | None]]:
    """The config at `path`, its bundles loaded, and their files' states as they were before loading
    (ConfigError with every FILE:LINE problem). Blocking: run it in a thread."""
    cfg = load_config(path)
    bundles = {m.file: file_state(m.file) for m in cfg.models}
    return cfg, load_models(cfg), bundles


# ---------------------------------------------------------------- watching the file


@dataclass(frozen=True, slots=True)
class FileState:
    """A file as last seen: stat of the path (symlinks followed) and, for the config, its sha256."""

    mtime_ns: int
    size: int
    sha256: str = ""


def file_state(path: Path, *, digest: bool = False) -> FileState | None:
    """The path's state now (None when it cannot be read); `digest`: with the sha256 of its bytes."""
    try:
        st = path.stat()  # the path, not an inode kept open: a ConfigMap update swaps a symlink
        if not digest:
            return FileState(st.st_mtime_ns, st.st_size)
        with path.open("rb") as f:
            sha = hashlib.sha256(f.read(MAX_HASHED)).hexdigest()
    except OSError:
        return None
    return FileState(st.st_mtime_ns, st.st_size, sha)


class ConfigWatch:
    """When to reload: the config's bytes changed (sha256; its mtime and size alone would miss an edit that
    keeps both, and a `touch` would be a change), or a running bundle's mtime or size changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._config: FileState | None = None
        self._bundles: dict[Path, FileState | None] = {}
        self._looked = False

    @property
    def sha256(self) -> str:
        """The config file's sha256 at the last look ('' when it could not be read)."""
        return self._config.sha256 if self._config is not None else ""

    def look(self, bundles: Iterable[Path]) -> bool:
        """Stat and hash now (blocking: run it in a thread); True when something changed since the last look."""
        config = file_state(self.path, digest=True)
        states = {p: file_state(p) for p in bundles}
        changed = self._looked and (self.sha256 != (config.sha256 if config else "") or states != self._bundles)
        self._config, self._bundles, self._looked = config, states, True
        return changed

    def loaded(self, bundles: Mapping[Path, FileState | None]) -> None:
        """The bundles a reload applied, as they were before it read them: a later change is seen at the next look."""
        self._bundles = dict(bundles)
