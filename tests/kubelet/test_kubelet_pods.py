"""The driver under a real kubelet (../shared/peers/k8s-node): Pods mount its volumes through the kubelet's own
NodeStage/NodePublish/NodeExpandVolume/NodeUnpublish/NodeUnstage calls, and every check reads bytes inside a Pod
(`kubectl exec`). The driver is the chart, installed with `helm install`, its node DaemonSet pod (plugin, engine,
FUSE keeper) and controller Deployment pod (driver, provisioner, snapshotter, resizer) run as host processes with
the args the API server holds for them (tests/kubelet/node.py says how and what differs from a pod).

Module-scoped: one environment (control plane, chart, node: ~40 s up); each test makes its own objects.
KUBELET_KEEP_STATE=1 keeps /tmp/kl-* (every component's log) for a post-mortem.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from csi_driver import DRIVER_NAME
from tests.kubelet.node import (
    IMAGE,
    NODE_NAME,
    NS,
    Env,
    has_cap_sys_resource,
    loops_on,
    mounts_under,
    running_node,
    why_skip,
)
from tests.waiting import wait_for

SKIP = why_skip()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

CLASS = "flashcopy"  # deploy/kubernetes/common: ext4, WaitForFirstConsumer, allowVolumeExpansion
MiB = 1 << 20
WAIT = "120s"


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with running_node() as e:
        yield e


# ------------------------------------------------------------------------------------------------ objects

def pvc(name: str, size: str, *, cls: str = CLASS, block: bool = False, snapshot: str | None = None,
        clone_of: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "storageClassName": cls,
                            "resources": {"requests": {"storage": size}},
                            "volumeMode": "Block" if block else "Filesystem"}
    if snapshot:
        spec["dataSource"] = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": snapshot}
    if clone_of:
        spec["dataSource"] = {"kind": "PersistentVolumeClaim", "name": clone_of}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": spec}


def pod(name: str, claim: str, *, block: bool = False, security: dict[str, Any] | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"name": "c", "image": IMAGE, "imagePullPolicy": "Never", "command": ["sleep", "3600"]}
    if block:
        c["volumeDevices"] = [{"name": "d", "devicePath": "/dev/xvda"}]
    else:
        c["volumeMounts"] = [{"name": "d", "mountPath": "/data"}]
    spec: dict[str, Any] = {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [c],
                            "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": claim}}]}
    if security:
        spec["securityContext"] = security
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def snapshot(name: str, source: str) -> dict[str, Any]:
    return {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot", "metadata": {"name": name},
            "spec": {"volumeSnapshotClassName": CLASS, "source": {"persistentVolumeClaimName": source}}}


def running(env: Env, *objs: dict[str, Any]) -> None:
    """Create objects (PVCs, Pods), then wait until every Pod among them is Ready (its volumes mounted)."""
    env.apply(*objs)
    for o in objs:
        if o["kind"] == "Pod":
            name = o["metadata"]["name"]
            r = env.k("wait", "--for=condition=Ready", f"pod/{name}", f"--timeout={WAIT}", check=False)
            assert r.returncode == 0, f"pod {name} not Ready: {r.stderr}\n{env.why(name)}"


def sh(env: Env, pod_name: str, script: str) -> str:
    r = env.k("exec", pod_name, "--", "sh", "-c", script, check=False)
    assert r.returncode == 0, f"exec in {pod_name} failed ({r.returncode}): {script}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def snapshot_ready(env: Env, name: str) -> None:
    r = env.k("wait", "--for=jsonpath={.status.readyToUse}=true", f"volumesnapshot/{name}", f"--timeout={WAIT}",
              check=False)
    assert r.returncode == 0, f"VolumeSnapshot {name} not ready: {r.stderr}\n" + env.k(
        "get", "volumesnapshot", name, "-o", "yaml", check=False).stdout + env.why()


def df_kib(env: Env, pod_name: str) -> int:
    """Size of /data as the Pod sees it (df -k total, KiB)."""
    line = sh(env, pod_name, "df -k /data").strip().splitlines()[-1].split()
    return int(line[1])


def volume_of(env: Env, claim: str) -> tuple[str, str]:
    """The bound PV's name and the driver's volume id (its CSI volume handle) of PVC `claim`."""
    pv = env.k("get", "pvc", claim, "-o", "jsonpath={.spec.volumeName}").stdout
    return pv, env.kubectl("get", "pv", pv, "-o", "jsonpath={.spec.csi.volumeHandle}").stdout


def files_and_sums(env: Env, pod_name: str) -> str:
    return sh(env, pod_name, "cd /data && find . -type f | sort | xargs md5sum")


# -------------------------------------------------------------------------------------------------- tests

def fs_class(env: Env, fs: str) -> str:
    """The chart's class with another fstype (the chart's own `flashcopy` is ext4)."""
    if fs == "ext4":
        return CLASS
    name = f"kubelet-test-{fs}"
    env.kubectl("apply", "-f", "-", stdin=json.dumps({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": name},
        "provisioner": DRIVER_NAME, "reclaimPolicy": "Delete", "volumeBindingMode": "WaitForFirstConsumer",
        "allowVolumeExpansion": True, "parameters": {"csi.storage.k8s.io/fstype": fs}}))
    return name


@pytest.mark.parametrize(("fs", "prefix", "size", "larger"), [
    pytest.param("ext4", "fs", 64, 128, id="ext4"),
    pytest.param("xfs", "xfs-snap", 320, 640, id="xfs"),  # mkfs.xfs wants >= 300 MB
])
def test_snapshot_restores_show_the_snapshot_instant(env: Env, fs: str, prefix: str, size: int, larger: int
                                                     ) -> None:
    """A Pod writes files on a mounted filesystem; VolumeSnapshot; PVCs restored from it, the same size and
    larger, show exactly the files at the snapshot, and are writable and independent. The image is filesystem
    consistent: the node froze the filesystem for the snapshot. ext4 checks that on the raw image (a Block PVC
    restored from the same snapshot, a volume mode change the VolumeSnapshotContent's annotation allows): no
    needs_recovery (a live mounted ext4 has it) and a clean e2fsck -fn. xfs's freeze leaves its log to be replayed
    at the next mount (xfs_repair -n says so on any frozen image), so xfs shows it by mounting: the files are
    there."""
    cls = fs_class(env, fs)
    src, writer, snap = prefix, f"{prefix}-writer", f"{prefix}-snap"
    running(env, pvc(src, f"{size}Mi", cls=cls), pod(writer, src))
    assert fs in sh(env, writer, "grep ' /data ' /proc/mounts")
    sh(env, writer, "set -e; cd /data; echo one > a; dd if=/dev/urandom of=b bs=64k count=16 2>/dev/null;"
                    " mkdir d; echo two > d/c; sync")
    at_snapshot = files_and_sums(env, writer)
    assert len(at_snapshot.splitlines()) == 3
    # not synced: still in the page cache or the journal when the snapshot is taken, unless the freeze flushes it
    sh(env, writer, "echo three > /data/d/e")
    at_snapshot = files_and_sums(env, writer)
    env.apply(snapshot(snap, src))
    snapshot_ready(env, snap)
    sh(env, writer, "echo after-the-snapshot > /data/late && sync")
    assert "./late" in files_and_sums(env, writer)

    same, big = f"{prefix}-restored", f"{prefix}-restored-large"
    running(env, pvc(same, f"{size}Mi", cls=cls, snapshot=snap), pod(f"{same}-pod", same),
            pvc(big, f"{larger}Mi", cls=cls, snapshot=snap), pod(f"{big}-pod", big))
    assert files_and_sums(env, f"{same}-pod") == at_snapshot
    assert files_and_sums(env, f"{big}-pod") == at_snapshot
    small, large = df_kib(env, f"{same}-pod"), df_kib(env, f"{big}-pod")
    assert small < size * 1024 and large >= small + (larger - size) * 1024 * 9 // 10, (small, large)
    # the restore is writable and independent of its source
    sh(env, f"{big}-pod", f"dd if=/dev/zero of=/data/big bs=1M count={size + 8} 2>/dev/null && sync")
    assert "./big" not in files_and_sums(env, writer)

    if fs == "ext4":
        content = env.k("get", "volumesnapshot", snap, "-o", "jsonpath={.status.boundVolumeSnapshotContentName}"
                        ).stdout
        env.kubectl("annotate", "volumesnapshotcontent", content,
                    "snapshot.storage.kubernetes.io/allow-volume-mode-change=true")
        raw = f"{prefix}-raw"
        running(env, pvc(raw, f"{size}Mi", block=True, snapshot=snap), pod(f"{raw}-pod", raw, block=True))
        dev = _published_at(env, f"{raw}-pod", raw)  # the kubelet's bind mount of the device
        header = subprocess.run(["dumpe2fs", "-h", dev], capture_output=True, text=True, timeout=60)
        features = [ln for ln in header.stdout.splitlines() if ln.startswith("Filesystem features:")]
        assert features and "needs_recovery" not in features[0], header.stdout + header.stderr
        check = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
        env.k("delete", "pod", f"{raw}-pod", "--wait", f"--timeout={WAIT}")
        env.k("delete", "pvc", raw, "--wait", f"--timeout={WAIT}")


def test_raw_block_snapshot_clone_restore_bytes(env: Env) -> None:
    """volumeMode: Block in Pods: a pattern written to the device, a snapshot and a clone (PVC data source) of
    it, the source overwritten; a restore of the snapshot and the clone both read the pattern."""
    running(env, pvc("blk", "32Mi", block=True), pod("blk-writer", "blk", block=True))
    # a pattern in the middle of the device: 4 MiB random at offset 8 MiB
    written = sh(env, "blk-writer", "set -e; dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null;"
                                    " dd if=/tmp/p of=/dev/xvda bs=1M seek=8 conv=fsync 2>/dev/null;"
                                    " md5sum < /tmp/p").split()[0]
    read = sh(env, "blk-writer", "dd if=/dev/xvda bs=1M skip=8 count=4 2>/dev/null | md5sum").split()[0]
    assert read == written
    env.apply(snapshot("blk-snap", "blk"), pvc("blk-clone", "32Mi", block=True, clone_of="blk"))
    snapshot_ready(env, "blk-snap")
    # the clone is cut when its PVC is provisioned (WaitForFirstConsumer: when a Pod uses it), so it is made first
    running(env, pod("blk-clone-reader", "blk-clone", block=True))
    sh(env, "blk-writer", "dd if=/dev/zero of=/dev/xvda bs=1M seek=8 count=4 conv=fsync 2>/dev/null")
    running(env, pvc("blk-restored", "32Mi", block=True, snapshot="blk-snap"),
            pod("blk-reader", "blk-restored", block=True))
    for reader in ("blk-reader", "blk-clone-reader"):
        got = sh(env, reader, "dd if=/dev/xvda bs=1M skip=8 count=4 2>/dev/null | md5sum").split()[0]
        assert got == written, reader
    zeros = sh(env, "blk-writer", "dd if=/dev/xvda bs=1M skip=8 count=4 2>/dev/null | md5sum").split()[0]
    assert zeros != written
    env.k("delete", "pod", "blk-clone-reader", "--wait", f"--timeout={WAIT}")
    env.k("delete", "pvc", "blk-clone", "--wait", f"--timeout={WAIT}")
    size = int(sh(env, "blk-reader", "blockdev --getsize64 /dev/xvda").strip())
    assert size == 32 * MiB


NO_EXT4_ONLINE_RESIZE = pytest.mark.skipif(
    not has_cap_sys_resource(), reason="root lacks CAP_SYS_RESOURCE (/proc/self/status CapEff bit 24): ext4 online "
    "resize (EXT4_IOC_RESIZE_FS) fails with EPERM, the driver answers FAILED_PRECONDITION; the xfs case runs")


@pytest.mark.parametrize(("fs", "size", "grown_to", "gain_kib"), [
    # xfs_growfs adds data space only (the log keeps its mkfs size): 320 MiB more; mkfs.xfs wants >= 300 MB
    pytest.param("xfs", "320Mi", "640Mi", 320 * 1024, id="xfs"),
    # resize2fs adds block groups with their own metadata: most of the 64 MiB
    pytest.param("ext4", "64Mi", "128Mi", 56 * 1024, id="ext4", marks=NO_EXT4_ONLINE_RESIZE),
])
def test_online_expansion_of_a_mounted_filesystem(env: Env, fs: str, size: str, grown_to: str, gain_kib: int
                                                   ) -> None:
    cls_name = fs_class(env, fs)
    claim, pod_name = f"grow-{fs}", f"grow-{fs}-pod"
    running(env, pvc(claim, size, cls=cls_name), pod(pod_name, claim))
    assert fs in sh(env, pod_name, "grep ' /data ' /proc/mounts")
    sh(env, pod_name, "echo before-growth > /data/keep && sync")
    before = df_kib(env, pod_name)
    env.k("patch", "pvc", claim, "--type=merge", "-p",
          json.dumps({"spec": {"resources": {"requests": {"storage": grown_to}}}}))

    def grown() -> int:
        kib = df_kib(env, pod_name)
        return kib if kib >= before + gain_kib else 0

    wait_for(grown, timeout=90, what=f"the Pod's df to show the expanded {fs} (kubelet NodeExpandVolume)",
             interval=1, why=lambda: env.k("get", "pvc", claim, "-o", "yaml", check=False).stdout + env.why(pod_name))
    assert sh(env, pod_name, "cat /data/keep").strip() == "before-growth"
    assert env.k("get", "pvc", claim, "-o", "jsonpath={.status.capacity.storage}").stdout == grown_to
    env.k("delete", "pod", pod_name, "--wait", f"--timeout={WAIT}")
    env.k("delete", "pvc", claim, "--wait", f"--timeout={WAIT}")


def test_fsgroup_gives_a_non_root_pod_the_volume(env: Env) -> None:
    security = {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000}
    running(env, pvc("fsg", "64Mi"), pod("fsg-pod", "fsg", security=security))
    out = sh(env, "fsg-pod", "id -u; stat -c '%g' /data; echo x > /data/mine && stat -c '%u %g' /data/mine")
    assert out.split() == ["1000", "2000", "1000", "2000"], out


def _stats_pods(env: Env) -> None:
    """The kubelet finds new pods' volumes for its stats once a minute (volumeStatsAggPeriod 1m, not a peer knob):
    use the pods of the first tests when they still run, so this normally waits only for the next pass."""
    if env.k("get", "pod", "fs-writer", check=False).returncode != 0:
        running(env, pvc("fs", "64Mi"), pod("fs-writer", "fs"))
    if env.k("get", "pod", "blk-writer", check=False).returncode != 0:
        running(env, pvc("blk", "32Mi", block=True), pod("blk-writer", "blk", block=True))


STATS_WAIT = 150  # a minute and a half between two passes of the kubelet's volume stats, plus a pod start


@pytest.mark.long  # waits for the kubelet's next volume stats pass (once a minute)
def test_kubelet_reports_filesystem_volume_stats(env: Env) -> None:
    _stats_pods(env)
    sh(env, "fs-writer", "dd if=/dev/zero of=/data/stats bs=1M count=10 2>/dev/null && sync")

    def stats() -> dict[str, Any]:
        v = env.volume_stats("fs") or {}
        return v if v.get("usedBytes", 0) >= 10 * MiB else {}

    v = wait_for(stats, timeout=STATS_WAIT, what="kubelet stats/summary: used bytes of PVC fs (NodeGetVolumeStats)",
                 interval=2, why=lambda: str(env.volume_stats("fs")) + "\n" + env.why())
    assert 50 * MiB < v["capacityBytes"] <= 64 * MiB
    assert v["availableBytes"] < v["capacityBytes"] - 10 * MiB
    assert v["inodes"] > 0 and 0 < v["inodesUsed"] < v["inodes"]
    # and the kubelet's Prometheus metrics, from the same stats
    series = {ln.split("{", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in env.kubelet_metrics().splitlines()
              if ln.startswith("kubelet_volume_stats_") and 'persistentvolumeclaim="fs"' in ln
              and f'namespace="{NS}"' in ln}
    assert series.get("kubelet_volume_stats_used_bytes", 0) >= 10 * MiB, series
    assert series.get("kubelet_volume_stats_capacity_bytes") == v["capacityBytes"], series


@pytest.mark.long  # waits for the kubelet's next volume stats pass (once a minute)
def test_kubelet_reports_block_volume_stats(env: Env) -> None:
    """The kubelet (1.35) asks NodeGetVolumeStats of a raw block volume at its own per-pod bind mount of the
    device (<kubelet-root>/plugins/kubernetes.io/csi/volumeDevices/<pv>/dev/<pod-uid>), not at the staging path
    or the publish target: the driver must recognise the device there (it answered NOT_FOUND before)."""
    _stats_pods(env)

    def answered() -> bool:
        # the kubelet's stats pass has asked the driver about the block volume (successfully or not)
        return "NodeGetVolumeStats" in env.driver.text() and env.volume_stats("fs") is not None

    wait_for(answered, timeout=STATS_WAIT, what="a kubelet volume stats pass", interval=2, why=env.why)
    v = env.volume_stats("blk")
    assert v is not None, "no stats for the block PVC blk in the kubelet's summary"
    assert v["capacityBytes"] == 32 * MiB


def _volume_leftovers(env: Env, pv_name: str, volume_id: str) -> dict[str, list[str]]:
    """What the node still holds of one volume: its staging dir (sha256 of the handle) or pod dirs (the PV name)
    mounted, a loop device on its export file, the export file itself."""
    staging = hashlib.sha256(volume_id.encode()).hexdigest()
    out = {"mounts": [m for m in mounts_under(env.kubelet_root) if staging in m or pv_name in m],
           "loops": [lo for lo in loops_on(env.driver_state) if lo.endswith("/" + volume_id)],
           "export file": [str(p) for p in (env.driver_state / "exports").glob(volume_id + "*")]}
    return {k: v for k, v in out.items() if v}


def test_force_deleted_pod_and_its_claim_leave_nothing(env: Env) -> None:
    """`kubectl delete pod --force --grace-period=0` removes the Pod object before the kubelet has unmounted
    anything, so with attachRequired: false nothing stops the PVC's deletion and DeleteVolume from reaching the
    driver while the volume is still staged and published on the node. Whatever the driver answers, once the kubelet
    has cleaned up the volume must be gone everywhere."""
    running(env, pvc("forced", "64Mi"), pod("forced-pod", "forced"))
    sh(env, "forced-pod", "echo x > /data/f && sync")
    pv_name, vid = volume_of(env, "forced")
    assert _volume_leftovers(env, pv_name, vid)  # staged, published, exported
    env.k("delete", "pod", "forced-pod", "--force", "--grace-period=0")
    env.k("delete", "pvc", "forced", "--wait", "--timeout=60s")
    wait_for(lambda: env.kubectl("get", "pv", pv_name, check=False).returncode != 0, timeout=90,
             what=f"PV {pv_name} deleted", interval=0.5, why=env.why)
    left: dict[str, list[str]] = {}
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not _volume_leftovers(env, pv_name, vid), timeout=60, what="volume gone", interval=0.5)
    left = _volume_leftovers(env, pv_name, vid)
    assert left == {}, f"volume {vid} left behind after a force-deleted pod:\n{left}\n{env.why()}"


def test_delete_volume_of_a_staged_volume_is_refused(env: Env) -> None:
    """CSI's "volume in use": with attachRequired: false, `kubectl delete pod --force --grace-period=0` lets the
    PVC go at once and the provisioner calls DeleteVolume while the container still runs. It used to succeed and
    drop the volume under the mounted ext4 (the Pod's next write + sync returned 0, their write-back failed:
    silent data loss); now FAILED_PRECONDITION, and the Pod's data path keeps working."""
    import grpc

    from csi_driver.proto_gen import csi_pb2, csi_pb2_grpc

    running(env, pvc("in-use", "64Mi"), pod("in-use-pod", "in-use"))
    try:
        sh(env, "in-use-pod", "echo before > /data/f && sync")
        _, vid = volume_of(env, "in-use")
        with grpc.insecure_channel(f"unix://{env.sock}") as ch:
            try:
                csi_pb2_grpc.ControllerStub(ch).DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
        # the Pod's data path must keep working either way
        still = env.k("exec", "in-use-pod", "--", "sh", "-c", "echo after > /data/g && sync && cat /data/f",
                      check=False)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (
            f"DeleteVolume of staged+published {vid}: {code}; then in the Pod: rc={still.returncode} "
            f"{still.stdout!r} {still.stderr[-300:]!r}")
        assert still.returncode == 0 and still.stdout.strip() == "before", still
    finally:
        env.k("delete", "pod", "in-use-pod", "--wait", "--timeout=60s", check=False)
        env.k("delete", "pvc", "in-use", "--wait", "--timeout=60s", check=False)


def _writer_pod(name: str, claims: list[str], script: str) -> dict[str, Any]:
    """A Pod running `script` (its own loop) with each claim mounted at /v/<claim>."""
    c: dict[str, Any] = {"name": "c", "image": IMAGE, "imagePullPolicy": "Never", "command": ["sh", "-c", script],
                         "volumeMounts": [{"name": n, "mountPath": f"/v/{n}"} for n in claims]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [c],
                     "volumes": [{"name": n, "persistentVolumeClaim": {"claimName": n}} for n in claims]}}


