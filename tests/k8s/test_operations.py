"""Operations against the real control plane (../shared/peers/k8s) and the real data path: restore in place,
incremental refresh of clones, `status -o json` (local and through FlashCopyNode objects), Events.

One driver, `serve --mode all` with its node engine process (the data path: block devices staged through the
engine socket, as the node plugin does), `--operations on` (the reconciler on the leader), its state dir on a
small tmpfs so the out-of-space case is real. The CLI runs as a subprocess, as an operator runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csi_driver.datapath import datapath_unavailable
from tests.k8s.objects import SNAP, KubeObjects
from tests.k8s.staging import StagedBlock
from tests.k8s.test_k8s_flow import DRIVER, NODE, POLL, SKIP, WAIT, Cluster, running_peer
from tests.packaging import packaging_manifests as pm
from tests.waiting import wait_for

_NO_DATAPATH = datapath_unavailable()
pytestmark = [
    pytest.mark.skipif(SKIP is not None, reason=SKIP or ""),
    pytest.mark.skipif(bool(_NO_DATAPATH), reason=f"needs the node data path (root, FUSE, loop): {_NO_DATAPATH}"),
]

NS = "ops"
DRIVER_NS = "flashcopy-system"
OPS = "flashcopy.csi.dev/v1alpha1"
GRAIN = 256 * 1024  # the default grain
CRDS = pm.REPO / "charts" / "csi-flashcopy" / "crds"


class Env(KubeObjects):
    def __init__(self, peer: Cluster, state: Path, api: Any) -> None:
        super().__init__(peer, api, NS)
        self.state = state
        self.sock = state / "engine.sock"

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return self.peer.cli(*args, timeout=timeout)

    def engine(self) -> Any:
        from csi_driver.remote.client import RemoteBackend

        return RemoteBackend(f"unix://{self.sock}")

    def pvc(self, name: str, *, source: tuple[str, str] | None = None, sc: str = "fc-ops",
            labels: dict[str, str] | None = None, block: bool = False) -> str:
        return super().pvc(name, sc=sc, source=source, labels=labels, block=block)

    def events(self, name: str, reason: str) -> list[dict[str, Any]]:
        items = self.api.resources.get(api_version="v1", kind="Event").get(namespace=NS).to_dict()["items"]
        return [e for e in items if e["involvedObject"]["name"] == name and e["reason"] == reason]


def Staged(env: Env, volume_id: str) -> StagedBlock:  # noqa: N802 - reads as the class it makes
    return StagedBlock(f"unix://{env.sock}", env.state.parent / "paths" / volume_id, volume_id)


def write(env: Env, vid: str, chunks: dict[int, bytes]) -> None:
    d = Staged(env, vid)
    try:
        for off, data in chunks.items():
            d.write(off, data)
    finally:
        d.close()


def read(env: Env, vid: str, offsets: list[int], n: int = 4096) -> list[bytes]:
    d = Staged(env, vid)
    try:
        return [d.read(off, n) for off in offsets]
    finally:
        d.close()


def block(tag: str) -> bytes:
    return tag.encode().ljust(4096, b".")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from kubernetes import config, dynamic

    root = tmp_path_factory.mktemp("k8s-ops")
    state = root / "state"
    state.mkdir()
    # a small filesystem of its own: the out-of-space case fills it for real
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(state)], check=True)
    try:
        with running_peer(root / "peer", "provisioner snapshotter") as peer:
            api = dynamic.DynamicClient(config.new_client_from_config(config_file=str(peer.kubeconfig)))
            e = Env(peer, state, api)
            peer.kubectl("apply", "-f", str(CRDS))
            peer.kubectl("wait", "--for", "condition=Established", "--timeout=60s", "crd",
                         "volumerestores.flashcopy.csi.dev", "volumerefreshes.flashcopy.csi.dev",
                         "flashcopynodes.flashcopy.csi.dev")
            for ns in (NS, DRIVER_NS):
                e.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}, None)
            sock = peer.state / "csi.sock"
            argv = [sys.executable, "-m", "csi_driver", "serve", f"--endpoint=unix://{sock}",
                    f"--state-dir={state}", f"--node-id={NODE}", "--engine=auto", "--mode=all",
                    f"--namespace={DRIVER_NS}", f"--kubeconfig={peer.kubeconfig}", "--operations=on",
                    "--operations-poll=0.5"]
            penv = {k: v for k, v in peer.env.items() if not k.startswith("CSI_")}
            penv["PYTHONPATH"] = str(pm.REPO) + os.pathsep + penv.get("PYTHONPATH", "")
            proc = peer.start("csi-flashcopy", argv, penv)
            wait_for(lambda: e.engine().is_ready(), timeout=60, what="node engine ready", interval=POLL,
                     why=proc.text)
            _classes(e)
            try:
                yield e
            finally:
                proc.stop()
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def _classes(e: Env) -> None:
    from csi_driver.proto_gen import csi_pb2

    del csi_pb2  # the CSINode entry below is what node-driver-registrar would write
    e.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE,
                                                              "labels": {f"topology.{DRIVER}/node": NODE}}}, None)
    e.create({"apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": {"name": NODE},
              "spec": {"drivers": [{"name": DRIVER, "nodeID": NODE,
                                    "topologyKeys": [f"topology.{DRIVER}/node"]}]}}, None)
    e.create({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "fc-ops"},
              "provisioner": DRIVER, "volumeBindingMode": "Immediate", "parameters": {"copyRate": "150"}}, None)
    e.create({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "fc-paused"},
              "provisioner": DRIVER, "volumeBindingMode": "Immediate", "parameters": {"copyRate": "0"}}, None)
    e.create({"apiVersion": SNAP, "kind": "VolumeSnapshotClass", "metadata": {"name": "flashcopy"},
              "driver": DRIVER, "deletionPolicy": "Delete"}, None)


def _restore_obj(env: Env, name: str) -> dict[str, Any]:
    return env.obj(OPS, "VolumeRestore", name) or {}


def test_restore_in_place_keeps_other_snapshots_and_is_refused_while_staged(env: Env) -> None:
    vid = env.pvc("db")
    write(env, vid, {0: block("v1"), 3 * GRAIN: block("v1-far")})
    env.snapshot("db-s1", "db")
    write(env, vid, {0: block("v2")})
    env.snapshot("db-s2", "db")
    write(env, vid, {0: block("v3"), 5 * GRAIN: block("after")})  # written after both snapshots: must go

    # refused while staged (a filesystem over it would be corrupted); nothing changes
    d = Staged(env, vid)
    try:
        r = env.cli("restore", "--namespace", NS, "--pvc", "db", "--snapshot", "db-s1")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "staged" in r.stdout, r.stdout
        assert d.read(0, 4096) == block("v3")
    finally:
        d.close()
    failed = [o for o in env.api.resources.get(api_version=OPS, kind="VolumeRestore").get(namespace=NS)
              .to_dict()["items"] if o["status"]["phase"] == "Failed"]
    assert len(failed) == 1 and "FAILED_PRECONDITION" in failed[0]["status"]["message"]
    assert env.events(failed[0]["metadata"]["name"], "OperationFailed")

    r = env.cli("restore", "--namespace", NS, "--pvc", "db", "--snapshot", "db-s1", "--wait", "120")
    assert r.returncode == 0, r.stdout + r.stderr
    assert read(env, vid, [0, 3 * GRAIN, 5 * GRAIN]) == [block("v1"), block("v1-far"), bytes(4096)]
    assert env.events("db", "Restored")
    # the other snapshot is intact: a PVC restored from it shows its data
    other = env.pvc("db-from-s2", source=("VolumeSnapshot", "db-s2"))
    assert read(env, other, [0, 3 * GRAIN]) == [block("v2"), block("v1-far")]
    assert (env.obj(SNAP, "VolumeSnapshot", "db-s1") or {})["status"]["readyToUse"]

    # a snapshot of another volume is refused, naming why
    env.pvc("other")
    env.snapshot("other-s", "other")
    r = env.cli("restore", "--namespace", NS, "--pvc", "db", "--snapshot", "other-s")
    assert r.returncode == 1 and "was taken of volume" in r.stdout, r.stdout + r.stderr


def test_refresh_of_three_clones_copies_only_changed_grains(env: Env) -> None:
    prod = env.pvc("prod")
    write(env, prod, {g * GRAIN: block(f"prod-{g}") for g in range(8)})
    r = env.cli("clone", "--namespace", NS, "--from-pvc", "prod", "--count", "3", "--label", "team=qa",
                "--snapshot-class", "flashcopy")
    assert r.returncode == 0, r.stdout + r.stderr
    clones = {f"prod-clone-{i}": env.handle(f"prod-clone-{i}") for i in (1, 2, 3)}
    # the clones' class copies at rate 150: wait until each is independent of the snapshot
    wait_for(lambda: all(_copied(env, v) for v in clones.values()), timeout=WAIT, what="clones copied")
    write(env, prod, {1 * GRAIN: block("prod-new-1"), 4 * GRAIN: block("prod-new-4"),
                      6 * GRAIN: block("prod-new-6")})
    write(env, clones["prod-clone-1"], {7 * GRAIN: block("scribble")})  # the clone's own change goes too

    completed_before = len(env.events("prod-clone-1", "CopyCompleted"))
    r = env.cli("refresh", "--namespace", NS, "--selector", "team=qa", "--copy-rate", "150", "--wait", "120")
    assert r.returncode == 0, r.stdout + r.stderr
    # the refresh's background copy completing is news on the PVC too
    wait_for(lambda: len(env.events("prod-clone-1", "CopyCompleted")) > completed_before, timeout=WAIT,
             interval=POLL, what="CopyCompleted Event after the refresh")
    refresh = env.api.resources.get(api_version=OPS, kind="VolumeRefresh").get(namespace=NS).to_dict()["items"]
    st = refresh[-1]["status"]
    assert st["phase"] == "Completed", st
    grains = {c["pvc"]: c["grainsToCopy"] for c in st["clones"]}
    # counted by the engine: 3 grains changed on prod, 1 more on clone-1; nothing else is copied
    assert grains == {"prod-clone-1": 4, "prod-clone-2": 3, "prod-clone-3": 3}
    want = [block("prod-0"), block("prod-new-1"), block("prod-new-4"), block("prod-7")]
    for vid in clones.values():
        assert read(env, vid, [0, GRAIN, 4 * GRAIN, 7 * GRAIN]) == want
    # the PVCs stay; they now name the refresh's snapshot, the old one is gone
    for name in clones:
        pvc = env.obj("v1", "PersistentVolumeClaim", name) or {}
        assert pvc["metadata"]["annotations"]["flashcopy.csi.dev/clone-snapshot"] == st["snapshotName"]
    assert env.events("prod-clone-2", "Refreshed")

    # a staged clone is refused, the others are refreshed
    write(env, prod, {2 * GRAIN: block("prod-newer-2")})
    d = Staged(env, clones["prod-clone-2"])
    try:
        r = env.cli("refresh", "--namespace", NS, "--selector", "team=qa", "--copy-rate", "150", "--wait", "120")
        assert r.returncode == 1, r.stdout + r.stderr
        assert d.read(2 * GRAIN, 4096) == block("prod-2")  # untouched under its user
    finally:
        d.close()
    st = env.api.resources.get(api_version=OPS, kind="VolumeRefresh").get(namespace=NS).to_dict()["items"]
    last = max(st, key=lambda o: o["metadata"]["creationTimestamp"] + o["metadata"]["name"])["status"]
    by_pvc = {c["pvc"]: c for c in last["clones"]}
    assert by_pvc["prod-clone-2"]["phase"] == "Failed" and "staged" in by_pvc["prod-clone-2"]["message"]
    assert by_pvc["prod-clone-1"]["phase"] == by_pvc["prod-clone-3"]["phase"] == "Completed"
    assert by_pvc["prod-clone-1"]["grainsToCopy"] == 1
    assert read(env, clones["prod-clone-3"], [2 * GRAIN]) == [block("prod-newer-2")]


def _copied(env: Env, vid: str) -> bool:
    from csi_driver.ops import actions

    b = env.engine()
    try:
        return actions.copy_done(b.report(), vid)
    finally:
        b.close()


def test_status_json_shows_snapshots_clones_in_progress_and_a_stopped_mapping_with_its_event(env: Env) -> None:
    full = env.pvc("full")
    write(env, full, {g * GRAIN: block(f"full-{g}") for g in range(4)})
    snap = env.snapshot("full-s", "full")
    dependent = env.pvc("full-clone", source=("VolumeSnapshot", "full-s"), sc="fc-paused")  # reads through it
    base = env.pvc("base")
    write(env, base, {0: block("base")})
    paused = env.pvc("paused", source=("PersistentVolumeClaim", "base"), sc="fc-paused")  # rate 0: stays copying
    # fill the state dir's filesystem, then overwrite snapshotted grains: the copy-on-write has no room, the
    # snapshot's mapping stops and the write goes on
    filler = env.state / "filler"
    d = Staged(env, full)  # staged first: staging itself needs room for its metadata
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "status=none"], check=False)
        # staging on a full state dir fails, and leaves no loop device behind
        from csi_driver.datapath import privileged
        from csi_driver.engine import errors

        with pytest.raises(errors.NoSpace):
            Staged(env, base)
        assert not [lo for lo in privileged.list_loops() if base in lo.backing_file]
        for g in range(4):
            d.write(g * GRAIN, block(f"full-new-{g}"))
    finally:
        filler.unlink(missing_ok=True)
        d.close()

    r = env.cli("status", "--state-dir", str(env.state), "-o", "json")
    assert r.returncode == 1, r.stdout + r.stderr  # a stopped mapping: scripts see it
    doc = json.loads(r.stdout)
    assert set(doc) == {"volumes", "mappings", "groups", "missingNodes"}
    vols = {v["id"]: v for v in doc["volumes"]}
    assert vols[snap]["kind"] == "snapshot" and vols[snap]["snapshotOf"] == full
    assert vols[full]["kind"] == "volume" and vols[full]["allocatedBytes"] >= 4 * 4096
    maps = {m["target"]: m for m in doc["mappings"]}
    assert maps[snap]["state"] == "stopped" and "space" in maps[snap]["error"], maps[snap]
    # the clone reading through the snapshot cannot stay online without it: stopped too (with it, or by its own
    # copy-on-write that found no room first), never serving wrong data
    assert maps[dependent]["state"] == "stopped" and maps[dependent]["error"]
    assert vols[dependent]["condition"]
    assert maps[paused]["kind"] == "clone" and maps[paused]["state"] == "copying"
    assert maps[paused]["copyRate"] == 0 and maps[paused]["bytesToCopy"] > 0 and maps[paused]["progress"] < 100
    assert read(env, full, [0]) == [block("full-new-0")]  # the source's write succeeded

    wait_for(lambda: env.events("full-s", "FlashCopyStopped"), timeout=WAIT, what="FlashCopyStopped Event",
             interval=POLL)
    wait_for(lambda: env.events("full-clone", "FlashCopyStopped"), timeout=WAIT, interval=POLL,
             what="FlashCopyStopped Event on the dependent clone's PVC")

    # the same through the Kubernetes API: the FlashCopyNode the leader keeps
    def cluster_doc() -> dict[str, Any] | None:
        r = env.cli("status", "--namespace", DRIVER_NS, "-o", "json")
        d = json.loads(r.stdout) if r.stdout.strip() else {}
        return d if any(m["target"] == snap and m["state"] == "stopped" for m in d.get("mappings", [])) else None
    cdoc = wait_for(cluster_doc, timeout=WAIT, what="FlashCopyNode shows the stopped mapping", interval=POLL)
    assert {v["id"] for v in cdoc["volumes"]} >= {full, snap, paused, dependent}
    node = env.obj(OPS, "FlashCopyNode", NODE, DRIVER_NS) or {}
    assert node["status"]["summary"]["stopped"] >= 1 and node["status"]["summary"]["copying"] >= 1

    r = env.cli("status", "--state-dir", str(env.state))  # the table renders too
    assert "Mappings" in r.stdout and "stopped" in r.stdout


def test_leader_election_one_leader_and_takeover_only_after_expiry(env: Env) -> None:
    from kubernetes import client, config

    from csi_driver.k8s.leader import LeaderElector

    api = config.new_client_from_config(config_file=str(env.peer.kubeconfig))
    a = LeaderElector(api, DRIVER_NS, "test-leader", identity="a", duration=3)
    b = LeaderElector(api, DRIVER_NS, "test-leader", identity="b", duration=3)
    assert a.try_once() and a.leading
    assert not b.try_once() and not b.leading  # a holds an unexpired Lease
    assert a.try_once()  # renewing keeps it
    # a stops renewing: b leads once the Lease expired on its own clock, and a knows it no longer leads
    b_won = wait_for(lambda: b.try_once(), timeout=15, what="b takes over the expired Lease", interval=0.2)
    assert b_won and not a.leading
    lease = client.CoordinationV1Api(api).read_namespaced_lease("test-leader", DRIVER_NS)
    assert lease.spec.holder_identity == "b" and lease.spec.lease_transitions == 1
    assert not a.try_once()
    b.stop()  # a clean stop releases the Lease: the next replica leads at once
    assert a.try_once() and a.leading


def _refresh_obj(env: Env, name: str, selector: str, from_snapshot: str = "") -> None:
    spec = {"selector": selector, **({"fromSnapshot": from_snapshot} if from_snapshot else {})}
    env.create({"apiVersion": OPS, "kind": "VolumeRefresh", "metadata": {"name": name}, "spec": spec})


def _refused_at_admission(env: Env, name: str, selector: str) -> str:
    """The API server's answer to a VolumeRefresh with this selector ("" = accepted)."""
    try:
        _refresh_obj(env, name, selector)
    except Exception as e:  # the dynamic client's ApiException subclasses
        assert getattr(e, "status", 0) in (400, 403, 422), e
        return str(e)
    return ""


