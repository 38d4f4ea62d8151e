"""Loading a config file: YAML with line numbers, ${ENV}, *_file secrets, EDGE_AGENT__… overrides, validation.

Loading never touches the network. Errors come back all at once, each as `FILE:LINE: path: message`.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, Union

from pydantic import BaseModel, SecretStr, ValidationError

from edge_agent.config.checks import _semantic_issues, _validated_devices
from edge_agent.config.report import (
    _in_file_order,
    _LineDict,
    _LineList,
    _locate,
    _message,
    _unwrap,
)
from edge_agent.config.schema import Config, format_path
from edge_agent.config.yamlfile import _parse_yaml
from edge_agent.drivers import REGISTRY
from edge_agent.errors import ConfigError, ConfigIssue, FieldError

ENV_PREFIX = "EDGE_AGENT__"
_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _annotation_at(tree: Any, path: Sequence[str | int]) -> Any:
    """The type annotation of the field at `path` in the raw tree (a device's by its type), or None if unknown."""
    current: Any = Config
    node: Any = tree
    for depth, part in enumerate(path):
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if depth == 1 and path[0] == "devices":  # one device of the union: its type says which model
                kind = node.get("type") if isinstance(node, dict) else None
                if not isinstance(kind, str) or kind not in REGISTRY:
                    return None
                current = REGISTRY[kind].config
            continue
        node = node.get(part) if isinstance(node, dict) else None
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
            if typing.get_origin(_unwrap(current)) not in (Union, types.UnionType, Literal):
                current = _unwrap(current)
            continue
        return None
    return current


def _wants_text(annotation: Any) -> bool:
    """Whether a field takes text as it is: str, secrets, paths, string choices (not numbers or booleans)."""
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_wants_text(a) for a in typing.get_args(annotation) if a is not type(None))
    if origin is Literal:
        return any(isinstance(a, str) for a in typing.get_args(annotation))
    return isinstance(annotation, type) and issubclass(annotation, str | SecretStr | PurePath)


def _scalar(raw: str, source: str) -> Any:
    """Environment text read as YAML would read it in the file (1 → int, true → bool), scalars only."""
    value, issues = _parse_yaml(raw, source)
    return raw if issues or value is None or isinstance(value, dict | list) else value


# ---------------------------------------------------------------- ${ENV}, overrides, secrets


def _substitute(
    node: Any,
    source: str,
    environ: Mapping[str, str],
    issues: list[ConfigIssue],
    path: list[str | int],
    line: int,
    whole: list[list[str | int]] | None = None,
    seen: set[int] | None = None,
) -> Any:
    """${VAR} and ${VAR:-default} replaced in every string; `whole` collects values that were one reference.

    A list or mapping that aliases share is one object in the tree: it is substituted once, where it is first
    met (`seen` holds their ids), however often the aliases repeat it.
    """
    if isinstance(node, dict | list):
        seen = set() if seen is None else seen
        if id(node) in seen:
            return node
        seen.add(id(node))
    if isinstance(node, dict):
        for k in list(node):
            node[k] = _substitute(
                node[k],
                source,
                environ,
                issues,
                [*path, k],
                node.lines.get(k, line) if isinstance(node, _LineDict) else line,
                whole,
                seen,
            )
        return node
    if isinstance(node, list):
        for i in range(len(node)):
            node[i] = _substitute(
                node[i],
                source,
                environ,
                issues,
                [*path, i],
                node.lines[i] if isinstance(node, _LineList) else line,
                whole,
                seen,
            )
        return node
    if not isinstance(node, str) or "$" not in node:
        return node

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        issues.append(
            ConfigIssue(
                f"{source}:{line}",
                format_path(path),
                f"environment variable {name} is not set (write ${{{name}:-default}} for a default)",
            )
        )
        return ""

    text = _ENV_REF.sub(repl, node)
    if whole is not None and _ENV_REF.fullmatch(node) and node != "$$":
        whole.append(path)  # `qos: ${QOS}` must read as `qos: 1` would, once the field's type is known
    return text


def _apply_overrides(
    tree: dict[str, Any], environ: Mapping[str, str], issues: list[ConfigIssue]
) -> dict[tuple[str, ...], str]:
    """EDGE_AGENT__MQTT__URL=… sets mqtt.url; lists (devices, models) are not reachable this way."""
    applied: dict[tuple[str, ...], str] = {}
    for env, raw in sorted(environ.items()):
        if not env.startswith(ENV_PREFIX):
            continue
        path = tuple(p.lower() for p in env[len(ENV_PREFIX) :].split("__"))
        if not all(path):
            issues.append(ConfigIssue(f"env {env}", "", "empty part in the name; separate keys with __"))
            continue
        node: Any = tree
        for part in path[:-1]:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = _LineDict()
                node[part].lines = {}
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                break
        if not isinstance(node, dict):
            issues.append(
                ConfigIssue(
                    f"env {env}", ".".join(path), "overrides reach mappings only, not lists such as devices or models"
                )
            )
            continue
        # a password of digits or 'yes' stays text; a QoS of 1 becomes a number, as in the file
        node[path[-1]] = raw if _wants_text(_annotation_at(tree, path)) else _scalar(raw, f"env {env}")
        applied[path] = env
    return applied


