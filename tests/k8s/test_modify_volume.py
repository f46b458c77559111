"""ModifyVolume through a VolumeAttributesClass against the real control plane (../shared/peers/k8s:
kube-apiserver 1.35 serving storage.k8s.io/v1 VolumeAttributesClass, csi-provisioner v6.3, csi-resizer v2.2).

The chart is installed with its example VolumeAttributesClasses; the controller sidecars run with the installed
DaemonSet's args under its ServiceAccount (the chart's RBAC authorizes them), `csi-flashcopy engine` and
`serve --engine process` with the args of its containers. A source PVC gets 32 MiB of data through the node
engine (a staged raw block device), a VolumeSnapshot of it, and a clone PVC from the snapshot is created with the
chart's `flashcopy-paused` class (copyRate 0): its background copy makes no progress (measured in the engine's
Report of the mapping). Patching the PVC to `flashcopy-fast` (copyRate 150) makes csi-resizer call
ControllerModifyVolume, and the copy completes (figures printed). A class with an unknown key is refused: the
PVC's status.modifyVolumeStatus and its events carry the INVALID_ARGUMENT naming the key.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.datapath.conftest import KERNEL_SKIP
from tests.k8s.test_k8s_flow import (  # noqa: F401 - cluster, k8s, namespace, registered, sidecars: fixtures
    DRIVER,
    NODE,
    NS,
    POLL,
    SKIP,
    WAIT,
    Cluster,
    Driver,
    _pod_containers,
    cluster,
    create,
    get,
    k8s,
    namespace,
    registered,
    res,
    sidecars,
    wait_bound,
)
from tests.packaging import packaging_manifests as pm
from tests.waiting import wait_for

pytestmark = pytest.mark.skipif(SKIP is not None or KERNEL_SKIP is not None,
                                reason=SKIP or f"data goes in through a staged block device: {KERNEL_SKIP}")

MiB = 1 << 20
DATA = 32 * MiB
SRC, SNAP, CLONE = "vac-src", "vac-src-snap", "vac-clone"
FAST, PAUSED, BOGUS = "flashcopy-fast", "flashcopy-paused", "flashcopy-bogus"


@pytest.fixture(scope="module")
def installed(cluster: Cluster, namespace: str) -> Any:  # noqa: F811
    """`helm install` with the example VolumeAttributesClasses on (the single-node topology: one serve process)."""
    import subprocess

    r = subprocess.run(["helm", "install", pm.RELEASE, str(pm.CHART), "--namespace", pm.NAMESPACE,
                        "--set", "topology=single-node", "--set", "volumeAttributesClasses.create=true",
                        "--kubeconfig", str(cluster.kubeconfig), "--wait=false"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def _remap(args: list[str], c: Cluster) -> list[str]:
    state = c.state / "driver-state"
    out = []
    for a in args:
        flag = a.split("=", 1)[0]
        if flag == "--endpoint":
            a = f"--endpoint=unix://{c.state / 'csi.sock'}" if args[0] == "serve" else \
                f"--endpoint=unix://{state / 'engine.sock'}"
        elif flag == "--engine-endpoint":
            a = f"--engine-endpoint=unix://{state / 'engine.sock'}"
        elif flag == "--state-dir":
            a = f"--state-dir={state}"
        elif flag == "--node-id":
            a = f"--node-id={NODE}"
        out.append(a)
    return out


@pytest.fixture(scope="module")
def driver(cluster: Cluster, k8s: Any, installed: Any) -> Iterator[Driver]:  # noqa: F811
    """The node engine and `serve --engine process` with the installed DaemonSet's container args (paths remapped):
    the test reads copy progress from the engine's Report, as `csi-flashcopy status` does."""
    from csi_driver.proto_gen import csi_pb2

    containers = _pod_containers(k8s, "DaemonSet", f"{pm.RELEASE}-node")
    engine_args = next(c["args"] for c in containers.values() if c.get("args", [""])[0] == "engine")
    serve_args = containers["csi-flashcopy"]["args"]
    assert "--engine=process" in serve_args
    env = {k: v for k, v in cluster.env.items() if not k.startswith("CSI_")}
    env["PYTHONPATH"] = str(pm.REPO) + os.pathsep + env.get("PYTHONPATH", "")
    (cluster.state / "driver-state").mkdir(exist_ok=True)
    engine = cluster.start("csi-flashcopy-engine", [sys.executable, "-m", "csi_driver", *_remap(engine_args, cluster)],
                           env)
    proc = cluster.start("csi-flashcopy", [sys.executable, "-m", "csi_driver", *_remap(serve_args, cluster)], env)
    d = Driver(proc, cluster.state / "csi.sock", cluster.state / "driver-state")

    def ready() -> bool:
        for p in (engine, proc):
            if p.popen.poll() is not None:
                raise AssertionError(f"{p.name} exited {p.popen.returncode}:\n{p.text()}")
        if not d.sock.exists():
            return False
        try:
            return d.stubs()[0].Probe(csi_pb2.ProbeRequest(), timeout=2).ready.value
        except Exception:
            return False

    wait_for(ready, timeout=60, what="csi-flashcopy Probe ready", interval=POLL, why=proc.text)
    yield d
    proc.stop()
    engine.stop()