def _counter(env: Env, pod_name: str, path: str) -> int:
    out = sh(env, pod_name, f"tail -n 1 {path} 2>/dev/null || true").strip()
    return int(out) if out else -1


def test_group_snapshot_of_running_writers_is_write_order_consistent(env: Env) -> None:
    """A Pod writes a dependent chain across three PVCs: record i goes to a, is synced, then to b, then to c.
    A VolumeGroupSnapshot taken while it runs, restored, must show a >= b >= c (a write seen on a later volume
    implies every earlier one), each volume's log complete up to its last record."""
    claims = ["chain-a", "chain-b", "chain-c"]
    loop = ("i=0; while true; do for v in " + " ".join(claims) + "; do echo $i >> /v/$v/log; sync /v/$v/log; "
            "done; i=$((i+1)); done")
    running(env, *[pvc(n, "64Mi") for n in claims], _writer_pod("chain", claims, loop))
    wait_for(lambda: _counter(env, "chain", "/v/chain-c/log") > 20, timeout=60, what="the chain writer")
    label = {"app": "chain"}
    for n in claims:
        env.k("label", "pvc", n, "app=chain", "--overwrite")
    env.apply({"apiVersion": "groupsnapshot.storage.k8s.io/v1", "kind": "VolumeGroupSnapshot",
               "metadata": {"name": "chain-group"},
               "spec": {"volumeGroupSnapshotClassName": CLASS, "source": {"selector": {"matchLabels": label}}}})
    r = env.k("wait", "--for=jsonpath={.status.readyToUse}=true", "volumegroupsnapshot/chain-group",
              f"--timeout={WAIT}", check=False)
    assert r.returncode == 0, f"group snapshot not ready: {r.stderr}\n{env.why()}"

    def members() -> dict[str, str] | None:
        items = json.loads(env.k("get", "volumesnapshots", "-o", "json").stdout)["items"]
        ms = {m["spec"]["source"]["persistentVolumeClaimName"]: m["metadata"]["name"] for m in items
              if (m.get("status") or {}).get("volumeGroupSnapshotName") == "chain-group"
              and m["status"].get("readyToUse")}
        return ms if len(ms) == 3 else None

    ms = wait_for(members, timeout=60, what="the three member snapshots", interval=0.5, why=env.why)
    after = _counter(env, "chain", "/v/chain-c/log")
    restored = [f"{n}-r" for n in claims]
    running(env, *[pvc(f"{n}-r", "64Mi", snapshot=ms[n]) for n in claims],
            _writer_pod("chain-reader", restored, "sleep 3600"))
    last = []
    for n in restored:
        lines = sh(env, "chain-reader", f"cat /v/{n}/log").split()
        assert lines == [str(i) for i in range(len(lines))], f"{n}: log not a complete prefix"
        last.append(len(lines) - 1)
    a, b, c = last
    assert a >= b >= c >= 20, f"restored chain a={a} b={b} c={c} is not write-order consistent"
    assert a - c <= 1 and a <= after + 1, (a, c, after)  # one instant: at most the record in flight differs
    for name in ("chain", "chain-reader"):
        env.k("delete", "pod", name, "--wait", f"--timeout={WAIT}")
    env.k("delete", "volumegroupsnapshot", "chain-group", "--wait", f"--timeout={WAIT}")
    env.k("delete", "pvc", *claims, *restored, "--wait", f"--timeout={WAIT}")


