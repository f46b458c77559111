"""Rendering helpers shared by the packaging tests and tests/k8s: real helm and kubectl, parsed into dicts."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "csi-flashcopy"
KUSTOMIZE_BASE = REPO / "deploy" / "kubernetes"  # the chart's default topology (multi-node)
KUSTOMIZE_MULTI = KUSTOMIZE_BASE / "multi-node"
KUSTOMIZE_SINGLE = KUSTOMIZE_BASE / "single-node"
# The multi-node kustomize render mounts the Secrets the installer creates (deploy/generate.py TLS_SECRETS).
KUSTOMIZE_TLS_SECRETS = {"controller": "csi-flashcopy-controller-tls", "node": "csi-flashcopy-node-tls"}
EXAMPLES = REPO / "deploy" / "examples"
RELEASE = "csi-flashcopy"
NAMESPACE = "kube-system"
HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")
CRD_KINDS = {"VolumeSnapshotClass", "VolumeGroupSnapshotClass", "VolumeSnapshot", "VolumeGroupSnapshot"}
PEER_K8S = REPO.parent / "shared" / "peers" / "k8s"
# external-snapshot-metadata v1.1.0: the sidecar binary, its CRD and RBAC (README there)
PEER_SNAPSHOT_METADATA = REPO.parent / "shared" / "peers" / "snapshot-metadata"
# snapshotMetadata.enabled renders only with the SnapshotMetadataService CRD in the cluster (or this flag)
SNAPSHOT_METADATA_API = ("--api-versions", "cbt.storage.k8s.io/v1beta1/SnapshotMetadataService")

Obj = dict[str, Any]

# Non-default values the chart must render (and lint, validate, keep consistent) as well as the defaults. Only
# built-in kinds (tests/k8s dry-runs these on an API server without cert-manager: the certManager render is
# tested on its own in test_packaging_multinode.py).
VALUE_MATRIX: dict[str, Obj] = {
    "defaults": {},
    "single-node": {"topology": "single-node"},
    "existing-tls-secret-port": {"tls": {"existingSecrets": {"controller": "ctl-mtls", "node": "node-mtls"}},
                                 "engine": {"port": 19820}},
    "single-node-embedded-engine": {"topology": "single-node", "engine": {"separateContainer": False}},
    "multi-node-no-le-metrics": {
        "topology": "multi-node",
        "leaderElection": {"enabled": False},
        "metrics": {"enabled": True, "port": 9900},
        "controller": {"replicas": 1, "affinity": {"nodeAffinity": {}}},
    },
    "embedded-engine-json-logs": {
        "engine": {"separateContainer": False},
        "logFormat": "json",
        "logLevel": "debug",
        "maxVolumesPerNode": 16,
        "node": {"updateStrategy": "RollingUpdate"},
    },
    "renamed-driver-custom-dirs": {
        "driverName": "fc.example.com",
        "stateDir": "/srv/flashcopy",
        "kubeletDir": "/var/snap/microk8s/common/var/lib/kubelet",
        "image": {"repository": "registry.example.com/storage/csi-flashcopy", "tag": "0.1.0-rc1",
                  "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
    },
    "classes-off": {
        "storageClass": {"create": False},
        "volumeSnapshotClass": {"create": False},
        "volumeGroupSnapshotClass": {"create": False},
    },
    "classes-tuned": {
        "storageClass": {
            "name": "flashcopy-fast", "isDefault": True, "reclaimPolicy": "Retain",
            "volumeBindingMode": "Immediate", "allowVolumeExpansion": False, "mountOptions": ["noatime"],
            "parameters": {"grainSize": "64Ki", "copyRate": 100, "cleanRate": "20",
                           "csi.storage.k8s.io/fstype": "xfs"},
        },
        "volumeSnapshotClass": {"name": "flashcopy-full", "isDefault": False, "deletionPolicy": "Retain",
                                "parameters": {"copyRate": "50"}},
        "volumeGroupSnapshotClass": {"name": "flashcopy-group", "deletionPolicy": "Retain"},
    },
    "scheduling-and-resources": {
        "node": {
            "priorityClassName": "",
            "nodeSelector": {"kubernetes.io/hostname": "node-1"},
            "tolerations": [{"key": "storage", "operator": "Equal", "value": "local", "effect": "NoSchedule"}],
            "podAnnotations": {"example.com/scrape": "true"},
            "podLabels": {"team": "storage"},
            "resources": {"limits": {"memory": "512Mi"}, "requests": {"cpu": "100m", "memory": 128}},
        },
        "sidecars": {"logLevel": 5, "provisioner": {"extraArgs": ["--worker-threads=10"], "timeout": "2m"},
                     "livenessProbe": {"extraArgs": ["--probe-timeout=10s"]}},
        "serviceAccount": {"annotations": {"example.com/role": "csi"}},
    },
}

# snapshotMetadata.enabled renders, kept out of VALUE_MATRIX: their SnapshotMetadataService needs a CRD that the
# test control plane of tests/k8s does not have. Rendered with SNAPSHOT_METADATA_API (helm_template_smd).
SNAPSHOT_METADATA_MATRIX: dict[str, Obj] = {
    "snapshot-metadata": {"snapshotMetadata": {"enabled": True}},
    "snapshot-metadata-single-node": {
        "topology": "single-node",
        "snapshotMetadata": {"enabled": True, "port": 50151, "httpPort": 9824, "audience": "backup.example.com",
                             "extraArgs": ["--max-streaming-duration-min=30"]},
    },
}


# kustomize directory -> (path, the chart values it is the render of)
KUSTOMIZE_RENDERS: dict[str, tuple[Path, Obj]] = {
    "base": (KUSTOMIZE_BASE, {"tls": {"existingSecrets": KUSTOMIZE_TLS_SECRETS}}),
    "multi-node": (KUSTOMIZE_MULTI, {"topology": "multi-node", "tls": {"existingSecrets": KUSTOMIZE_TLS_SECRETS}}),
    "single-node": (KUSTOMIZE_SINGLE, {"topology": "single-node"}),
}


def tool(name: str) -> str | None:
    return shutil.which(name)


def parse_docs(text: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(text) if d]


def _values_file(values: Obj, tmp: Path) -> Path:
    path = tmp / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = tool("helm")
    assert exe, "helm not on PATH"
    return subprocess.run([exe, *args], capture_output=True, text=True, check=check)


def helm_template_text(values: Obj | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE,
                       kube_version: str = "1.34.0", extra: tuple[str, ...] = ()) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", kube_version, *extra]
        if values:
            args += ["-f", str(_values_file(values, Path(tmp)))]
        return helm(*args).stdout


def helm_template(values: Obj | None = None, **kw: Any) -> list[Obj]:
    return parse_docs(helm_template_text(values, **kw))


def helm_template_smd(values: Obj | None = None, **kw: Any) -> list[Obj]:
    """helm template as if the SnapshotMetadataService CRD were installed (snapshotMetadata.enabled needs it)."""
    extra = tuple(kw.pop("extra", ()))
    return helm_template(values, extra=SNAPSHOT_METADATA_API + extra, **kw)


def kustomize(path: Path) -> list[Obj]:
    exe = tool("kubectl")
    assert exe, "kubectl not on PATH"
    out = subprocess.run([exe, "kustomize", str(path)], capture_output=True, text=True, check=True).stdout
    return parse_docs(out)


def examples() -> dict[str, list[Obj]]:
    return {p.name: parse_docs(p.read_text()) for p in sorted(EXAMPLES.glob("*.yaml"))}


def strip_helm_labels(obj: Obj) -> Obj:
    """A deep copy without the labels only a Helm render carries (metadata and pod template labels)."""
    obj = json.loads(json.dumps(obj))
    for meta in (obj.get("metadata", {}), obj.get("spec", {}).get("template", {}).get("metadata", {})):
        labels = meta.get("labels") or {}
        for key in HELM_ONLY_LABELS:
            labels.pop(key, None)
    return obj


def key(obj: Obj) -> tuple[str, str, str, str]:
    meta = obj.get("metadata", {})
    return (obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])


def by_key(objs: list[Obj]) -> dict[tuple[str, str, str, str], Obj]:
    out = {key(o): o for o in objs}
    assert len(out) == len(objs), "duplicate objects in one render"
    return out


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def pod_specs(objs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for o in objs:
        if o["kind"] in ("DaemonSet", "Deployment", "StatefulSet"):
            yield o, o["spec"]["template"]["spec"]


def containers(objs: list[Obj]) -> Iterator[tuple[Obj, Obj, Obj]]:
    """(workload, pod spec, container) for every container of every workload."""
    for o, spec in pod_specs(objs):
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            yield o, spec, c


def image_name(image: str) -> str:
    """registry/path/name:tag -> name"""
    return image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]


def is_driver_container(c: Obj) -> bool:
    return image_name(c["image"]) == "csi-flashcopy"


def flag_value(args: list[str], flag: str) -> str | None:
    for a in args:
        if a == flag:
            return ""
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def deep_merge(base: Obj, over: Obj) -> Obj:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def chart_values(overrides: Obj | None = None) -> Obj:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    return deep_merge(defaults, overrides or {})


def peer_crd_schemas() -> dict[tuple[str, str], Obj]:
    """(apiVersion, kind) -> openAPIV3Schema of the peer's snapshot CRDs (external-snapshotter v8.6.0); {} if absent."""
    out: dict[tuple[str, str], Obj] = {}
    crd_dir = PEER_K8S / "crd"
    if not crd_dir.is_dir():
        return out
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if v.get("served"):
                out[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return out
