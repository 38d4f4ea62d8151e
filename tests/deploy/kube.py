"""Checks of Kubernetes documents shared by the plain manifests (test_deploy_files.py) and the Helm chart
(test_helm.py): the schemas of the Kubernetes versions in use, the hardening of the agent's workload, the
references from a pod to ConfigMaps, Secrets and PVCs, and the environment the kubelet gives the agent."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from typing import Any

import pytest

# k3s / KubeEdge releases in the field span several minors: the oldest supported and the newest schemas
K8S_VERSIONS = ("1.28", "latest")

Docs = list[tuple[str, dict[str, Any]]]  # (where, document)


def kv() -> Any:
    """kubernetes-validate (dev dependency): Kubernetes' JSON schemas for every minor, offline."""
    return pytest.importorskip("kubernetes_validate", reason="dev dependency missing: pip install kubernetes-validate")


def k8s_version(version: str) -> str:
    return str(kv().utils.latest_version()) if version == "latest" else version


# Where a pod spec sits in each workload kind, and which kinds define the objects pods refer to by name.
POD_SPEC_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
REFERABLE = ("ConfigMap", "Secret", "PersistentVolumeClaim")


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    pod = doc
    for part in POD_SPEC_PATHS[doc["kind"]]:
        pod = pod[part]
    return pod


def pod_references(pod: dict[str, Any]) -> Iterator[tuple[str, str, str | None, bool]]:
    """(kind, name, key or None, optional) for every ConfigMap, Secret and PVC a pod spec refers to."""
    for vol in pod.get("volumes", []):
        if "configMap" in vol:
            ref = vol["configMap"]
            keys = [i["key"] for i in ref.get("items", [])] or [None]
            yield from (("ConfigMap", ref["name"], k, ref.get("optional", False)) for k in keys)
        if "secret" in vol:
            ref = vol["secret"]
            keys = [i["key"] for i in ref.get("items", [])] or [None]
            yield from (("Secret", ref["secretName"], k, ref.get("optional", False)) for k in keys)
        if "persistentVolumeClaim" in vol:
            yield ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"], None, False)
        for source in vol.get("projected", {}).get("sources", []):
            for kind, field in (("ConfigMap", "configMap"), ("Secret", "secret")):
                if field in source:
                    ref = source[field]
                    keys = [i["key"] for i in ref.get("items", [])] or [None]
                    yield from ((kind, ref["name"], k, ref.get("optional", False)) for k in keys)
    for secret in pod.get("imagePullSecrets", []):
        yield ("Secret", secret["name"], None, False)
    for container in pod.get("initContainers", []) + pod.get("containers", []):
        for env in container.get("env", []):
            source = env.get("valueFrom", {})
            for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                if field in source:
                    ref = source[field]
                    yield (kind, ref["name"], ref["key"], ref.get("optional", False))
        for env_from in container.get("envFrom", []):
            for kind, field in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if field in env_from:
                    ref = env_from[field]
                    yield (kind, ref["name"], None, ref.get("optional", False))


def defined_objects(docs: Docs) -> dict[tuple[str, str, str], set[str]]:
    """(kind, namespace, name) -> keys, of every ConfigMap, Secret and PVC among the documents."""
    defined: dict[tuple[str, str, str], set[str]] = {}
    for _, doc in docs:
        if doc["kind"] in REFERABLE:
            meta = doc["metadata"]
            keys = set(doc.get("data") or {}) | set(doc.get("stringData") or {}) | set(doc.get("binaryData") or {})
            defined[(doc["kind"], meta.get("namespace", "default"), meta["name"])] = keys
    return defined


def unresolved_references(docs: Docs, outside: Collection[tuple[str, str]] = ()) -> list[str]:
    """Every reference from a workload to a ConfigMap, Secret, PVC (or a key of one) the documents do not define.

    `outside`: (kind, name) of objects made elsewhere on purpose (the existing Secret a chart is told to use):
    referring to those is fine, and their keys are not known here.
    """
    defined = defined_objects(docs)
    problems = []
    for where, doc in docs:
        if doc["kind"] not in POD_SPEC_PATHS:
            continue
        namespace = doc["metadata"].get("namespace", "default")
        # a StatefulSet's claim templates define the PVCs its pods mount
        own_claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        for kind, name, key, optional in pod_references(pod_spec(doc)):
            if optional or (kind == "PersistentVolumeClaim" and name in own_claims) or (kind, name) in outside:
                continue
            keys = defined.get((kind, namespace, name))
            if keys is None:
                problems.append(f"{where}: {kind} {namespace}/{name} is defined by none of the documents")
            elif key is not None and key not in keys:
                problems.append(f"{where}: {kind} {namespace}/{name} has no key {key!r}")
    return problems


def literal_env(container: dict[str, Any], node: str) -> dict[str, str]:
    """A container's env with literal values and the node's name, $(VAR)s expanded as the kubelet does."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            env[var["name"]] = node
    return env


def assert_locked_down_and_probed(doc: dict[str, Any]) -> None:
    """The agent's workload: non-root, read-only root, no privilege escalation or capabilities, limits, probes on
    /healthz and /readyz, the outbox on a volume, /tmp in memory, config and secrets mounted."""
    pod = pod_spec(doc)
    # the image is multi-arch: no architecture pinned
    assert "kubernetes.io/arch" not in pod.get("nodeSelector", {})
    assert pod["automountServiceAccountToken"] is False
    (agent,) = pod["containers"]
    ctx = agent["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert ctx.get("privileged", False) is False
    assert ctx.get("runAsNonRoot", pod["securityContext"].get("runAsNonRoot")) is True
    assert ctx.get("runAsUser", pod["securityContext"].get("runAsUser")) == 10001
    assert {"cpu", "memory"} <= set(agent["resources"]["limits"])
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/var/lib/edge-agent"]].keys() & {"persistentVolumeClaim", "hostPath"}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "configMap" in volumes[mounts["/etc/edge-agent"]]
    for init in pod.get("initContainers", []):  # may run as root to chown, but with nothing else
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
        assert init["securityContext"]["readOnlyRootFilesystem"] is True
        assert init["securityContext"]["allowPrivilegeEscalation"] is False