def test_engine_restart_under_writing_pods_pauses_io(env: Env) -> None:
    """SIGKILL of the node engine while a Pod appends fsynced records to an ext4 PVC and another writes a raw
    block PVC, then the chart's engine container started again as the kubelet restarts it: both Pods keep running
    without an I/O error, their writes go on, and nothing needs staging again (the FUSE keeper held the
    connection)."""

    fs_loop = "i=0; while true; do echo $i >> /data/log || exit 3; sync /data/log || exit 4; i=$((i+1)); done"
    blk_loop = ("i=0; while true; do echo $i | dd of=/dev/xvda bs=512 seek=$((i % 64)) conv=fsync 2>/dev/null "
                "|| exit 5; i=$((i+1)); done")
    fs_pod, blk_pod = pod("restart-fs", "rw-fs"), pod("restart-blk", "rw-blk", block=True)
    fs_pod["spec"]["containers"][0]["command"] = ["sh", "-c", fs_loop]
    blk_pod["spec"]["containers"][0]["command"] = ["sh", "-c", blk_loop]
    running(env, pvc("rw-fs", "64Mi"), pvc("rw-blk", "32Mi", block=True), fs_pod, blk_pod)
    wait_for(lambda: _counter(env, "restart-fs", "/data/log") > 20, timeout=60, what="the ext4 writer")
    before = _counter(env, "restart-fs", "/data/log")
    # (nothing may read the volumes between kill and start: their I/O waits in the kernel for the next engine)
    env.container("node/engine").restart(signal.SIGKILL)
    wait_for(lambda: _counter(env, "restart-fs", "/data/log") > before + 20, timeout=90,
             what="the ext4 writer going on after the engine restart", why=env.why)
    for name in ("restart-fs", "restart-blk"):
        phase = env.k("get", "pod", name, "-o", "jsonpath={.status.phase}").stdout
        assert phase == "Running", f"{name} is {phase} after the engine restart:\n{env.why(name)}"
    lines = sh(env, "restart-fs", "cat /data/log").split()
    assert lines[:len(lines) - 1] == [str(i) for i in range(len(lines) - 1)]
    for name in ("restart-fs", "restart-blk"):
        env.k("delete", "pod", name, "--wait", f"--timeout={WAIT}")
    env.k("delete", "pvc", "rw-fs", "rw-blk", "--wait", f"--timeout={WAIT}")