def engine_backend(d: Driver) -> Any:
    from csi_driver.remote.client import RemoteBackend

    return RemoteBackend(f"unix://{d.state_dir / 'engine.sock'}")


def pvc(name: str, size: str, *, source: dict[str, str] | None = None, vac: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "storageClassName": "flashcopy",
                            "resources": {"requests": {"storage": size}}, "volumeMode": "Block"}
    if source:
        spec["dataSource"] = source
    if vac:
        spec["volumeAttributesClassName"] = vac
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "annotations": {"volume.kubernetes.io/selected-node": NODE}}, "spec": spec}


def handle(k8s: Any, name: str) -> str:  # noqa: F811
    p = get(k8s, "v1", "PersistentVolumeClaim", name, NS)
    pv = get(k8s, "v1", "PersistentVolume", p["spec"]["volumeName"])
    return str(pv["spec"]["csi"]["volumeHandle"])


def write_block(d: Driver, volume_id: str, data: bytes) -> None:
    """What the node plugin and a pod would do: stage and publish as a raw block device, write, undo."""
    b = engine_backend(d)
    work = d.state_dir.parent / "paths" / volume_id
    staging, target = work / "staging", work / "target"
    staging.mkdir(parents=True, exist_ok=True)
    b.node_stage(volume_id, str(staging), block=True, fs_type="", mount_flags=[], read_only=False)
    try:
        b.node_publish(volume_id, str(staging), str(target), block=True, read_only=False, mount_flags=[])
        fd = os.open(target, os.O_RDWR)
        try:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
            b.node_unpublish(volume_id, str(target))
    finally:
        b.node_unstage(volume_id, str(staging))
        b.close()


def copy_into(d: Driver, volume_id: str) -> Any:
    b = engine_backend(d)
    try:
        maps = [m for m in b.report().mappings if volume_id.endswith(m.target_id) or m.target_id == volume_id]
    finally:
        b.close()
    assert len(maps) == 1, maps
    return maps[0]


def events_of(c: Cluster, name: str) -> str:
    return c.kubectl("-n", NS, "get", "events", "--field-selector", f"involvedObject.name={name}",
                           "-o", "custom-columns=REASON:.reason,MSG:.message", check=False).stdout


def test_volume_attributes_classes_installed(k8s: Any, installed: Any) -> None:  # noqa: F811
    fast = get(k8s, "storage.k8s.io/v1", "VolumeAttributesClass", FAST)
    paused = get(k8s, "storage.k8s.io/v1", "VolumeAttributesClass", PAUSED)
    assert fast["driverName"] == paused["driverName"] == DRIVER
    assert (fast["parameters"], paused["parameters"]) == ({"copyRate": "150"}, {"copyRate": "0"})


