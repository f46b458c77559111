"""A real `csi-flashcopy serve --mode all` (engine embedded, or the separate node engine process) driven
through the CSI Controller and Node RPCs over its unix socket, as kubelet and the sidecars would.

Engine modes: both are parametrized; "process" skips (with the reason) while this build cannot serve it.
Pick one with CSI_FLASHCOPY_E2E_ENGINE=embedded|process.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.datapath import privileged
from csi_driver.proto_gen import csi_pb2
from tests.csi.conftest import REPO, CsiServer, short_tmp
from tests.datapath.conftest import leftovers

MiB = 1 << 20
MODE = csi_pb2.VolumeCapability.AccessMode
# mkfs.xfs refuses filesystems under 300 MiB
SIZES = {"ext4": 64 * MiB, "xfs": 320 * MiB, "block": 16 * MiB}
ENGINE_MODES = [m for m in ("embedded", "process")
                if os.environ.get("CSI_FLASHCOPY_E2E_ENGINE", m) == m]


def process_mode_unavailable() -> str | None:
    """Why `serve --engine process` cannot run in this build (None once it can)."""
    from csi_driver.server import check_engine_mode

    args = argparse.Namespace(engine="process", mode="all", state_dir="/nonexistent", engine_endpoint="")
    try:
        check_engine_mode(args)
    except ValueError as e:
        return str(e)
    return None


def cap(kind: str, mode: int = MODE.SINGLE_NODE_WRITER, flags: tuple[str, ...] = ()) -> csi_pb2.VolumeCapability:
    """kind: "block", or a filesystem type."""
    access = MODE(mode=mode)
    if kind == "block":
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=access)
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type=kind, mount_flags=flags),
                                    access_mode=access)


class NodeCluster:
    """A serve process (+ its engine process in process mode) and the kubelet-side calls."""

    def __init__(self, root: Path, engine_mode: str):
        self.engine_mode = engine_mode
        self.root = root
        self.engine_proc: subprocess.Popen[bytes] | None = None
        endpoint = f"unix://{root}/state/engine.sock"
        extra: tuple[str, ...] = ("--engine", engine_mode)
        if engine_mode == "process":
            extra += ("--engine-endpoint", endpoint)
            self._start_engine(endpoint)
        self.srv = CsiServer(root, extra=extra).start(timeout=60)

    def _start_engine(self, endpoint: str) -> None:
        os.makedirs(self.root / "state", exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = open(self.root / "engine.log", "ab")  # noqa: SIM115 - handed to the child
        self.engine_proc = subprocess.Popen(
            [sys.executable, "-m", "csi_driver", "engine", "--state-dir", str(self.root / "state"),
             "--endpoint", endpoint], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def engine_log(self) -> str:
        path = self.root / "engine.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> list[str]:
        """Stop everything; returns problems (exit codes, leftovers under the server's directory)."""
        problems = []
        # a failed test leaves its volumes staged: their loop devices must go while the export still
        # answers (after the server stops they would sit on a dead FUSE connection)
        stale = [x for x in leftovers(str(self.root)) if x.startswith("loop ")]  # the export is still up
        if stale:
            problems.append(f"still staged at the end: {stale}")
            for m in sorted((m for m in privileged.mounts() if m.source.startswith("/dev/loop")),
                            key=lambda m: -len(m.mount_point)):
                if any(lo.device == m.source and lo.backing_file.startswith(str(self.root))
                       for lo in privileged.list_loops()):
                    privileged.umount(m.mount_point, lazy=True)
            for lo in privileged.list_loops():
                if lo.backing_file.startswith(str(self.root) + "/"):
                    privileged.detach_loop(lo.device)
        code = self.srv.stop()
        if code != 0:
            problems.append(f"serve exited {code}:\n{self.srv.log()[-3000:]}")
        if self.engine_proc is not None:
            self.engine_proc.send_signal(signal.SIGTERM)
            try:
                code = self.engine_proc.wait(60)
            except subprocess.TimeoutExpired:
                self.engine_proc.kill()
                code = self.engine_proc.wait()
            if code != 0:
                problems.append(f"engine exited {code}")
        left = leftovers(str(self.root))
        if left:
            problems.append(f"left behind under {self.root} after stopping: {left}")
        return problems

    # -------------------------------------------------------------- controller

    def create(self, kind: str, size: int | None = None, *, snapshot: str = "", volume: str = "",
               name: str = "") -> csi_pb2.Volume:
        src = None
        if snapshot:
            src = csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot))
        elif volume:
            src = csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume))
        req = csi_pb2.CreateVolumeRequest(
            name=name or f"pvc-{uuid.uuid4().hex[:12]}", volume_capabilities=[cap(kind)],
            capacity_range=csi_pb2.CapacityRange(required_bytes=size or SIZES[kind]), volume_content_source=src)
        return self.srv.controller.CreateVolume(req, timeout=60).volume

    def snapshot(self, volume_id: str) -> csi_pb2.Snapshot:
        req = csi_pb2.CreateSnapshotRequest(name=f"snap-{uuid.uuid4().hex[:12]}", source_volume_id=volume_id)
        return self.srv.controller.CreateSnapshot(req, timeout=60).snapshot

    def delete(self, volume_id: str) -> None:
        self.srv.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=60)

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.srv.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id), timeout=60)

    def expand(self, volume_id: str, size: int) -> csi_pb2.ControllerExpandVolumeResponse:
        return self.srv.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=size)), timeout=60)

    # -------------------------------------------------------------- node (kubelet's side)

    def stage(self, volume_id: str, kind: str, staging: str, **kw: object) -> None:
        os.makedirs(staging, exist_ok=True)  # kubelet creates the staging directory
        self.srv.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=staging, volume_capability=cap(kind, **kw)),  # type: ignore[arg-type]
            timeout=120)

    def publish(self, volume_id: str, kind: str, staging: str, target: str, *, readonly: bool = False,
                **kw: object) -> None:
        os.makedirs(os.path.dirname(target), exist_ok=True)  # kubelet creates the parent; the SP the target
        self.srv.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=staging, target_path=target, readonly=readonly,
            volume_capability=cap(kind, **kw)), timeout=60)  # type: ignore[arg-type]

    def unpublish(self, volume_id: str, target: str) -> None:
        self.srv.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=target), timeout=60)

    def unstage(self, volume_id: str, staging: str) -> None:
        self.srv.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=staging), timeout=60)

    def stats(self, volume_id: str, path: str) -> csi_pb2.NodeGetVolumeStatsResponse:
        return self.srv.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume_id, volume_path=path), timeout=60)

    def node_expand(self, volume_id: str, path: str, staging: str, size: int, kind: str
                    ) -> csi_pb2.NodeExpandVolumeResponse:
        return self.srv.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=volume_id, volume_path=path, staging_target_path=staging,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size), volume_capability=cap(kind)), timeout=120)

    def attach(self, volume_id: str, kind: str, workdir: str, *, readonly: bool = False) -> tuple[str, str]:
        """Stage and publish like kubelet; returns (staging, target). Block targets are device files."""
        staging = f"{workdir}/staging/{volume_id}"
        target = f"{workdir}/pods/{volume_id}/" + ("dev" if kind == "block" else "mnt")
        self.stage(volume_id, kind, staging)
        self.publish(volume_id, kind, staging, target, readonly=readonly)
        return staging, target

    def detach(self, volume_id: str, staging: str, target: str) -> None:
        self.unpublish(volume_id, target)
        self.unstage(volume_id, staging)
        assert not os.path.exists(target), f"{target} still exists after NodeUnpublishVolume"
        assert not privileged.is_mountpoint(staging)


def make_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeCluster]:
    mode = request.param
    if mode == "process":
        why = process_mode_unavailable()
        if why:
            pytest.skip(f"engine process mode unavailable: {why}")
    cluster = NodeCluster(short_tmp(tmp_path_factory, f"node-{mode}"), mode)
    try:
        yield cluster
    finally:
        problems = cluster.stop()
    assert not problems, "\n".join(problems)


def rpc_code(fn: object, request: object) -> grpc.StatusCode:
    try:
        fn(request, timeout=60)  # type: ignore[operator]
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


# ------------------------------------------------------------------------------------------- file contents


def write_files(root: str, n: int, seed: str, size: int = 200_000) -> dict[str, str]:
    """n files of seed-derived bytes, not fsynced (a freeze must flush them); name -> sha256."""
    digests = {}
    for i in range(n):
        block = hashlib.sha256(f"{seed}-{i}".encode()).digest()
        data = (block * (size // 32 + 1))[: size + i * 4099]  # odd sizes: partial last blocks
        name = f"{seed}-{i:03d}"
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def check_files(root: str, digests: dict[str, str]) -> None:
    for name, digest in digests.items():
        with open(os.path.join(root, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, f"{name} differs in {root}"