def _published_at(env: Env, pod_name: str, claim: str) -> str:
    """Where the kubelet published `claim`'s volume for `pod_name`: the mount whose path names both (a block
    volume has two, the CSI publish target .../volumeDevices/publish/<pv>/<uid> and the kubelet's own bind
    mount of the device; the former)."""
    uid = env.k("get", "pod", pod_name, "-o", "jsonpath={.metadata.uid}").stdout
    pv, _ = volume_of(env, claim)
    paths = {m.rsplit(" (", 1)[0] for m in mounts_under(env.kubelet_root) if uid in m and pv in m}
    (path,) = [p for p in paths if "/publish/" in p] if len(paths) > 1 else paths
    return path


def _node_stats(env: Env, claim: str, path: str) -> Any:
    """NodeGetVolumeStats as the kubelet asks it (its CSIVolumeHealth gate, which would show volume_condition in
    kubelet_volume_stats_health_status_abnormal, is alpha and off, and the peer sets no feature gates)."""
    import grpc

    from csi_driver.proto_gen import csi_pb2, csi_pb2_grpc

    _, vid = volume_of(env, claim)
    with grpc.insecure_channel(f"unix://{env.node_sock}") as ch:
        return csi_pb2_grpc.NodeStub(ch).NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path), timeout=30)