def _failed_refresh(env: Env, name: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        st = (env.obj(OPS, "VolumeRefresh", name) or {}).get("status") or {}
        return st if st.get("phase") in ("Completed", "Failed") else None
    st = wait_for(done, timeout=WAIT, interval=POLL, what=f"VolumeRefresh {name} done")
    assert st["phase"] == "Failed", st
    return st


def test_refresh_overwrites_only_clones_of_the_snapshots_source_in_their_mode(env: Env) -> None:
    """Issue 22 item 6 against real objects: an unrelated PVC is not overwritten with another PVC's snapshot, a
    filesystem clone of a block volume is not refreshed with block bytes, a bad selector is refused at admission
    (CRD schema) and a sweeping one by the chart's ValidatingAdmissionPolicy."""
    payroll = env.pvc("payroll", labels={"team": "payroll"})
    write(env, payroll, {0: block("salaries")})
    env.pvc("web")
    env.snapshot("web-s", "web")
    _refresh_obj(env, "overwrite-payroll", "team=payroll", "web-s")
    st = _failed_refresh(env, "overwrite-payroll")
    (clone,) = st["clones"]
    assert clone["pvc"] == "payroll" and "not a clone" in clone["message"], clone
    assert read(env, payroll, [0]) == [block("salaries")]

    # a filesystem PVC made from a block volume's snapshot (Kubernetes allows the mode change when the
    # VolumeSnapshotContent says so); a refresh to the block volume's later bytes is refused
    env.pvc("raw", block=True)
    env.snapshot("raw-s1", "raw")
    content = (env.obj(SNAP, "VolumeSnapshot", "raw-s1") or {})["status"]["boundVolumeSnapshotContentName"]
    env.api.resources.get(api_version=SNAP, kind="VolumeSnapshotContent").patch(
        name=content, body={"metadata": {"annotations": {
            "snapshot.storage.kubernetes.io/allow-volume-mode-change": "true"}}},
        content_type="application/merge-patch+json")
    fs = env.pvc("raw-as-fs", source=("VolumeSnapshot", "raw-s1"), labels={"team": "rawfs"})
    env.snapshot("raw-s2", "raw")
    _refresh_obj(env, "block-into-fs", "team=rawfs", "raw-s2")
    (clone,) = _failed_refresh(env, "block-into-fs")["clones"]
    assert "never changes a volume's mode" in clone["message"], clone
    assert fs

    # admission: the CRD schema refuses what is no label selector
    assert _refused_at_admission(env, "bad-selector", "team=qa=x")
    # the chart's ValidatingAdmissionPolicy refuses a selector that names no label value
    if pm.tool("helm") is None:
        return
    policy = [o for o in pm.helm_template() if o["kind"].startswith("ValidatingAdmissionPolicy")
              and o["metadata"]["name"].endswith("-operations")]
    assert len(policy) == 2
    for o in sorted(policy, key=lambda o: o["kind"]):
        env.create(o, None)
    try:
        why = wait_for(lambda: _refused_at_admission(env, f"sweep-{os.urandom(3).hex()}", "!nothing"),
                       timeout=WAIT, interval=POLL, what="the admission policy in force")
        assert "at least one label value" in why
        assert not _refused_at_admission(env, "by-value", "team=nobody")
    finally:
        for o in policy:
            env.api.resources.get(api_version=o["apiVersion"], kind=o["kind"]).delete(name=o["metadata"]["name"])
