"""The Helm chart deploy/helm/edge-agent, rendered by a real helm (tests/run.sh installs it at .venv/bin/helm; HELM
names another): `helm lint`, then `helm template` with the default values and each values file of the chart's
ci/ folder. Every rendered document is checked against the Kubernetes schemas (the versions the manifest tests
use, strict), the workload against the hardening of deploy/k8s, every ConfigMap, Secret and PVC it refers to must
be made by the release or be one the values name as existing, the config the release renders must load through
the agent's own loader with the environment the workload gives it, and every file that config names must be in
the image or in what is mounted there. The last tests break the chart, its values or its config on purpose and
show that these checks fail.
"""

from __future__ import annotations

import base64
import functools
import os
import shutil
import subprocess
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from kube import (
    K8S_VERSIONS,
    Docs,
    assert_locked_down_and_probed,
    defined_objects,
    k8s_version,
    kv,
    literal_env,
    pod_references,
    pod_spec,
    unresolved_references,
)
from shipped import DEPLOY, ROOT

from edge_agent.config import parse_config
from edge_agent.config.schema import Config
from edge_agent.errors import ConfigError

CHART = DEPLOY / "helm" / "edge-agent"
NAMESPACE = "edge-agent"
IMAGE_MODELS = PurePosixPath("/opt/edge-agent/models")  # what the Dockerfile copies from models/
BUNDLE = ROOT / "models" / "pump-skid-ae.tflite"