def test_node_plugin_restart_under_writing_pods(env: Env) -> None:
    """SIGKILL of the chart's node plugin container (`serve --mode=node`) while Pods write, then its restart as
    the kubelet does it: the Pods never notice (the data path is the engine's, beside it), the kubelet reaches
    the new process on the same socket (a new Pod's NodeStage/NodePublish, stats, the old Pods'
    NodeUnpublish/NodeUnstage when they go) and nothing is left behind."""
    fs_loop = "i=0; while true; do echo $i >> /data/log || exit 3; sync /data/log || exit 4; i=$((i+1)); done"
    writer = pod("plugin-restart-fs", "plugin-fs")
    writer["spec"]["containers"][0]["command"] = ["sh", "-c", fs_loop]
    running(env, pvc("plugin-fs", "64Mi"), writer)
    wait_for(lambda: _counter(env, "plugin-restart-fs", "/data/log") > 20, timeout=60, what="the writer")
    plugin = env.container("node/csi-flashcopy")
    old_pid = plugin.popen.pid if plugin.popen else 0
    plugin.stop(signal.SIGKILL)
    before = _counter(env, "plugin-restart-fs", "/data/log")
    wait_for(lambda: _counter(env, "plugin-restart-fs", "/data/log") > before + 50, timeout=60,
             what="the writer going on with no node plugin running", why=env.why)
    # a Pod created now waits for its volume: the kubelet retries NodeStage until the plugin is back
    env.apply(pvc("plugin-late", "64Mi"), pod("plugin-late-pod", "plugin-late"))
    plugin.start()
    assert plugin.popen is not None and plugin.popen.pid != old_pid
    running(env, pod("plugin-late-pod", "plugin-late"))
    sh(env, "plugin-late-pod", "echo staged-by-the-new-plugin > /data/f && sync")
    st = _node_stats(env, "plugin-fs", _published_at(env, "plugin-restart-fs", "plugin-fs"))
    assert not st.volume_condition.abnormal, st.volume_condition.message
    lines = sh(env, "plugin-restart-fs", "cat /data/log").split()
    assert lines[:-1] == [str(i) for i in range(len(lines) - 1)] and len(lines) > before + 50
    assert env.k("get", "pod", "plugin-restart-fs", "-o", "jsonpath={.status.phase}").stdout == "Running"
    pvs = [volume_of(env, n)[0] for n in ("plugin-fs", "plugin-late")]
    env.k("delete", "pod", "plugin-restart-fs", "plugin-late-pod", "--wait", f"--timeout={WAIT}")
    env.k("delete", "pvc", "plugin-fs", "plugin-late", "--wait", f"--timeout={WAIT}")
    wait_for(lambda: not [m for m in mounts_under(env.kubelet_root) if any(pv in m for pv in pvs)], timeout=60,
             what="the new plugin unpublished and unstaged the old Pod's volume", interval=0.5, why=env.why)


