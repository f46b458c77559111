"""The Helm chart with the real helm binary: lint --strict, renders for a matrix of values, schema rejections."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.packaging import packaging_manifests as pm


def _lint(values: pm.Obj | None, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    args = ["lint", "--strict", str(pm.CHART), "--namespace", pm.NAMESPACE, "--kube-version", "1.34.0"]
    if values is not None:
        f = tmp_path / "values.yaml"
        f.write_text(yaml.safe_dump(values))
        args += ["-f", str(f)]
    return pm.helm(*args, check=False)


@pytest.mark.parametrize("name", sorted(pm.VALUE_MATRIX))
def test_lint_strict(helm: str, tmp_path: Path, name: str) -> None:
    r = _lint(pm.VALUE_MATRIX[name], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[WARNING]" not in r.stdout and "[ERROR]" not in r.stdout, r.stdout


def test_default_render_objects(renders: dict[str, list[pm.Obj]]) -> None:
    objs = renders["defaults"]
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    roles = ("leader-election", "engine-lease-writer", "engine-lease-reader", "provisioner-capacity", "operations")
    assert kinds == sorted([
        ("CSIDriver", "flashcopy.csi.dev"),
        ("ServiceAccount", "csi-flashcopy-node"),
        ("ServiceAccount", "csi-flashcopy-controller"),
        ("Secret", "csi-flashcopy-controller-tls"),
        ("Secret", "csi-flashcopy-node-tls"),
        ("NetworkPolicy", "csi-flashcopy-engine"),
        ("ValidatingAdmissionPolicy", "csi-flashcopy-kube-system-engine-leases"),
        ("ValidatingAdmissionPolicyBinding", "csi-flashcopy-kube-system-engine-leases"),
        ("ClusterRole", "csi-flashcopy-provisioner"),
        ("ClusterRole", "csi-flashcopy-snapshotter"),
        ("ClusterRole", "csi-flashcopy-resizer"),
        ("ClusterRoleBinding", "csi-flashcopy-provisioner"),
        ("ClusterRoleBinding", "csi-flashcopy-snapshotter"),
        ("ClusterRoleBinding", "csi-flashcopy-resizer"),
        ("ClusterRole", "csi-flashcopy-operations"),
        ("ClusterRoleBinding", "csi-flashcopy-operations"),
        *((kind, f"csi-flashcopy-{r}") for r in roles for kind in ("Role", "RoleBinding")),
        ("DaemonSet", "csi-flashcopy-node"),
        ("Deployment", "csi-flashcopy-controller"),
        ("StorageClass", "flashcopy"),
        ("VolumeSnapshotClass", "flashcopy"),
        ("VolumeGroupSnapshotClass", "flashcopy"),
        ("ValidatingAdmissionPolicy", "csi-flashcopy-operations"),
        ("ValidatingAdmissionPolicyBinding", "csi-flashcopy-operations"),
    ])
    for o in objs:
        labels = o["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "csi-flashcopy"
        assert labels["app.kubernetes.io/instance"] == pm.RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/component"]
        assert labels["helm.sh/chart"] == "csi-flashcopy-0.1.0"
        namespaced = o["kind"] not in ("CSIDriver", "ClusterRole", "ClusterRoleBinding", "StorageClass",
                                       "VolumeSnapshotClass", "VolumeGroupSnapshotClass",
                                       "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
        assert ("namespace" in o["metadata"]) == namespaced, o["metadata"]

    (ds,) = pm.of_kind(objs, "DaemonSet")
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}
    sc = pm.of_kind(objs, "StorageClass")[0]
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer" and sc["allowVolumeExpansion"] is True
    assert set(sc["parameters"]) == {"grainSize", "copyRate", "csi.storage.k8s.io/fstype"}
    (csidriver,) = pm.of_kind(objs, "CSIDriver")
    assert csidriver["spec"] == {"attachRequired": False, "podInfoOnMount": True, "fsGroupPolicy": "File",
                                 "volumeLifecycleModes": ["Persistent"], "storageCapacity": True}


def test_single_node_render(renders: dict[str, list[pm.Obj]]) -> None:
    objs = renders["single-node"]
    assert not pm.of_kind(objs, "Deployment") and not pm.of_kind(objs, "Secret")
    (ds,) = pm.of_kind(objs, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    names = [c["name"] for c in spec["containers"]]
    assert names == ["csi-flashcopy", "engine", "fuse-keeper", "node-driver-registrar", "liveness-probe",
                     "csi-provisioner", "csi-snapshotter", "csi-resizer"]
    assert spec["containers"][0]["args"][:2] == ["serve", "--mode=all"]
    # the all-in-one pod: the engine on its unix socket only, no TLS, no Leases, no capacity tracking
    (engine,) = [c for c in spec["containers"] if c["name"] == "engine"]
    assert engine["args"] == ["engine", "--state-dir=/var/lib/csi-flashcopy",
                              "--endpoint=unix:///var/lib/csi-flashcopy/engine.sock", "--fuse-keeper=external",
                              "--log-format=text", "--log-level=info"]
    assert "ports" not in engine and "env" not in engine
    assert "engine-tls" not in {v["name"] for v in spec["volumes"]}
    (csidriver,) = pm.of_kind(objs, "CSIDriver")
    assert "storageCapacity" not in csidriver["spec"]
    assert sorted(o["metadata"]["name"] for o in pm.of_kind(objs, "Role")) == ["csi-flashcopy-leader-election",
                                                                               "csi-flashcopy-operations"]
    assert [o["metadata"]["name"] for o in pm.of_kind(objs, "ServiceAccount")] == ["csi-flashcopy-node"]


def test_multi_node_render(renders: dict[str, list[pm.Obj]]) -> None:
    objs = renders["defaults"]
    (ds,) = pm.of_kind(objs, "DaemonSet")
    (dep,) = pm.of_kind(objs, "Deployment")
    node_spec, ctl_spec = ds["spec"]["template"]["spec"], dep["spec"]["template"]["spec"]
    assert [c["name"] for c in node_spec["containers"]] == [
        "csi-flashcopy", "engine", "fuse-keeper", "node-driver-registrar", "liveness-probe"]
    assert node_spec["containers"][0]["args"][:2] == ["serve", "--mode=node"]
    # the engine keeps its Lease through the API server
    assert node_spec["automountServiceAccountToken"] is True
    assert [c["name"] for c in ctl_spec["containers"]] == [
        "csi-flashcopy", "csi-provisioner", "csi-snapshotter", "csi-resizer", "liveness-probe"]
    assert ctl_spec["containers"][0]["args"][:2] == ["serve", "--mode=controller"]
    assert dep["spec"]["replicas"] == 2
    # The controller is unprivileged and non-root, unlike the node plugin.
    assert ctl_spec["securityContext"]["runAsNonRoot"] is True
    for c in ctl_spec["containers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    sas = sorted(o["metadata"]["name"] for o in pm.of_kind(objs, "ServiceAccount"))
    assert sas == ["csi-flashcopy-controller", "csi-flashcopy-node"]
    for b in pm.of_kind(objs, "ClusterRoleBinding") + pm.of_kind(objs, "RoleBinding"):
        node = b["metadata"]["name"] == "csi-flashcopy-engine-lease-writer"
        assert [s["name"] for s in b["subjects"]] == ["csi-flashcopy-node" if node else "csi-flashcopy-controller"]


def test_matrix_renders_follow_values(renders: dict[str, list[pm.Obj]]) -> None:
    def driver_args(objs: list[pm.Obj]) -> list[list[str]]:
        return [c["args"] for _, _, c in pm.containers(objs) if pm.is_driver_container(c) and c["args"][0] == "serve"]

    # leader election off: no leader-election Role, sidecars told so, no leader-election probe
    objs = renders["multi-node-no-le-metrics"]
    for kind in ("Role", "RoleBinding"):
        assert "csi-flashcopy-leader-election" not in {o["metadata"]["name"] for o in pm.of_kind(objs, kind)}
    for _, _, c in pm.containers(objs):
        if c["name"] in ("csi-provisioner", "csi-snapshotter", "csi-resizer"):
            assert "--leader-election=false" in c["args"] and "livenessProbe" not in c
    for args in driver_args(objs):
        assert "--metrics-address=$(POD_IP):9900" in args  # the pod IP only (issue 22)
    assert pm.of_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]["affinity"] == {"nodeAffinity": {}}

    objs = renders["embedded-engine-json-logs"]
    (ds,) = pm.of_kind(objs, "DaemonSet")
    assert "engine" not in [c["name"] for c in ds["spec"]["template"]["spec"]["containers"]]
    (args,) = [a for a in driver_args(objs) if "--mode=node" in a]
    assert pm.flag_value(args, "--engine") is None and pm.flag_value(args, "--engine-endpoint") is None
    assert {"--log-format=json", "--log-level=debug", "--max-volumes-per-node=16"} <= set(args)
    # serve starts the engine itself and hands it the TCP listener for the controllers
    assert {"--engine-listen=$(POD_IP):9820", "--tls-dir=/etc/flashcopy/tls", "--namespace=$(POD_NAMESPACE)"} \
        <= set(args)
    (plugin,) = ds["spec"]["template"]["spec"]["containers"][:1]
    assert {"name": "engine", "containerPort": 9820, "protocol": "TCP"} in plugin["ports"]
    assert {"name": "engine-tls", "mountPath": "/etc/flashcopy/tls", "readOnly": True} in plugin["volumeMounts"]
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}

    objs = renders["renamed-driver-custom-dirs"]
    (ds,) = pm.of_kind(objs, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["containers"][0]["image"] == "registry.example.com/storage/csi-flashcopy:0.1.0-rc1"
    vols = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert vols["socket-dir"] == "/var/snap/microk8s/common/var/lib/kubelet/plugins/fc.example.com"
    assert vols["state-dir"] == "/srv/flashcopy"

    assert not [o for o in renders["classes-off"] if o["kind"].endswith("Class")]

    objs = renders["classes-tuned"]
    (sc,) = pm.of_kind(objs, "StorageClass")
    assert sc["metadata"]["annotations"] == {"storageclass.kubernetes.io/is-default-class": "true"}
    assert sc["parameters"] == {"grainSize": "64Ki", "copyRate": "100", "cleanRate": "20",
                                "csi.storage.k8s.io/fstype": "xfs"}
    assert (sc["reclaimPolicy"], sc["volumeBindingMode"], sc["allowVolumeExpansion"]) == ("Retain", "Immediate", False)
    assert sc["mountOptions"] == ["noatime"]
    (vsc,) = pm.of_kind(objs, "VolumeSnapshotClass")
    assert vsc["parameters"] == {"copyRate": "50"} and "annotations" not in vsc["metadata"]
    (vgsc,) = pm.of_kind(objs, "VolumeGroupSnapshotClass")
    assert vgsc["metadata"]["name"] == "flashcopy-group" and vgsc["deletionPolicy"] == "Retain"

    objs = renders["scheduling-and-resources"]
    (ds,) = pm.of_kind(objs, "DaemonSet")
    tpl = ds["spec"]["template"]
    assert "priorityClassName" not in tpl["spec"]
    # helm merges maps with the defaults
    assert tpl["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux", "kubernetes.io/hostname": "node-1"}
    assert tpl["metadata"]["annotations"] == {"example.com/scrape": "true"}
    assert tpl["metadata"]["labels"]["team"] == "storage"
    assert tpl["spec"]["containers"][0]["resources"] == {"limits": {"memory": "512Mi"},
                                                          "requests": {"cpu": "100m", "memory": 128}}
    prov = next(c for _, _, c in pm.containers(objs) if c["name"] == "csi-provisioner")
    assert {"--v=5", "--timeout=2m", "--worker-threads=10"} <= set(prov["args"])
    sas = pm.of_kind(objs, "ServiceAccount")
    assert len(sas) == 2 and all(sa["metadata"]["annotations"] == {"example.com/role": "csi"} for sa in sas)


def test_release_name_and_namespace_flow_through(helm: str) -> None:
    objs = pm.helm_template(release="storage", namespace="flashcopy-system")
    names = {o["metadata"]["name"] for o in objs}
    assert {"storage-csi-flashcopy-node", "storage-csi-flashcopy-controller", "storage-csi-flashcopy-provisioner",
            "storage-csi-flashcopy-controller-tls", "storage-csi-flashcopy-node-tls"} <= names
    for o in objs:
        if "namespace" in o["metadata"]:
            assert o["metadata"]["namespace"] == "flashcopy-system"
        for s in o.get("subjects", []):
            assert s["namespace"] == "flashcopy-system"
            assert s["name"] in ("storage-csi-flashcopy-node", "storage-csi-flashcopy-controller")
    for pod, spec, _ in pm.containers(objs):
        role = "node" if pod["kind"] == "DaemonSet" else "controller"
        assert {"name": "engine-tls", "secret": {"secretName": f"storage-csi-flashcopy-{role}-tls",
                                                 "defaultMode": 0o440}} in spec["volumes"]


def test_refuses_kubernetes_older_than_1_31(helm: str) -> None:
    r = pm.helm("template", "x", str(pm.CHART), "--kube-version", "1.30.9", check=False)
    assert r.returncode != 0 and "requires kubeVersion: >=1.31.0-0" in r.stderr
    pm.helm("template", "x", str(pm.CHART), "--kube-version", "1.31.0")


BAD_VALUES: dict[str, tuple[pm.Obj, str]] = {
    "port-as-string": ({"metrics": {"port": "http"}}, "/metrics/port"),
    "driver-name-as-number": ({"driverName": 7}, "/driverName"),
    "driver-name-not-dns": ({"driverName": "Flash_Copy"}, "/driverName"),
    "unknown-top-level-key": ({"replicas": 3}, "replicas"),
    "unknown-nested-key": ({"node": {"hostNetwork": True}}, "hostNetwork"),
    "unknown-sidecar": ({"sidecars": {"attacher": {"image": {}}}}, "attacher"),
    "bool-as-string": ({"leaderElection": {"enabled": "yes"}}, "/leaderElection/enabled"),
    "topology-typo": ({"topology": "multinode"}, "/topology"),
    "latest-image-tag": ({"image": {"tag": "latest"}}, "/image/tag"),
    "unpinned-sidecar": ({"sidecars": {"resizer": {"image": {"tag": ""}}}}, "/sidecars/resizer/image/tag"),
    "grain-size-unsupported": ({"storageClass": {"parameters": {"grainSize": "128Ki"}}}, "grainSize"),
    "copy-rate-out-of-range": ({"storageClass": {"parameters": {"copyRate": 151}}}, "copyRate"),
    "unknown-class-parameter": ({"volumeSnapshotClass": {"parameters": {"copyrate": "1"}}}, "copyrate"),
    "extra-args-not-a-list": ({"sidecars": {"provisioner": {"extraArgs": "--v=5"}}}, "extraArgs"),
    "tolerations-not-a-list": ({"node": {"tolerations": {"operator": "Exists"}}}, "tolerations"),
    "relative-state-dir": ({"stateDir": "var/lib/csi-flashcopy"}, "/stateDir"),
    "negative-max-volumes": ({"maxVolumesPerNode": -1}, "/maxVolumesPerNode"),
    "bad-quantity": ({"node": {"resources": {"requests": {"memory": "lots"}}}}, "memory"),
    "bad-duration": ({"sidecars": {"snapshotter": {"timeout": 60}}}, "timeout"),
    "engine-port-zero": ({"engine": {"port": 0}}, "/engine/port"),
    "engine-port-too-big": ({"engine": {"port": 65536}}, "/engine/port"),
    "engine-port-as-string": ({"engine": {"port": "9820"}}, "/engine/port"),
    "unknown-tls-key": ({"tls": {"caBundle": "x"}}, "caBundle"),
    "unknown-cert-manager-key": ({"tls": {"certManager": {"duration": "2160h"}}}, "duration"),
    "issuer-kind-typo": ({"tls": {"certManager": {"issuerRef": {"name": "ca", "kind": "Clusterissuer"}}}},
                         "/tls/certManager/issuerRef/kind"),
    "tls-secret-not-a-name": ({"tls": {"existingSecrets": {"controller": "My Secret", "node": "n"}}},
                              "/tls/existingSecrets/controller"),
    "one-existing-tls-secret": ({"tls": {"existingSecrets": {"controller": "mine"}}}, "/tls/existingSecrets"),
    "old-single-tls-secret": ({"tls": {"existingSecret": "mine"}}, "existingSecret"),
    "two-tls-sources": ({"tls": {"existingSecrets": {"controller": "c", "node": "n"},
                                 "certManager": {"issuerRef": {"name": "ca"}}}}, "/tls"),
}


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_wrong_values_are_rejected(helm: str, tmp_path: Path, name: str) -> None:
    values, where = BAD_VALUES[name]
    r = _lint(values, tmp_path)
    assert r.returncode != 0, f"lint accepted {values}"
    assert where in r.stdout + r.stderr, r.stdout + r.stderr
    f = tmp_path / "values.yaml"
    t = pm.helm("template", "x", str(pm.CHART), "-f", str(f), check=False)
    assert t.returncode != 0 and "values don't meet the specifications of the schema" in t.stderr, t.stderr


def test_notes_render(helm: str, tmp_path: Path) -> None:
    # helm renders NOTES.txt only on install; render it offline through a probe template in a copy of the chart.
    chart = tmp_path / "chart"
    shutil.copytree(pm.CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "notes-probe.yaml").write_text(
        '{{- define "notes.probe" -}}\n' + notes + "\n{{- end -}}\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  text: {{ include "notes.probe" . | quote }}\n'
    )
    for topology, expect in (("single-node", "one-node cluster"), ("multi-node", "get leases")):
        out = pm.helm("template", pm.RELEASE, str(chart), "-n", pm.NAMESPACE, "--set", f"topology={topology}",
                      "--show-only", "templates/notes-probe.yaml").stdout
        text = yaml.safe_load(out)["data"]["text"]
        assert expect in text
        assert "deploy/examples/snapshot.yaml" in text and "flashcopy.csi.dev" in text
        for example in ("pvc-and-pod.yaml", "snapshot.yaml", "restore.yaml", "group-snapshot.yaml"):
            assert (pm.EXAMPLES / example).exists()


def test_generated_kustomize_files_are_current(helm: str) -> None:
    r = subprocess.run([sys.executable, str(pm.REPO / "deploy" / "generate.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, "deploy/kubernetes is stale; run python3 deploy/generate.py\n" + r.stdout + r.stderr