@functools.cache
def _helm() -> str:
    helm = os.environ.get("HELM") or str(ROOT / ".venv" / "bin" / "helm")
    try:
        subprocess.run([helm, "version", "--short"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(
            f"no working helm at {helm} ({exc}): `bash tests/run.sh` installs one at .venv/bin/helm on x86_64 "
            "machines; elsewhere put a helm 3 there, or name one in HELM=/path/to/helm",
            pytrace=False,
        )
    return helm


def _run_helm(*args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_helm(), *args], cwd=chart, capture_output=True, text=True, timeout=120)


@functools.cache
def _render(args: tuple[str, ...], chart: Path = CHART) -> Docs:
    """`helm template` of a release `site` in NAMESPACE: (where, document) for every document."""
    done = _run_helm("template", "site", ".", "--namespace", NAMESPACE, *args, chart=chart)
    assert done.returncode == 0, done.stderr
    docs = []
    for text in done.stdout.split("\n---\n"):
        doc = yaml.safe_load(text)
        if doc:
            source = text.split("# Source: ", 1)[1].split("\n", 1)[0] if "# Source: " in text else "?"
            docs.append((f"{source}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


@dataclass(frozen=True)
class Case:
    """A values file (or the defaults) and what its release must hold."""

    id: str
    args: tuple[str, ...]
    kind: str  # Deployment or DaemonSet
    made: frozenset[str]  # kinds of the objects the release makes besides the workload
    outside: frozenset[tuple[str, str]]  # (kind, name) of what the values name as existing
    node: str = "ipc-07"
    env: dict[str, str] = field(default_factory=dict, hash=False)  # what the agent must see in its environment


def _models_from(bundle: Path, name: str) -> tuple[str, ...]:
    # the README's way to put a bundle into the release: base64 on the command line
    key = name.replace(".", "\\.")  # helm reads a dot in --set as a level
    return ("--set-string", f"models.binaryData.{key}={base64.b64encode(bundle.read_bytes()).decode()}")


CASES = [
    Case(
        "default",
        (),
        "Deployment",
        frozenset({"ConfigMap", "PersistentVolumeClaim", "Service"}),
        frozenset({("Secret", "edge-agent-mqtt")}),
    ),
    Case(
        "site",  # one release per site: Deployment, inline config, the chart makes the Secret and the models
        ("-f", "ci/site-values.yaml", *_models_from(BUNDLE, "pump-skid-ae-v3.tflite")),
        "Deployment",
        frozenset({"ConfigMap", "Secret", "PersistentVolumeClaim", "Service"}),
        frozenset(),
        env={"EDGE_AGENT__OBSERVE__LOG_FORMAT": "json"},
    ),
    Case(
        "daemonset",  # a DaemonSet per node label, outbox on hostPath, the node's name as agent id
        ("-f", "ci/daemonset-values.yaml"),
        "DaemonSet",
        frozenset({"ConfigMap", "Service"}),
        frozenset({("Secret", "edge-agent-mqtt"), ("ConfigMap", "pump-skid-models")}),
        env={"EDGE_AGENT__AGENT__ID": "ipc-07", "EDGE_AGENT__MQTT__TOPIC_PREFIX": "plant-a/pump-skids/ipc-07"},
    ),
    Case(
        "existing",  # config, Secret, models and outbox claim all made elsewhere
        ("-f", "ci/existing-values.yaml"),
        "Deployment",
        frozenset({"Service"}),
        frozenset(
            {
                ("ConfigMap", "plant-a-skid-2-config"),
                ("Secret", "plant-a-skid-2-mqtt"),
                ("Secret", "registry-plant-a"),
                ("PersistentVolumeClaim", "plant-a-models"),
                ("PersistentVolumeClaim", "plant-a-skid-2-outbox"),
            }
        ),
        env={"EDGE_AGENT__AGENT__ID": "skid-2"},
    ),
]
IDS = [c.id for c in CASES]


def _workload(docs: Docs) -> dict[str, Any]:
    (workload,) = [doc for _, doc in docs if doc["kind"] in ("Deployment", "DaemonSet")]
    return workload


def _agent(docs: Docs) -> dict[str, Any]:
    (agent,) = pod_spec(_workload(docs))["containers"]
    return agent


# ---------------------------------------------------------------- lint and schemas


def test_ci_folder_holds_exactly_the_cases() -> None:
    files = {f"ci/{p.name}" for p in (CHART / "ci").glob("*.yaml")}
    assert files == {c.args[1] for c in CASES if c.args}, "a values file in ci/ that no case renders, or the reverse"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chart_lints(case: Case) -> None:
    done = _run_helm("lint", "--strict", ".", *case.args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout


def test_chart_says_which_kubernetes_it_needs() -> None:
    # kubeVersion: the oldest minor the schema tests cover renders, an older one is refused
    assert _run_helm("template", ".", "--kube-version", "1.28.0").returncode == 0
    done = _run_helm("template", ".", "--kube-version", "1.27.9")
    assert done.returncode != 0 and "kubeVersion" in done.stderr, done.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_rendered_documents_match_the_kubernetes_schema(case: Case, version: str) -> None:
    kube = k8s_version(version)
    args = case.args if version == "latest" else (*case.args, "--kube-version", f"{kube}.0")
    docs = _render(args)
    kinds = {doc["kind"] for _, doc in docs}
    assert kinds == {case.kind, *case.made}
    for where, doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE, where
        try:  # strict: unknown fields are errors too (the API server would drop them without a word)
            kv().validate(doc, kube, strict=True)
        except kv().ValidationError as exc:
            pytest.fail(f"{where} against Kubernetes {kube}: {exc}")


# ---------------------------------------------------------------- the workload


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_workload_is_locked_down_and_probed(case: Case) -> None:
    docs = _render(case.args)
    workload = _workload(docs)
    assert workload["kind"] == case.kind
    assert_locked_down_and_probed(workload)
    pod, agent = pod_spec(workload), _agent(docs)
    # the agent image's multi-arch tag, the version of this agent
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    project = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'\nversion = "{chart["appVersion"]}"\n' in project, "the chart's appVersion is not the agent's version"
    assert agent["image"].endswith(f"/edge-agent:{chart['appVersion']}")
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["fsGroup"] == 10001
    assert not any("subPath" in m for m in agent["volumeMounts"])  # the kubelet never updates a subPath mount
    port = next(p["containerPort"] for p in agent["ports"] if p["name"] == "metrics")
    env = literal_env(agent, case.node)
    assert env["EDGE_AGENT__OBSERVE__LISTEN"] == f"0.0.0.0:{port}"  # the probes' port, whatever the config says
    assert {k: env.get(k) for k in case.env} == case.env
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    if case.kind == "Deployment":
        assert workload["spec"]["replicas"] == 1 and workload["spec"]["strategy"] == {"type": "Recreate"}
    else:
        assert pod["nodeSelector"], "a DaemonSet without a nodeSelector runs an agent on every node"
        assert workload["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0
    if "hostPath" in state:  # root-owned on the node: the init container hands it to uid 10001, nothing more
        (init,) = pod["initContainers"]
        assert init["command"] == ["chown", "10001:10001", "/var/lib/edge-agent"]
    else:
        assert "initContainers" not in pod
    annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
    if case.id == "existing":  # metrics.scrapeAnnotations: false
        assert "prometheus.io/scrape" not in annotations
    else:
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port)
    services = [doc for _, doc in docs if doc["kind"] == "Service"]
    for svc in services:  # inside the cluster only, and it selects this release's pods
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["selector"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        assert svc["spec"]["ports"][0]["targetPort"] == "metrics"


def _manifest(kind: str) -> dict[str, Any]:
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc and doc["kind"] == kind:
                return dict(doc)
    raise AssertionError(f"no {kind} in deploy/k8s")


def test_default_config_is_the_manifests_tag_map() -> None:
    (cm,) = [d for _, d in _render(()) if d["kind"] == "ConfigMap"]
    assert cm["data"]["config.yaml"] == _manifest("ConfigMap")["data"]["config.yaml"]  # k8s/10-configmap.yaml


def _subset(shipped: dict[str, Any], chart: dict[str, Any]) -> bool:
    """Every field the manifest sets, the chart sets to the same value (the chart may set more)."""
    assert {k: chart.get(k) for k in shipped} == shipped
    return True


@pytest.mark.parametrize(("kind", "case_id"), [("Deployment", "default"), ("DaemonSet", "daemonset")])
def test_chart_mirrors_the_manifests(kind: str, case_id: str) -> None:
    # the chart and deploy/k8s are one design: a change to the probes, resources or security of one fails here
    # until the other has it too
    (case,) = [c for c in CASES if c.id == case_id]
    chart, manifest = _workload(_render(case.args)), _manifest(kind)
    chart_pod, manifest_pod = pod_spec(chart), pod_spec(manifest)
    for key in ("tolerations", "automountServiceAccountToken", "enableServiceLinks", "terminationGracePeriodSeconds"):
        assert chart_pod[key] == manifest_pod[key], key
    assert _subset(manifest_pod["securityContext"], chart_pod["securityContext"])
    for key in ("strategy", "updateStrategy", "replicas"):
        assert chart["spec"].get(key) == manifest["spec"].get(key), key
    (agent,), (shipped,) = chart_pod["containers"], manifest_pod["containers"]
    for key in ("ports", "startupProbe", "livenessProbe", "readinessProbe", "resources", "imagePullPolicy", "args"):
        assert agent[key] == shipped[key], key
    assert _subset(shipped["securityContext"], agent["securityContext"])
    mounts = {m["mountPath"] for m in agent["volumeMounts"] if m["name"] != "models"}  # the manifests have none
    assert mounts == {m["mountPath"] for m in shipped["volumeMounts"]}
    volumes = {v["name"]: v for v in chart_pod["volumes"]}
    shipped_volumes = {v["name"]: v for v in manifest_pod["volumes"]}
    assert volumes["tmp"] == shipped_volumes["tmp"]
    assert volumes["state"].keys() == shipped_volumes["state"].keys()  # a PVC, or a hostPath
    for init, mirrored in zip(chart_pod.get("initContainers", []), manifest_pod.get("initContainers", []), strict=True):
        for key in ("command", "resources", "volumeMounts"):
            assert init[key] == mirrored[key], key
        assert _subset(mirrored["securityContext"], init["securityContext"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_reference_is_made_by_the_release_or_named_as_existing(case: Case) -> None:
    docs = _render(case.args)
    # a pod that mounts a ConfigMap, Secret or PVC nobody made is stuck in ContainerCreating on the node
    assert unresolved_references(docs, outside=case.outside) == []
    referred = {(kind, name) for kind, name, _, _ in pod_references(pod_spec(_workload(docs)))}
    assert case.outside <= referred, "the case names as existing what the release does not use"


def test_pvc_outlives_the_release() -> None:
    # helm uninstall keeps the outbox (events may still wait in it); a reinstall under the same name reuses it
    (pvc,) = [doc for _, doc in _render(()) if doc["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["storageClassName"] == "local-path"


# ---------------------------------------------------------------- the config the release renders


def _secret_values(docs: Docs) -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc.get("stringData", {}) for _, doc in docs if doc["kind"] == "Secret"}


def _agent_env(case: Case, docs: Docs) -> dict[str, str]:
    """The agent's environment as the kubelet gives it: literal values, the node name, and Secret keys (a Secret
    made elsewhere: a stand-in value)."""
    agent = _agent(docs)
    env = literal_env(agent, case.node)
    secrets = _secret_values(docs)
    for var in agent.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            env[var["name"]] = secrets[ref["name"]][ref["key"]] if ref["name"] in secrets else "from-the-secret"
    return env


def _mounted(path: PurePosixPath, docs: Docs, outside: Collection[tuple[str, str]]) -> str | None:
    """Why the file at `path` would not be there in the agent's container (None: it would)."""
    pod = pod_spec(_workload(docs))
    if path.is_relative_to(IMAGE_MODELS):
        return None if (ROOT / "models" / path.relative_to(IMAGE_MODELS)).is_file() else "not in the image"
    mounts = [m for m in _agent(docs)["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    if not mounts:
        return "not under any mount, nor in the image"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    rel = str(path.relative_to(mount["mountPath"]))
    for kind, field_, name_field in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
        if field_ in volume:
            ref = volume[field_]
            items = {i["path"]: i["key"] for i in ref.get("items", [])}
            if items and rel not in items:
                return f"{kind} volume {mount['name']} has no item at {rel}"
            key = items.get(rel, rel)
            if (kind, ref[name_field]) in outside:
                return None  # made elsewhere: its keys are not known here
            keys = defined_objects(docs).get((kind, NAMESPACE, ref[name_field]), set())
            return None if key in keys else f"{kind} {ref[name_field]} has no key {key!r}"
    return None  # a PVC or hostPath: what it holds is not known here


def _files_named(cfg: Config, password_file: str | None) -> list[str]:
    files = [str(m.file) for m in cfg.models]
    if cfg.mqtt is not None:
        files += [str(p) for p in (password_file, cfg.mqtt.tls and cfg.mqtt.tls.ca) if p]
        if cfg.mqtt.tls is not None:
            files += [str(p) for p in (cfg.mqtt.tls.cert, cfg.mqtt.tls.key) if p]
    return files


def _load_rendered_config(case: Case, docs: Docs, tmp_path: Path) -> Config:
    """The release's config.yaml through the agent's loader, with the workload's environment; the files it names
    must be in the image or mounted."""
    agent = _agent(docs)
    config_volume = next(v for v in pod_spec(_workload(docs))["volumes"] if v["name"] == "config")["configMap"]
    (cm,) = [d for _, d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == config_volume["name"]]
    key = config_volume["items"][0]["key"]
    assert agent["args"] == ["run", f"/etc/edge-agent/{config_volume['items'][0]['path']}"]
    text = cm["data"][key]
    env = _agent_env(case, docs)
    # the loader reads mqtt.password_file at load time: hand it what the Secret holds at that path
    raw = yaml.safe_load(text).get("mqtt") or {}
    password_file = env.get("EDGE_AGENT__MQTT__PASSWORD_FILE", raw.get("password_file"))
    if password_file:
        path = PurePosixPath(password_file)
        stand_in = tmp_path / path.name
        secrets = _secret_values(docs)
        stand_in.write_text(next((s[path.name] for s in secrets.values() if path.name in s), "from-the-secret\n"))
        env["EDGE_AGENT__MQTT__PASSWORD_FILE"] = str(stand_in)
    cfg = parse_config(text, source=f"{cm['metadata']['name']}/{key}", environ=env)
    problems = {f: _mounted(PurePosixPath(f), docs, case.outside) for f in _files_named(cfg, password_file)}
    missing = {f: p for f, p in problems.items() if p}
    assert not missing, f"files the config names that the agent's container would not have: {missing}"
    return cfg


@pytest.mark.parametrize("case", [c for c in CASES if c.id != "existing"], ids=[i for i in IDS if i != "existing"])
def test_rendered_config_loads(case: Case, tmp_path: Path) -> None:
    docs = _render(case.args)
    cfg = _load_rendered_config(case, docs, tmp_path)
    assert cfg.mqtt is not None and cfg.mqtt.url.startswith("mqtts://") and cfg.mqtt.password is not None
    assert cfg.mqtt.username is not None and cfg.mqtt.username != ""
    assert str(cfg.outbox.path) == "/var/lib/edge-agent/outbox.db"  # on the state volume
    if case.kind == "DaemonSet":  # one config, the node names the agent and its topics
        assert cfg.agent.id == case.node
        assert cfg.mqtt.topic_prefix == f"plant-a/pump-skids/{case.node}"
    if case.id == "site":  # the chart's Secret reaches the loader through the mounted file
        assert cfg.mqtt.password.get_secret_value() == "not-a-real-password"
        assert cfg.mqtt.username == "plant-b-press-1"


def test_existing_configmap_is_not_rendered() -> None:
    (case,) = [c for c in CASES if c.id == "existing"]
    docs = _render(case.args)
    assert not [d for _, d in docs if d["kind"] == "ConfigMap"]
    volume = next(v for v in pod_spec(_workload(docs))["volumes"] if v["name"] == "config")["configMap"]
    assert volume == {"name": "plant-a-skid-2-config", "items": [{"key": "skid-2.yaml", "path": "skid-2.yaml"}]}
    assert _agent(docs)["args"] == ["run", "/etc/edge-agent/skid-2.yaml"]


def test_inline_config_is_kept_byte_for_byte() -> None:
    # so the status' config_sha256 is `sha256sum` of the file in git (--set-file config.inline=...)
    (case,) = [c for c in CASES if c.id == "site"]
    values = yaml.safe_load((CHART / "ci" / "site-values.yaml").read_text(encoding="utf-8"))
    (cm,) = [d for _, d in _render(case.args) if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {})]
    assert cm["data"]["config.yaml"] == values["config"]["inline"]
    assert values["config"]["inline"].startswith("# plant-b")  # comments too
    # and a file given with --set-file, as README.md shows
    sample = DEPLOY / "config" / "edge-agent.yaml"
    (cm,) = [d for _, d in _render(("--set-file", f"config.inline={sample}")) if d["kind"] == "ConfigMap"]
    assert cm["data"]["config.yaml"] == sample.read_text(encoding="utf-8")


def test_model_bundles_reach_the_pod_unchanged() -> None:
    (case,) = [c for c in CASES if c.id == "site"]
    docs = _render(case.args)
    (models,) = [d for _, d in docs if d["kind"] == "ConfigMap" and "binaryData" in d]
    assert base64.b64decode(models["binaryData"]["pump-skid-ae-v3.tflite"]) == BUNDLE.read_bytes()
    mount = next(m for m in _agent(docs)["volumeMounts"] if m["name"] == "models")
    assert mount == {"name": "models", "mountPath": "/etc/edge-agent-models", "readOnly": True}


# ---------------------------------------------------------------- broken on purpose: the checks fail


def test_a_broken_config_fails_to_load(tmp_path: Path) -> None:
    (case,) = [c for c in CASES if c.id == "site"]
    values = yaml.safe_load((CHART / "ci" / "site-values.yaml").read_text(encoding="utf-8"))
    broken = tmp_path / "broken.yaml"
    broken.write_text(values["config"]["inline"].replace('address: "40001"', 'address: "29999"'), encoding="utf-8")
    docs = _render((*case.args, "--set-file", f"config.inline={broken}"))
    with pytest.raises(ConfigError, match="29999"):
        _load_rendered_config(case, docs, tmp_path)


def test_a_broken_override_from_the_values_fails_to_load(tmp_path: Path) -> None:
    # what the chart puts in the environment is part of the config: a wildcard in the topic prefix is refused
    (case,) = [c for c in CASES if c.id == "daemonset"]
    docs = _render((*case.args, "--set", "agent.topicPrefix=plant-a/+/$(NODE_NAME)"))
    with pytest.raises(ConfigError, match="wildcards"):
        _load_rendered_config(case, docs, tmp_path)


def test_a_config_naming_a_bundle_nobody_ships_fails(tmp_path: Path) -> None:
    (case,) = [c for c in CASES if c.id == "site"]
    args = (*case.args[:2], *_models_from(BUNDLE, "pump-skid-ae-v2.tflite"))  # the config asks for v3
    with pytest.raises(AssertionError, match=r"has no key 'pump-skid-ae-v3\.tflite'"):
        _load_rendered_config(case, _render(args), tmp_path)


def test_a_dangling_reference_is_caught() -> None:
    (case,) = [c for c in CASES if c.id == "default"]
    docs = _render(("--set", "config.existingConfigMap=skid-1-typo"))
    assert unresolved_references(docs, outside=case.outside) == [
        "edge-agent/templates/workload.yaml:Deployment/site-edge-agent: "
        "ConfigMap edge-agent/skid-1-typo is defined by none of the documents"
    ]


@pytest.fixture
def chart_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "edge-agent"
    shutil.copytree(CHART, copy)
    return copy


def _break_template(chart: Path, old: str, new: str) -> None:
    workload = chart / "templates" / "workload.yaml"
    text = workload.read_text(encoding="utf-8")
    assert old in text
    workload.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_a_misspelt_field_in_a_template_fails_the_schema(chart_copy: Path) -> None:
    old = "imagePullPolicy: {{ .Values.image.pullPolicy }}\n          args:"
    _break_template(chart_copy, old, "imagePullPolcy: IfNotPresent\n          args:")
    workload = _workload(_render((), chart=chart_copy))
    with pytest.raises(kv().ValidationError, match="imagePullPolcy"):
        kv().validate(workload, k8s_version("latest"), strict=True)


def test_a_weakened_template_fails_the_hardening_check(chart_copy: Path) -> None:
    ctx = "            readOnlyRootFilesystem: true\n            capabilities: {drop: [ALL]}\n"
    _break_template(chart_copy, ctx, "            capabilities: {drop: [ALL]}\n")
    workload = _workload(_render((), chart=chart_copy))
    kv().validate(workload, k8s_version("latest"), strict=True)  # still a valid manifest
    with pytest.raises(KeyError, match="readOnlyRootFilesystem"):
        assert_locked_down_and_probed(workload)


def test_a_template_that_renders_no_yaml_fails(chart_copy: Path) -> None:
    _break_template(chart_copy, "      volumes:\n", "     volumes:\n")
    done = _run_helm("template", ".", chart=chart_copy)
    assert done.returncode != 0 and "YAML parse error" in done.stderr, done.stderr
    done = _run_helm("lint", ".", chart=chart_copy)
    assert done.returncode != 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--set", "kind=DaemonSet"), "needs a nodeSelector"),
        (("--set", "kind=DaemonSet", "--set", "nodeSelector.a=b", "--set", "persistence.type=pvc"), "one PVC"),
        (("--set", "kind=StatefulSet"), "kind must be one of"),
        (("--set", "persistance.type=hostPath"), "Additional property persistance is not allowed"),
        (("--set", "secrets.create.mqtt_password=x"), 'names the key "username"'),
        (("--set", "secrets.existingSecret=", "--set", "secrets.create=null"), "secrets.env takes variables"),
        (("--set", "models.existingConfigMap=a", "--set", "models.volume.emptyDir.medium=Memory"), "give one of"),
        (("--set", "config.inline=", "--set", "config.existingConfigMap="), "config: give"),
    ],
    ids=[
        "daemonset-everywhere",
        "daemonset-pvc",
        "kind",
        "misspelt-key",
        "secret-key",
        "env-without-secret",
        "two-model-sources",
        "no-config",
    ],
)
def test_values_that_cannot_run_are_refused(args: tuple[str, ...], expected: str) -> None:
    done = _run_helm("template", ".", *args)
    assert done.returncode != 0, f"rendered: {args}"
    assert expected in done.stderr, done.stderr