def test_volume_health_when_the_engine_dies_and_recovers(env: Env) -> None:
    """With the engine container dead, NodeGetVolumeStats of a mounted ext4 and of a raw block volume still
    answers (the node plugin is its own process), abnormal and saying why; once the kubelet would have
    restarted the engine, healthy again, and the Pods' volumes work."""
    running(env, pvc("health-fs", "64Mi"), pod("health-fs-pod", "health-fs"),
            pvc("health-blk", "32Mi", block=True), pod("health-blk-pod", "health-blk", block=True))
    sh(env, "health-fs-pod", "echo before > /data/f && sync")
    paths = {"health-fs": _published_at(env, "health-fs-pod", "health-fs"),
             "health-blk": _published_at(env, "health-blk-pod", "health-blk")}
    for claim, path in paths.items():
        st = _node_stats(env, claim, path)
        assert not st.volume_condition.abnormal, (claim, st.volume_condition.message)
    engine = env.container("node/engine")
    engine.stop(signal.SIGKILL)
    try:
        for claim, path in paths.items():
            st = _node_stats(env, claim, path)
            assert st.volume_condition.abnormal, (claim, st)
            assert "engine unavailable" in st.volume_condition.message, st.volume_condition.message
        fs = _node_stats(env, "health-fs", paths["health-fs"])
        assert fs.usage[0].total > 50 * MiB  # a mounted filesystem's counters still come from the kernel
    finally:
        engine.start()

    def healthy() -> bool:
        return not any(_node_stats(env, c, p).volume_condition.abnormal for c, p in paths.items())

    wait_for(healthy, timeout=60, what="healthy volume conditions after the engine restart", interval=0.5,
             why=env.why)
    assert sh(env, "health-fs-pod", "cat /data/f && echo after > /data/g && sync && cat /data/g").split() == [
        "before", "after"]
    env.k("delete", "pod", "health-fs-pod", "health-blk-pod", "--wait", f"--timeout={WAIT}")
    env.k("delete", "pvc", "health-fs", "health-blk", "--wait", f"--timeout={WAIT}")