def _resolve_secrets(cfg: Config, tree: Any, source: str, issues: list[ConfigIssue]) -> Config:
    """Read *_file secrets now, so a missing secret fails at load time and not on first connect."""
    mqtt = cfg.mqtt
    if mqtt is None or mqtt.password_file is None:
        return cfg
    where, _, _ = _locate(tree, ("mqtt", "password_file"), source, {})
    try:
        secret = _read_text(mqtt.password_file, MAX_SECRET_BYTES).strip()
    except OSError as exc:
        issues.append(ConfigIssue(where, "mqtt.password_file", f"cannot read the secret: {exc.strerror}"))
        return cfg
    except ValueError as exc:
        issues.append(ConfigIssue(where, "mqtt.password_file", f"the secret is {exc}"))
        return cfg
    return cfg.model_copy(update={"mqtt": mqtt.model_copy(update={"password": SecretStr(secret)})})


# ---------------------------------------------------------------- entry points


def parse_config(
    text: str, *, source: str = "config.yaml", environ: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> Config:
    """Validate config text; raise ConfigError listing every problem found."""
    environ = os.environ if environ is None else environ
    tree, issues = _parse_yaml(text, source)
    if tree is None and not issues:
        issues.append(ConfigIssue(f"{source}:1", "", "the file is empty; it needs at least devices:"))
    if issues:
        raise ConfigError(issues)
    if not isinstance(tree, dict):
        raise ConfigError([ConfigIssue(f"{source}:1", "", "the top level must be a mapping (agent:, devices:, …)")])
    whole: list[list[str | int]] = []
    tree = _substitute(tree, source, environ, issues, [], 1, whole)
    for ref in whole:
        if not _wants_text(_annotation_at(tree, ref)):
            parent = functools.reduce(operator.getitem, ref[:-1], tree)
            parent[ref[-1]] = _scalar(parent[ref[-1]], source)
    overrides = _apply_overrides(tree, environ, issues)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        reported = {i.path for i in issues}  # an unset ${VAR} already explains its own value
        for err in exc.errors():
            loc = tuple(err["loc"])
            error = (err.get("ctx") or {}).get("error")
            if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
                loc = (*loc, "type")
            elif isinstance(error, FieldError):
                loc = (*loc, error.field)
            where, parts, node = _locate(tree, loc, source, overrides)
            parent = loc[:-1] if err["type"] == "extra_forbidden" else loc
            path = format_path(parts)
            if path not in reported:
                issues.append(ConfigIssue(where, path, _message(err, parent, node)))
                reported.add(path)
        # the checks across items still run over what is valid, so one run reports every problem
        more = _semantic_issues(tree, _validated_devices(tree, base_dir), source, overrides)
        issues.extend(i for i in more if i.path not in reported)
        raise ConfigError(_in_file_order(issues)) from None
    if base_dir is not None:
        cfg = _relative_to(cfg, base_dir)  # before the checks, which read a device's files
    issues.extend(_semantic_issues(tree, list(enumerate(cfg.devices)), source, overrides))
    cfg = _resolve_secrets(cfg, tree, source, issues)
    if issues:
        raise ConfigError(_in_file_order(issues))

    def locate(loc: tuple[str | int, ...]) -> ConfigIssue:
        place, parts, _ = _locate(tree, loc, source, overrides)
        return ConfigIssue(place, format_path(parts), "")

    cfg._where = locate
    cfg._sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()  # of a file's bytes: UTF-8 text round-trips
    return cfg


def _relative_to(cfg: Config, base: Path) -> Config:
    """Files named relative to the config file are found next to it, wherever the agent runs from."""
    models = [
        m.model_copy(
            update={
                "file": _under(base, m.file),
                "calibrate": m.calibrate.model_copy(update={"save_to": _under(base, m.calibrate.save_to)}),
            }
        )
        for m in cfg.models
    ]
    # a driver whose devices name files (OPC UA certificates, keys, password files) resolves them itself
    devices = [d.relative_to(base) for d in cfg.devices]
    mqtt = cfg.mqtt
    if mqtt is not None:
        tls = mqtt.tls
        if tls is not None:
            tls = tls.model_copy(update={k: _under(base, getattr(tls, k)) for k in ("ca", "cert", "key")})
        mqtt = mqtt.model_copy(update={"password_file": _under(base, mqtt.password_file), "tls": tls})
    return cfg.model_copy(update={"models": models, "devices": devices, "mqtt": mqtt})


def _under(base: Path, path: Path | None) -> Path | None:
    """A path named in the config, relative to the config file's folder unless absolute."""
    return path if path is None or path.is_absolute() else base / path


MAX_CONFIG_BYTES = 16 * 1024**2  # a config of 10,000 tags is 1 MB; /dev/zero is endless
MAX_SECRET_BYTES = 64 * 1024


class _NotText(ValueError):
    """Bytes that are not UTF-8, at a line."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


def _read_text(path: Path, limit: int) -> str:
    """A file's UTF-8 text, read up to `limit` bytes (OSError; ValueError saying why it is no text or too large)."""
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit // 1024} KiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _NotText(line, f"not UTF-8 text: {exc.reason} (byte 0x{data[exc.start]:02x})") from None


def load_config(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raise ConfigError with every problem found."""
    p = Path(path)
    try:
        text = _read_text(p, MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(p), "", f"cannot read the config file: {exc.strerror}")]) from None
    except _NotText as exc:
        raise ConfigError([ConfigIssue(f"{p}:{exc.line}", "", f"the file is {exc}")]) from None
    except ValueError as exc:
        raise ConfigError([ConfigIssue(str(p), "", f"the file is {exc}")]) from None
    return parse_config(text, source=str(p), environ=environ, base_dir=p.parent)
