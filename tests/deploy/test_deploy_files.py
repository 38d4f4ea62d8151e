"""The deploy files: the compose file and the Kubernetes manifests against their published schemas (shipped
offline by check-jsonschema and kubernetes-validate), every ConfigMap, Secret and PVC a workload refers to
shipped too, the systemd unit's settings, the configs they carry through the agent's own loader, and the
contract of the Dockerfiles (Dockerfile for both platforms, Dockerfile.arm64 the same recipe).

What runs a program (systemd-analyze, the image's health check, bash): test_deploy_tools.py.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube import (
    K8S_VERSIONS,
    assert_locked_down_and_probed,
    k8s_version,
    kv,
    literal_env,
    pod_spec,
    unresolved_references,
)
from shipped import DEPLOY, DOCKERFILE, DOCKERFILE_ARM64, DOCKERFILES, ROOT, UNIT, instructions

from edge_agent.config import parse_config
from edge_agent.errors import ConfigError

COMPOSE = DEPLOY / "docker-compose.yml"
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))


# ---------------------------------------------------------------- compose


def _compose_schema() -> dict[str, Any]:
    # check-jsonschema (dev dependency) vendors the compose-spec schema (compose-spec/compose-spec, Apache-2.0)
    pytest.importorskip("check_jsonschema", reason="dev dependency missing: pip install check-jsonschema")
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(ref.read_text(encoding="utf-8"))


def _compose_errors(doc: Any) -> list[str]:
    schema = _compose_schema()
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::-([^}]*))?\}")


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation as this file uses it: ${VAR}, ${VAR:-default}, $$ for a literal $."""

    def value(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if env.get(name):
            return env[name]
        assert default is not None, f"${{{name}}} has no default: compose would warn and use an empty string"
        return default

    return _VARIABLE.sub(value, text)


def _compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file as `docker compose` reads it with these variables (none set: the defaults)."""
    return yaml.safe_load(_interpolate(COMPOSE.read_text(encoding="utf-8"), env or {}))


def test_compose_file_matches_the_compose_spec() -> None:
    assert _compose_errors(yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))) == []  # as written
    assert _compose_errors(_compose()) == []  # as interpolated


@pytest.mark.parametrize("platform", [None, "linux/amd64", "linux/arm64"])
def test_compose_platform_comes_from_a_variable(platform: str | None) -> None:
    env = {"EDGE_AGENT_PLATFORM": platform} if platform else {}
    doc = _compose(env)
    assert _compose_errors(doc) == []
    built = {name: svc for name, svc in doc["services"].items() if "build" in svc}
    assert set(built) == {"simulator", "edge-agent"}  # the agent image, one recipe for both platforms
    for svc in built.values():
        assert svc["platform"] == (platform or "linux/arm64")
        assert svc["build"]["dockerfile"] == "Dockerfile"
        assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE


def test_compose_publishes_ports_on_loopback_unless_told_otherwise() -> None:
    def published(doc: dict[str, Any]) -> list[str]:
        return [p for svc in doc["services"].values() for p in svc.get("ports", [])]

    assert published(_compose()) == ["127.0.0.1:1883:1883", "127.0.0.1:9108:9108"]
    assert all(p.startswith("10.0.0.5:") for p in published(_compose({"PUBLISH_ADDRESS": "10.0.0.5"})))


def test_interpolation_helper_reads_compose_syntax() -> None:
    text = 'a: ${A:-x}\nb: "$${B}"\nc: ${C:-linux/arm64}\n'
    assert yaml.safe_load(_interpolate(text, {"A": "y"})) == {"a": "y", "b": "${B}", "c": "linux/arm64"}
    with pytest.raises(AssertionError, match="no default"):
        _interpolate("x: ${NOPE}", {})


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (lambda d: d["services"]["edge-agent"].update(restartt="always"), "restartt"),
        (lambda d: d["services"]["edge-agent"]["healthcheck"].update(retries=[3]), "[3] is not of type"),
        (lambda d: d["services"]["edge-agent"].update(volumes="/var/lib/edge-agent"), "is not of type"),
        (lambda d: d.update(secrets={"mqtt_password": {"path": "./secrets/mqtt_password"}}), "path"),
    ],
    ids=["unknown-key", "wrong-type", "volumes-not-a-list", "secret-without-file"],
)
def test_compose_schema_rejects_a_broken_file(break_it: Any, expected: str) -> None:
    doc = copy.deepcopy(_compose())
    break_it(doc)
    errors = _compose_errors(doc)
    assert errors, "the broken compose file passed the schema"
    assert any(expected in e for e in errors), errors


def test_compose_agent_is_hardened_and_kept_healthy() -> None:
    agent = _compose()["services"]["edge-agent"]
    assert agent["read_only"] is True
    assert any(t.startswith("/tmp") for t in agent["tmpfs"])
    assert agent["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in agent["security_opt"]
    assert agent["user"] == "10001:10001"
    assert agent["restart"] == "unless-stopped"
    assert "healthz" in " ".join(agent["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/edge-agent") for v in agent["volumes"])
    assert any(v.endswith(":/etc/edge-agent/config.yaml:ro") for v in agent["volumes"])
    assert [s["source"] for s in agent["secrets"]] == ["mqtt_password"]
    assert agent["environment"]["EDGE_AGENT__MQTT__URL"].startswith("mqtt://mosquitto:")
    assert agent["depends_on"]["mosquitto"]["condition"] == "service_healthy"


# ---------------------------------------------------------------- Kubernetes


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in K8S_FILES:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


def test_there_are_manifests_for_every_piece() -> None:
    kinds = {doc["kind"] for _, doc in _k8s_docs()}
    assert {"Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "DaemonSet"} <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("name", "doc"), _k8s_docs(), ids=[n for n, _ in _k8s_docs()])
def test_manifest_matches_the_kubernetes_schema(name: str, doc: dict[str, Any], version: str) -> None:
    # strict: unknown fields are errors too (a typo such as imagePullPolcy would be ignored by the API server)
    kv().validate(doc, k8s_version(version), strict=True)


def _deployment() -> dict[str, Any]:
    return next(doc for _, doc in _k8s_docs() if doc["kind"] == "Deployment")


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolcy="Always"), "imagePullPolcy"),
        (lambda d: d["spec"].update(replicas="one"), "'one' is not of type"),
        (lambda d: d["spec"].pop("selector"), "'selector' is a required property"),
        (
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"].pop("port"),
            "'port' is a required property",
        ),
    ],
    ids=["unknown-field", "wrong-type", "missing-selector", "probe-without-port"],
)
def test_kubernetes_schema_rejects_a_broken_manifest(break_it: Any, expected: str) -> None:
    doc = copy.deepcopy(_deployment())
    break_it(doc)
    with pytest.raises(kv().ValidationError) as err:
        kv().validate(doc, k8s_version("latest"), strict=True)
    assert expected in str(err.value)


@pytest.mark.parametrize("kind", ["Deployment", "DaemonSet"])
def test_workloads_are_locked_down_and_probed(kind: str) -> None:
    doc = next(doc for _, doc in _k8s_docs() if doc["kind"] == kind)
    assert_locked_down_and_probed(doc)
    pod = doc["spec"]["template"]["spec"]
    # pinned to the machine or the group by its label; the image is multi-arch, no architecture (a comment shows how)
    assert pod["nodeSelector"].keys() & {"edge-agent/machine", "edge-agent/group"}
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert "secret" in next(v for v in pod["volumes"] if v["name"] == mounts["/run/secrets/edge-agent"])


def test_every_reference_from_a_workload_resolves() -> None:
    # a pod that mounts a ConfigMap, Secret or PVC nobody ships is stuck in ContainerCreating on the node
    assert unresolved_references(_k8s_docs()) == []


def _pod_spec_of(docs: list[tuple[str, dict[str, Any]]], kind: str) -> dict[str, Any]:
    return pod_spec(next(doc for _, doc in docs if doc["kind"] == kind))


def _volume(pod: dict[str, Any], field: str) -> dict[str, Any]:
    return next(v[field] for v in pod["volumes"] if field in v)


@pytest.mark.parametrize(
    ("kind", "break_it", "expected"),
    [
        ("DaemonSet", lambda p: _volume(p, "configMap").update(name="edge-agent-nowhere"), "ConfigMap edge-agent/"),
        ("Deployment", lambda p: _volume(p, "secret").update(secretName="mqtt-typo"), "Secret edge-agent/mqtt-typo"),
        (
            "Deployment",
            lambda p: _volume(p, "persistentVolumeClaim").update(claimName="skid-2-state"),
            "PersistentVolumeClaim edge-agent/skid-2-state",
        ),
        (
            "DaemonSet",
            lambda p: p["containers"][0]["env"][1]["valueFrom"]["secretKeyRef"].update(key="user"),
            "has no key 'user'",
        ),
        ("Deployment", lambda p: _volume(p, "configMap")["items"][0].update(key="conf.yaml"), "no key 'conf.yaml'"),
        (
            "DaemonSet",
            lambda p: p["containers"][0].update(envFrom=[{"configMapRef": {"name": "site-env"}}]),
            "ConfigMap edge-agent/site-env",
        ),
    ],
    ids=["configmap-volume", "secret-volume", "pvc", "secret-key", "configmap-key", "env-from"],
)
def test_a_dangling_reference_is_caught(kind: str, break_it: Any, expected: str) -> None:
    docs = copy.deepcopy(_k8s_docs())
    break_it(_pod_spec_of(docs, kind))
    problems = unresolved_references(docs)
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------- the configs the files carry


def _secret_env(tmp_path: Path) -> dict[str, str]:
    secret = tmp_path / "mqtt_password"
    secret.write_text("s3cret\n", encoding="utf-8")
    return {"MQTT_USERNAME": "skid-1", "EDGE_AGENT__MQTT__PASSWORD_FILE": str(secret)}


def test_sample_container_config_loads(tmp_path: Path) -> None:
    text = (DEPLOY / "config" / "edge-agent.yaml").read_text(encoding="utf-8")
    cfg = parse_config(text, source="edge-agent.yaml", environ=_secret_env(tmp_path))
    assert cfg.mqtt is not None and cfg.mqtt.password_file is not None
    assert str(cfg.outbox.path) == "/var/lib/edge-agent/outbox.db"
    assert cfg.observe.listen == "0.0.0.0:9108"
    assert [str(m.file) for m in cfg.models] == ["/opt/edge-agent/models/pump-skid-ae.tflite"]
    assert (ROOT / "models" / "pump-skid-ae.tflite").exists()  # what the image copies to /opt/edge-agent/models


def _tag_maps() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in _k8s_docs() if doc["kind"] == "ConfigMap" and "config.yaml" in doc["data"]]


def _env_of_workload_mounting(configmap: str, node: str) -> dict[str, str]:
    """The literal env of the agent container that mounts `configmap`, $(VAR)s expanded as the kubelet does."""
    docs = [doc for _, doc in _k8s_docs() if doc["kind"] in ("Deployment", "DaemonSet")]
    pod = next(
        d["spec"]["template"]["spec"]
        for d in docs
        if any(v.get("configMap", {}).get("name") == configmap for v in d["spec"]["template"]["spec"]["volumes"])
    )
    return literal_env(pod["containers"][0], node)


@pytest.mark.parametrize(("name", "cm"), _tag_maps(), ids=[n for n, _ in _tag_maps()])
def test_configmap_tag_map_loads(name: str, cm: dict[str, Any], tmp_path: Path) -> None:
    # with the env its workload gives it: EDGE_AGENT__… overrides must name real keys too
    env = {**_env_of_workload_mounting(cm["metadata"]["name"], "ipc-07"), **_secret_env(tmp_path)}
    cfg = parse_config(cm["data"]["config.yaml"], source=name, environ=env)
    assert cfg.mqtt is not None and cfg.mqtt.url.startswith("mqtts://")
    assert cfg.observe.listen == "0.0.0.0:9108"
    assert str(cfg.outbox.path) == "/var/lib/edge-agent/outbox.db"
    if "EDGE_AGENT__AGENT__ID" in env:  # the DaemonSet: one tag map, the node names the agent and its topics
        assert cfg.agent.id == "ipc-07"
        assert cfg.mqtt.topic_prefix.endswith("/ipc-07")


def test_a_broken_tag_map_is_refused(tmp_path: Path) -> None:
    cm = next(doc for _, doc in _k8s_docs() if doc["kind"] == "ConfigMap")
    text = cm["data"]["config.yaml"].replace('address: "40001"', 'address: "29999"')
    with pytest.raises(ConfigError):
        parse_config(text, source="configmap", environ=_secret_env(tmp_path))


# ---------------------------------------------------------------- systemd


def _unit_keys() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, v = line.split("=", 1)
            keys.setdefault(k.strip(), []).append(v.strip())
    return keys


def test_systemd_unit_is_hardened() -> None:
    keys = _unit_keys()
    for key, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "StateDirectory": "edge-agent",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "RestartPreventExitStatus": "2",
    }.items():
        assert keys.get(key) == [value], key
    assert any("run /etc/edge-agent/config.yaml" in v for v in keys["ExecStart"])


# ---------------------------------------------------------------- Dockerfile, Dockerfile.arm64


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_contract(dockerfile: Path) -> None:
    ins = instructions(dockerfile)
    assert ins[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm")
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${BASE_IMAGE}") for f in froms)
    runtime = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM") :]
    assert ("USER", "10001:10001") in runtime
    assert ("ENTRYPOINT", '["edge-agent"]') in runtime
    assert ("CMD", '["run", "/etc/edge-agent/config.yaml"]') in runtime
    assert ("VOLUME", '["/var/lib/edge-agent"]') in runtime
    assert any(w == "COPY" and "/opt/edge-agent/models/" in r for w, r in runtime)
    assert any(w == "HEALTHCHECK" and "/healthz" in r for w, r in runtime)
    pip_installs = [r for w, r in ins if w == "RUN" and "pip install" in r]
    assert pip_installs and all(r.count("pip install") == r.count("--only-binary=:all:") for r in pip_installs)
    # nothing of the build machine (its CA certificates, mirrors, proxies) belongs in the Dockerfile
    assert not re.search(r"ca-certificates/|PIP_INDEX_URL|http_proxy|trusted-host", dockerfile.read_text())
    # nothing names an architecture but the arm64 file's one argument: the platform comes from --platform
    rest = " ".join(r for _, r in ins if "EDGE_AGENT_ARCH" not in r)
    assert not re.search(r"amd64|arm64|aarch64|x86_64|--platform", rest)
    assert ("ARG", "TARGETARCH") in ins


def test_arm64_dockerfile_is_the_same_recipe() -> None:
    # Dockerfile.arm64 is kept for the arm64 build commands in use: the same instructions, the architecture
    # fixed; a change made to one file only fails here (comments may differ)
    recipe, arm64 = instructions(DOCKERFILE), instructions(DOCKERFILE_ARM64)
    assert ("ARG", "EDGE_AGENT_ARCH=") in recipe
    assert ("ARG", "EDGE_AGENT_ARCH=arm64") in arm64
    fixed = [("ARG", "EDGE_AGENT_ARCH=") if i == ("ARG", "EDGE_AGENT_ARCH=arm64") else i for i in arm64]
    assert fixed == recipe


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    for needed in ("pyproject.toml", "README.md", "edge_agent/", "models/", "deploy/config/edge-agent.yaml"):
        assert f"!{needed}" in patterns, needed