def _cli(env: Env, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The csi-flashcopy CLI as an operator runs it, with the admin kubeconfig."""
    r = env.cluster.cli(*args, timeout=300)
    if check:
        assert r.returncode == 0, f"csi-flashcopy {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def test_clone_refresh_and_restore_cli_with_pods(env: Env) -> None:
    """The dev/test workflow on Pods: `clone` two copies of a PVC a Pod writes, Pods on the clones see the
    source's files and write their own; the source moves on; `refresh` of clones still mounted is refused and
    loses nothing, after their Pods go it brings them to the source's new point in time (their own writes gone);
    `restore` puts the source back to its first snapshot in place, refused while a Pod uses it."""
    running(env, pvc("app", "64Mi"), pod("app-pod", "app"))
    sh(env, "app-pod", "set -e; cd /data; echo v1 > version; dd if=/dev/urandom of=blob bs=64k count=8 2>/dev/null;"
                       " sync")
    v1 = files_and_sums(env, "app-pod")
    env.apply(snapshot("app-v1", "app"))
    snapshot_ready(env, "app-v1")
    _cli(env, "clone", "-n", NS, "--from-pvc", "app", "--count", "2", "--label", "team=qa", "--wait", "120")
    clones = ["app-clone-1", "app-clone-2"]
    running(env, *[pod(f"{c}-pod", c) for c in clones])
    for c in clones:
        assert files_and_sums(env, f"{c}-pod") == v1
    sh(env, "app-clone-1-pod", "echo qa-only > /data/qa && sync")
    assert "./qa" not in files_and_sums(env, "app-pod")
    sh(env, "app-pod", "set -e; cd /data; echo v2 > version; echo new > added; sync")
    v2 = files_and_sums(env, "app-pod")
    assert v2 != v1

    # clones in use: refused, nothing lost
    r = _cli(env, "refresh", "-n", NS, "--selector", "team=qa", "--wait", "120", check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "staged" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "./qa" in files_and_sums(env, "app-clone-1-pod")
    env.k("delete", "pod", *[f"{c}-pod" for c in clones], "--wait", f"--timeout={WAIT}")
    _cli(env, "refresh", "-n", NS, "--selector", "team=qa", "--wait", "120")
    running(env, *[pod(f"{c}-pod2", c) for c in clones])
    for c in clones:
        assert files_and_sums(env, f"{c}-pod2") == v2, f"{c} after refresh"

    # restore in place: refused under the mounted source, then done once its Pod is gone
    r = _cli(env, "restore", "-n", NS, "--pvc", "app", "--snapshot", "app-v1", "--wait", "120", check=False)
    assert r.returncode == 1 and "staged" in r.stdout + r.stderr, (r.returncode, r.stdout, r.stderr)
    assert files_and_sums(env, "app-pod") == v2
    env.k("delete", "pod", "app-pod", "--wait", f"--timeout={WAIT}")
    _cli(env, "restore", "-n", NS, "--pvc", "app", "--snapshot", "app-v1", "--wait", "120")
    running(env, pod("app-pod2", "app"))
    assert files_and_sums(env, "app-pod2") == v1
    sh(env, "app-pod2", "echo writable > /data/w && sync")
    env.k("delete", "pod", "app-pod2", *[f"{c}-pod2" for c in clones], "--wait", f"--timeout={WAIT}")
    _cli(env, "clone", "-n", NS, "--delete", "--selector", "team=qa", "--wait", "120")
    env.k("delete", "volumesnapshot", "app-v1", "--wait", f"--timeout={WAIT}")
    env.k("delete", "pvc", "app", "--wait", f"--timeout={WAIT}")


def test_teardown_leaves_no_mounts_loops_or_exports(env: Env) -> None:
    # whatever the other tests made (in any order): pods first, then snapshots, then claims
    env.k("delete", "pods", "--all", "--wait", "--timeout=120s")
    env.k("delete", "volumesnapshots", "--all", "--wait", "--timeout=120s")
    env.k("delete", "pvc", "--all", "--wait", "--timeout=120s")

    def no_pvs() -> bool:
        out = env.kubectl("get", "pv", "-o", "jsonpath={.items[*].spec.csi.driver}").stdout
        return DRIVER_NAME not in out

    wait_for(no_pvs, timeout=120, what="every PV of the driver deleted", interval=0.5, why=env.why)
    # NodeUnstageVolume may come a little after the pod objects are gone: wait for the kubelet to finish
    wait_for(lambda: env.kubectl("get", "node", NODE_NAME, "-o", "jsonpath={.status.volumesInUse}").stdout == "",
             timeout=60, what="node volumesInUse empty", interval=0.5, why=env.why)
    root = str(env.kubelet_root.resolve())
    exports = str((env.driver_state / "exports").resolve())

    def leftovers() -> dict[str, list[str]]:
        # the kubelet root is bind-mounted onto itself (rshared) by the kubelet: that one stays
        return {k: v for k, v in {
            "mounts under the kubelet root": [m for m in mounts_under(env.kubelet_root)
                                              if m.rsplit(" (", 1)[0] != root],
            "loop devices on the driver's export files": loops_on(env.driver_state),
            "FUSE mounts other than the driver's own export": [
                m for m in mounts_under(env.driver_state) if "(fuse" in m and m.rsplit(" (", 1)[0] != exports],
        }.items() if v}

    left: dict[str, list[str]] = {}
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not leftovers(), timeout=60, what="no leftovers", interval=0.5)
    left = leftovers()
    assert left == {}, f"left behind after every Pod and PVC is gone:\n{left}\n{env.why()}"
    # and the driver's own export is still there while it runs
    assert any(m.startswith(exports + " (fuse") for m in mounts_under(env.driver_state)), \
        mounts_under(env.driver_state)
    assert env.driver.running(), "the node plugin exited:\n" + env.driver.text()[-3000:]
