"""`csi-flashcopy clone` against a real control plane (../shared/peers/k8s: kube-apiserver, PV controllers,
snapshot-controller, csi-provisioner and csi-snapshotter) and the real driver (`csi-flashcopy serve --engine
embedded`) behind the sidecars. The CLI runs as a subprocess with KUBECONFIG, as a user runs it.

Its own peer instance (no helm: up.sh starts the sidecars itself); module-scoped fixtures make the shared set-up
(classes, source PVC), and each test makes the clones it needs: the tests pass in any order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.k8s.test_k8s_flow import (
    DRIVER,
    NODE,
    POLL,
    SKIP,
    WAIT,
    Cluster,
    Driver,
    GiB,
    quantity_bytes,
    running_peer,
)
from tests.packaging import packaging_manifests as pm
from tests.waiting import wait_for

pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

NS = "clones"
SNAP = "snapshot.storage.k8s.io/v1"
MANAGED = "app.kubernetes.io/managed-by=csi-flashcopy-clone"


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_peer(tmp_path_factory.mktemp("k8s-clone-peer"), "provisioner snapshotter") as c:
        yield c


@pytest.fixture(scope="module")
def driver(peer: Cluster) -> Iterator[Driver]:
    from csi_driver.proto_gen import csi_pb2

    sock = peer.state / "csi.sock"  # where up.sh pointed the sidecars
    argv = [sys.executable, "-m", "csi_driver", "serve", f"--endpoint=unix://{sock}",
            f"--state-dir={peer.state / 'driver-state'}", f"--node-id={NODE}", "--engine=embedded"]
    env = {k: v for k, v in peer.env.items() if not k.startswith("CSI_")}
    env["PYTHONPATH"] = str(pm.REPO) + os.pathsep + env.get("PYTHONPATH", "")
    d = Driver(peer.start("csi-flashcopy", argv, env), sock, peer.state / "driver-state")

    def ready() -> bool:
        assert d.proc.popen.poll() is None, d.proc.text()
        try:
            return sock.exists() and d.stubs()[0].Probe(csi_pb2.ProbeRequest(), timeout=2).ready.value
        except Exception:
            return False

    wait_for(ready, timeout=60, what="csi-flashcopy Probe ready", interval=POLL, why=d.proc.text)
    try:
        yield d
    finally:
        d.proc.stop()


@pytest.fixture(scope="module")
def api(peer: Cluster) -> Any:
    from kubernetes import config, dynamic

    return dynamic.DynamicClient(config.new_client_from_config(config_file=str(peer.kubeconfig)))


def _obj(api: Any, version: str, kind: str, name: str, ns: str | None = NS) -> dict[str, Any] | None:
    from kubernetes.dynamic.exceptions import NotFoundError

    try:
        return api.resources.get(api_version=version, kind=kind).get(name=name, namespace=ns).to_dict()
    except NotFoundError:
        return None


def _list(api: Any, version: str, kind: str, ns: str | None = NS, selector: str = "") -> list[dict[str, Any]]:
    r = api.resources.get(api_version=version, kind=kind)
    return r.get(namespace=ns, label_selector=selector).to_dict()["items"]


def _apply(api: Any, obj: dict[str, Any]) -> None:
    r = api.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    r.create(body=obj, namespace=NS if r.namespaced else None)


def clone(peer: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(peer.env, PYTHONPATH=str(pm.REPO) + os.pathsep + peer.env.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "csi_driver", "clone", "--namespace", NS, *args],
                          capture_output=True, text=True, env=env, timeout=120, cwd=pm.REPO)


@pytest.fixture(scope="module")
def source(peer: Cluster, api: Any, driver: Driver) -> str:
    """What node-driver-registrar and an admin would do: Node + CSINode, classes, a namespace, a source PVC.
    Every test asks for it, so the module passes in any order."""
    from csi_driver.proto_gen import csi_pb2

    info = driver.stubs()[2].NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
    segments = dict(info.accessible_topology.segments)
    _apply(api, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": segments}})
    _apply(api, {"apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": {"name": NODE},
                 "spec": {"drivers": [{"name": DRIVER, "nodeID": info.node_id, "topologyKeys": sorted(segments)}]}})
    _apply(api, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    for name, mode in (("fc-immediate", "Immediate"), ("fc-wffc", "WaitForFirstConsumer")):
        _apply(api, {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": name},
                     "provisioner": DRIVER, "volumeBindingMode": mode, "allowVolumeExpansion": True})
    _apply(api, {"apiVersion": SNAP, "kind": "VolumeSnapshotClass", "metadata": {"name": "flashcopy"},
                 "driver": DRIVER, "deletionPolicy": "Delete"})
    # no sidecar serves this driver: its snapshots never become ready (the timeout test)
    _apply(api, {"apiVersion": SNAP, "kind": "VolumeSnapshotClass", "metadata": {"name": "nobody"},
                 "driver": "nobody.csi.dev", "deletionPolicy": "Retain"})
    _apply(api, {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "src"},
                 "spec": {"storageClassName": "fc-immediate", "accessModes": ["ReadWriteOnce"],
                          "resources": {"requests": {"storage": "1Gi"}}}})
    wait_for(lambda: (_obj(api, "v1", "PersistentVolumeClaim", "src") or {}).get("status", {}).get("phase") == "Bound",
             timeout=WAIT, what="PVC src Bound", interval=POLL, why=peer.logs)
    return "src"


def test_source_pvc_binds(api: Any, source: str) -> None:
    pvc = _obj(api, "v1", "PersistentVolumeClaim", source)
    assert pvc["status"]["phase"] == "Bound" and pvc["spec"]["storageClassName"] == "fc-immediate"


def _state(api: Any) -> tuple[list[str], list[str]]:
    return (sorted(s["metadata"]["name"] for s in _list(api, SNAP, "VolumeSnapshot")),
            sorted(p["metadata"]["name"] for p in _list(api, "v1", "PersistentVolumeClaim")))


def _qa_clones(peer: Cluster, api: Any) -> subprocess.CompletedProcess[str] | None:
    """The two qa clones (made here unless they exist): None when they existed already."""
    if _obj(api, "v1", "PersistentVolumeClaim", "src-clone-1") is not None:
        return None
    return clone(peer, "--from-pvc", "src", "--size", "2Gi", "--count", "2", "--label", "team=qa", "--wait", "60")


def _dev_copy(peer: Cluster, api: Any) -> subprocess.CompletedProcess[str] | None:
    if _obj(api, "v1", "PersistentVolumeClaim", "dev-copy") is not None:
        return None
    return clone(peer, "--from-pvc", "src", "--name", "dev-copy", "--storage-class", "fc-wffc", "--label",
                 "team=dev", "--wait", "60")


def test_errors_are_one_line_exit_2(peer: Cluster, api: Any, source: str) -> None:
    before = _state(api)
    cases = {
        ("--from-pvc", "nope"): "source PVC clones/nope not found",
        ("--from-pvc", "src", "--size", "2Gx"): "bad size '2Gx'",
        ("--from-pvc", "src", "--size", "512Mi"): "smaller than the source's 1Gi",
        ("--from-pvc", "src", "--storage-class", "missing"): "unknown StorageClass missing",
        ("--from-pvc", "src", "--snapshot-class", "missing"): "unknown VolumeSnapshotClass missing",
        ("--from-pvc", "src", "--name", "src"): "PVC clones/src already exists",
        ("--from-pvc", "src", "--label", "bad key=v"): "bad label 'bad key=v'",
        ("--delete",): "--delete needs --selector",
    }
    for args, message in cases.items():
        r = clone(peer, *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.strip().splitlines() == [f"csi-flashcopy clone: {r.stderr.split(': ', 1)[1].strip()}"]
        assert message in r.stderr, (args, r.stderr)
        assert r.stdout == ""
    # nothing was created by any of them
    assert _state(api) == before


def test_dry_run_creates_nothing(peer: Cluster, api: Any, source: str) -> None:
    before = _state(api)
    r = clone(peer, "--from-pvc", "src", "--name", "dry", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert [line.split()[:3] for line in r.stdout.splitlines()] == [["dry", "would", "be"]]
    r = clone(peer, "--from-pvc", "src", "--count", "2", "--dry-run", "--label", "team=dry")
    assert r.returncode in (0, 2), r.stderr
    if r.returncode == 0:  # (2: the qa clones exist already under these names)
        assert [line.split()[:3] for line in r.stdout.splitlines()] == [
            ["src-clone-1", "would", "be"], ["src-clone-2", "would", "be"]]
    assert _state(api) == before


def test_clones_bind_from_one_snapshot(peer: Cluster, api: Any, driver: Driver, source: str) -> None:
    r = _qa_clones(peer, api)
    if r is not None:
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{peer.logs()}"
        assert r.stdout.splitlines() == ["src-clone-1 Bound", "src-clone-2 Bound"]
    snaps = _list(api, SNAP, "VolumeSnapshot", selector="team=qa")
    assert len(snaps) == 1 and snaps[0]["status"]["readyToUse"]
    snap = snaps[0]
    assert snap["spec"]["source"]["persistentVolumeClaimName"] == "src"
    content = _obj(api, SNAP, "VolumeSnapshotContent", snap["status"]["boundVolumeSnapshotContentName"], None)
    snapshot_id = content["status"]["snapshotHandle"]
    from csi_driver.proto_gen import csi_pb2

    entries = driver.stubs()[1].ListVolumes(csi_pb2.ListVolumesRequest(), timeout=10).entries
    by_id = {e.volume.volume_id: e.volume for e in entries}
    for name in ("src-clone-1", "src-clone-2"):
        pvc = _obj(api, "v1", "PersistentVolumeClaim", name)
        assert pvc["metadata"]["labels"] == {"team": "qa", "app.kubernetes.io/managed-by": "csi-flashcopy-clone"}
        assert pvc["spec"]["dataSource"] == {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                                             "name": snap["metadata"]["name"]}
        assert pvc["spec"]["storageClassName"] == "fc-immediate"  # the source's
        pv = _obj(api, "v1", "PersistentVolume", pvc["spec"]["volumeName"], None)
        assert quantity_bytes(pv["spec"]["capacity"]["storage"]) == 2 * GiB
        # the driver holds the volume, made from that snapshot, at the asked size
        vol = by_id[pv["spec"]["csi"]["volumeHandle"]]
        assert vol.capacity_bytes == 2 * GiB
        assert vol.content_source.snapshot.snapshot_id == snapshot_id
    assert snapshot_id in driver.volumes_and_snapshots()[1]


def test_wait_for_first_consumer_is_reported_not_failed(peer: Cluster, api: Any, source: str) -> None:
    old = _obj(api, "v1", "PersistentVolumeClaim", "dev-copy")
    if old is not None:  # made by the delete test's set-up: start from a fresh one
        clone(peer, "--delete", "-l", "team=dev", "--wait", "60")
    r = _dev_copy(peer, api)
    assert r is not None and r.returncode == 0, r and r.stderr
    assert r.stdout.splitlines() == [
        "dev-copy Pending (StorageClass fc-wffc is WaitForFirstConsumer: binds when a pod uses it)"]
    pvc = _obj(api, "v1", "PersistentVolumeClaim", "dev-copy")
    assert pvc["status"]["phase"] == "Pending" and pvc["spec"]["storageClassName"] == "fc-wffc"


def test_snapshot_timeout_is_an_error_and_cleans_up(peer: Cluster, api: Any, source: str) -> None:
    r = clone(peer, "--from-pvc", "src", "--name", "never", "--snapshot-class", "nobody", "--wait", "3")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "timed out after 3s waiting for VolumeSnapshot" in r.stderr and "deleted it" in r.stderr
    assert _obj(api, "v1", "PersistentVolumeClaim", "never") is None
    wait_for(lambda: not [s for s in _list(api, SNAP, "VolumeSnapshot")
                          if s["spec"]["volumeSnapshotClassName"] == "nobody"],
             timeout=30, what="the timed-out snapshot gone", interval=POLL, why=peer.logs)


def test_delete_removes_clones_then_their_snapshot(peer: Cluster, api: Any, driver: Driver, source: str) -> None:
    for made in (_qa_clones(peer, api), _dev_copy(peer, api)):
        assert made is None or made.returncode == 0, made.stderr
    src_handle = _obj(api, "v1", "PersistentVolume",
                      _obj(api, "v1", "PersistentVolumeClaim", "src")["spec"]["volumeName"], None)["spec"]["csi"][
        "volumeHandle"]
    dev_snap = _list(api, SNAP, "VolumeSnapshot", selector="team=dev")[0]["metadata"]["name"]
    qa_snap = _list(api, SNAP, "VolumeSnapshot", selector="team=qa")[0]["metadata"]["name"]

    r = clone(peer, "--delete", "--selector", "team=qa", "--wait", "60")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["src-clone-1 deleted", "src-clone-2 deleted", f"volumesnapshot/{qa_snap} deleted"]
    # the dev clone and its snapshot are untouched; the source is never selected
    assert [s["metadata"]["name"] for s in _list(api, SNAP, "VolumeSnapshot")] == [dev_snap]
    assert sorted(p["metadata"]["name"] for p in _list(api, "v1", "PersistentVolumeClaim")) == ["dev-copy", "src"]

    r = clone(peer, "--delete", "-l", "team=dev", "--wait", "60")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["dev-copy deleted", f"volumesnapshot/{dev_snap} deleted"]
    r = clone(peer, "--delete", "-l", "team=dev")
    assert (r.returncode, r.stdout, r.stderr.strip()) == (0, "", "no clones in clones match team=dev")

    def only_source_left() -> bool:
        pvs = [pv["spec"]["csi"]["volumeHandle"] for pv in _list(api, "v1", "PersistentVolume", None)]
        return (pvs == [src_handle] and not _list(api, SNAP, "VolumeSnapshot", selector=MANAGED)
                and not [c for c in _list(api, SNAP, "VolumeSnapshotContent", None) if c["spec"]["driver"] == DRIVER]
                and driver.volumes_and_snapshots() == ({src_handle}, set()))

    wait_for(only_source_left, timeout=60, what="only the source volume left in Kubernetes and in the driver",
             interval=POLL, why=lambda: f"{driver.volumes_and_snapshots()}\n{peer.logs()}")