def test_copy_rate_follows_the_volume_attributes_class(
        cluster: Cluster, k8s: Any, driver: Driver, sidecars: Any) -> None:  # noqa: F811
    pvcs = res(k8s, "v1", "PersistentVolumeClaim")
    create(k8s, pvc(SRC, "64Mi"))
    wait_bound(k8s, cluster, SRC)
    data = bytes(range(256)) * (DATA // 256)
    write_block(driver, handle(k8s, SRC), data)
    create(k8s, {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot", "metadata": {"name": SNAP},
                 "spec": {"volumeSnapshotClassName": "flashcopy", "source": {"persistentVolumeClaimName": SRC}}})
    wait_for(lambda: (get(k8s, "snapshot.storage.k8s.io/v1", "VolumeSnapshot", SNAP, NS) or {})
             .get("status", {}).get("readyToUse"), timeout=WAIT, interval=POLL, what="snapshot ready",
             why=cluster.logs)

    # the clone, created with the paused class: CreateVolume's mutable_parameters set copyRate 0 on its mapping
    create(k8s, pvc(CLONE, "64Mi", vac=PAUSED,
                    source={"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": SNAP}))
    wait_bound(k8s, cluster, CLONE)
    vid = handle(k8s, CLONE)
    m0 = copy_into(driver, vid)
    assert m0.copy_rate == 0 and m0.progress < 100, m0
    time.sleep(3.0)
    m1 = copy_into(driver, vid)
    assert m1.progress == m0.progress and m1.bytes_to_copy == m0.bytes_to_copy, (m0, m1)
    print(f"\ncopyRate 0 ({PAUSED} at creation): progress {m0.progress:.1f}% -> {m1.progress:.1f}% in 3 s, "
          f"{m1.bytes_to_copy} bytes left")

    # to the fast class: csi-resizer calls ControllerModifyVolume, the copy completes
    t0 = time.monotonic()
    pvcs.patch(name=CLONE, namespace=NS, body={"spec": {"volumeAttributesClassName": FAST}},
               content_type="application/merge-patch+json")
    samples: list[tuple[float, float]] = []

    def complete() -> bool:
        m = copy_into(driver, vid)
        samples.append((time.monotonic() - t0, m.progress))
        return m.copy_rate == 150 and m.progress >= 100

    wait_for(complete, timeout=WAIT, interval=0.1, what="the copy completes at copyRate 150",
             why=lambda: events_of(cluster, CLONE) + cluster.logs())
    rate_seen = next(t for t, _ in samples if _ > m1.progress) if any(p > m1.progress for _, p in samples) else 0
    print(f"copyRate 150 ({FAST}): 100% {samples[-1][0]:.2f} s after the patch (first progress at "
          f"{rate_seen:.2f} s; samples {[(round(t, 2), round(p, 1)) for t, p in samples[-5:]]})")

    def applied() -> dict[str, Any] | None:
        p = get(k8s, "v1", "PersistentVolumeClaim", CLONE, NS)
        return p if p.get("status", {}).get("currentVolumeAttributesClassName") == FAST else None

    wait_for(applied, timeout=WAIT, interval=POLL, what="PVC status.currentVolumeAttributesClassName",
             why=lambda: events_of(cluster, CLONE))
    pv = get(k8s, "v1", "PersistentVolume", get(k8s, "v1", "PersistentVolumeClaim", CLONE, NS)["spec"]["volumeName"])
    assert pv["spec"]["volumeAttributesClassName"] == FAST

    # a class with a key the driver does not know: Infeasible, the PVC says why
    create(k8s, {"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttributesClass", "metadata": {"name": BOGUS},
                 "driverName": DRIVER, "parameters": {"iops": "5000"}}, None)
    pvcs.patch(name=CLONE, namespace=NS, body={"spec": {"volumeAttributesClassName": BOGUS}},
               content_type="application/merge-patch+json")

    def refused() -> dict[str, Any] | None:
        st = get(k8s, "v1", "PersistentVolumeClaim", CLONE, NS).get("status", {})
        mvs = st.get("modifyVolumeStatus") or {}
        ev = events_of(cluster, CLONE)
        if mvs.get("targetVolumeAttributesClassName") == BOGUS and mvs.get("status") == "Infeasible" \
                and "mutable_parameters[iops]" in ev:
            return {"status": st, "events": ev}
        return None

    out = wait_for(refused, timeout=WAIT, interval=POLL, what="ModifyVolume failure on the PVC",
                   why=lambda: events_of(cluster, CLONE))
    assert "InvalidArgument" in out["events"] or "INVALID_ARGUMENT" in out["events"], out["events"]
    assert out["status"]["currentVolumeAttributesClassName"] == FAST  # nothing changed
    assert copy_into(driver, vid).copy_rate == 150
    print("refused:", [line for line in out["events"].splitlines() if "iops" in line][:1])
