"""RemoteBackend: the api.Backend and api.NodeBackend over proto/engine.proto (the node engine process).

Engine errors come back as the same classes (wire.decode); a process that does not answer raises
wire.EngineUnavailable, which the CSI layer answers with UNAVAILABLE. `is_ready` pings the engine, so Probe
follows the engine process. NodeGetVolumeStats keeps answering while the engine is down: the volume is
reported abnormal, with what the node can still see of a mounted filesystem.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from csi_driver.api import CopyStatus, ExtentPage, NodeInfo, NodeStats, Report, SnapshotItem, Volume
from csi_driver.proto_gen import engine_pb2 as pb
from csi_driver.proto_gen import engine_pb2_grpc as pb_grpc
from csi_driver.remote import wire
from csi_driver.remote.tls import TlsFiles, channel_options
from csi_driver.remote.wire import item_msg, to_copy, to_extents, to_report, to_stats, to_volume
from csi_driver.sockets import unix_socket_path

PING_TIMEOUT = 2.0
CALL_TIMEOUT = 120.0  # controller-side calls: metadata only, a snapshot waits for a bounded freeze
NODE_TIMEOUT = 900.0  # mkfs, resize2fs of a large volume

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    # reconnect quickly once a restarted engine process listens again
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class RemoteBackend:
    """Backend + NodeBackend of the node engine process at a unix endpoint. Thread-safe (one channel)."""

    def __init__(self, endpoint: str, *, tls: TlsFiles | None = None, node_id: str = "",
                 read_timeout: float = CALL_TIMEOUT) -> None:
        """endpoint: unix:///path (this node's engine), or HOST:PORT of another node's engine with tls (the
        engine API between nodes is mutual TLS only). node_id: the node it serves, "" = this one.
        read_timeout: for the metadata reads (lookups, listings, capacity), which never wait for I/O."""
        self.endpoint = endpoint
        self.node_id = node_id
        self.read_timeout = read_timeout
        if endpoint.startswith("unix:"):
            self._channel = grpc.insecure_channel(f"unix:{unix_socket_path(endpoint, 'engine endpoint')}",
                                                  options=CHANNEL_OPTIONS)
        else:
            if tls is None:
                raise ValueError(f"engine endpoint {endpoint!r} is TCP: it needs TLS files (--tls-dir)")
            if not node_id:
                raise ValueError(f"engine endpoint {endpoint!r} is TCP: it needs the node whose engine it is")
            # the engine must present a certificate naming node_id: an address from a Lease proves nothing
            options: list[tuple[str, int | str]] = [*CHANNEL_OPTIONS, *channel_options(node_id)]
            self._channel = grpc.secure_channel(endpoint, tls.channel_credentials(), options=options)
        self._stub = pb_grpc.EngineStub(self._channel)
        self._closed = False

    def _call(self, method: str, request: Any, timeout: float = CALL_TIMEOUT) -> Any:
        if self._closed:
            raise wire.EngineUnavailable("the connection to the node engine process is closed")
        fn: Callable[..., Any] = getattr(self._stub, method)
        try:
            return fn(request, timeout=timeout)
        except grpc.RpcError as e:
            raise wire.decode(e, self.endpoint) from None

    # -- readiness

    def ping(self, timeout: float = PING_TIMEOUT) -> pb.PingResponse:
        r: pb.PingResponse = self._call("Ping", pb.PingRequest(), timeout)
        return r

    def is_ready(self) -> bool:
        try:
            self.ping()
            return True
        except wire.EngineUnavailable:
            return False

    def close(self) -> None:
        """Drop the connection; the engine process (and the I/O it serves) goes on."""
        self._closed = True
        self._channel.close()

    # -- Backend

    def capacity(self) -> tuple[int, int]:
        r = self._call("Capacity", pb.CapacityRequest(), self.read_timeout)
        return r.total_bytes, r.free_bytes

    def nodes(self) -> list[NodeInfo]:
        try:
            total, free = self.capacity()
        except wire.EngineUnavailable as e:
            return [NodeInfo(id=self.node_id, live=False, detail=str(e))]
        return [NodeInfo(id=self.node_id, live=True, total_bytes=total, free_bytes=free)]

    def create_volume(self, name: str, size: int, *, grain_size: int, attrs: Mapping[str, str],
                      volume_id: str | None = None) -> Volume:
        return to_volume(self._call("CreateVolume", pb.CreateVolumeRequest(
            name=name, size=size, grain_size=grain_size, attrs=dict(attrs), volume_id=volume_id)).volume)

    def get_volume(self, volume_id: str) -> Volume:
        return to_volume(self._call("GetVolume", pb.GetVolumeRequest(volume_id=volume_id), self.read_timeout).volume)

    def find_volume(self, name: str) -> Volume | None:
        r = self._call("FindVolume", pb.FindVolumeRequest(name=name), self.read_timeout)
        return to_volume(r.volume) if r.HasField("volume") else None

    def find_volumes(self, attrs: Mapping[str, str]) -> list[Volume]:
        r = self._call("FindVolumes", pb.FindVolumesRequest(attrs=dict(attrs)), self.read_timeout)
        return [to_volume(v) for v in r.volumes]

    def delete_volume(self, volume_id: str) -> None:
        self._call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=volume_id))

    def resize_volume(self, volume_id: str, new_size: int) -> Volume:
        return to_volume(self._call("ResizeVolume", pb.ResizeVolumeRequest(
            volume_id=volume_id, new_size=new_size)).volume)

    def snapshot(self, source_id: str, name: str, *, copy_rate: int, attrs: Mapping[str, str],
                 volume_id: str | None = None) -> Volume:
        return to_volume(self._call("Snapshot", pb.SnapshotRequest(
            source_id=source_id, name=name, copy_rate=copy_rate, attrs=dict(attrs), volume_id=volume_id)).volume)

    def clone(self, source_id: str, name: str, *, size: int, copy_rate: int, clean_rate: int,
              attrs: Mapping[str, str], volume_id: str | None = None) -> Volume:
        return to_volume(self._call("Clone", pb.CloneRequest(
            source_id=source_id, name=name, size=size, copy_rate=copy_rate, clean_rate=clean_rate,
            attrs=dict(attrs), volume_id=volume_id)).volume)

    def snapshot_group(self, group_name: str, items: Sequence[SnapshotItem], *, copy_rate: int) -> list[Volume]:
        req = pb.SnapshotGroupRequest(group_name=group_name, copy_rate=copy_rate,
                                      items=[item_msg(it) for it in items])
        return [to_volume(v) for v in self._call("SnapshotGroup", req).volumes]

    def delete_group(self, group_name: str) -> None:
        self._call("DeleteGroup", pb.DeleteGroupRequest(group_name=group_name))

    # -- group start in phases (remote.cluster drives them across nodes)

    def prepare_group(self, group_name: str, items: Sequence[SnapshotItem], *, copy_rate: int,
                      watchdog: float, timeout: float = CALL_TIMEOUT) -> None:
        self._call("PrepareGroup", pb.PrepareGroupRequest(
            group_name=group_name, copy_rate=copy_rate, watchdog_ms=int(watchdog * 1000),
            items=[item_msg(it) for it in items]), timeout)

    def start_group(self, group_name: str, timeout: float = CALL_TIMEOUT) -> list[Volume]:
        r = self._call("StartGroup", pb.GroupPhaseRequest(group_name=group_name), timeout)
        return [to_volume(v) for v in r.volumes]

    def release_group(self, group_name: str, *, abort: bool, timeout: float = CALL_TIMEOUT) -> float:
        r = self._call("ReleaseGroup", pb.ReleaseGroupRequest(group_name=group_name, abort=abort), timeout)
        return float(r.hold_seconds)

    # -- NodeBackend

    # -- operations

    def report(self) -> Report:
        return to_report(self._call("Report", pb.ReportRequest(), self.read_timeout), self.node_id)

    def modify_copies(self, volume_id: str, *, copy_rate: int | None, clean_rate: int | None) -> list[CopyStatus]:
        r = self._call("ModifyCopies", pb.ModifyCopiesRequest(volume_id=volume_id, copy_rate=copy_rate,
                                                              clean_rate=clean_rate))
        return [to_copy(c, self.node_id) for c in r.mappings]

    def restore_volume(self, volume_id: str, snapshot_id: str, *, copy_rate: int) -> CopyStatus:
        r = self._call("RestoreVolume", pb.RestoreVolumeRequest(volume_id=volume_id, snapshot_id=snapshot_id,
                                                                copy_rate=copy_rate))
        return to_copy(r.mapping, self.node_id)

    def refresh_volume(self, volume_id: str, source_id: str, *, copy_rate: int) -> tuple[CopyStatus, int]:
        r = self._call("RefreshVolume", pb.RefreshVolumeRequest(volume_id=volume_id, source_id=source_id,
                                                                copy_rate=copy_rate))
        return to_copy(r.mapping, self.node_id), int(r.grains_to_copy)

    def allocated_extents(self, volume_id: str, *, start: int, limit: int) -> ExtentPage:
        return to_extents(self._call("AllocatedExtents", pb.AllocatedExtentsRequest(
            volume_id=volume_id, start=start, limit=limit), self.read_timeout))

    def delta_extents(self, base_id: str, target_id: str, *, start: int, limit: int) -> ExtentPage:
        return to_extents(self._call("DeltaExtents", pb.DeltaExtentsRequest(
            base_id=base_id, target_id=target_id, start=start, limit=limit), self.read_timeout))

    def node_stage(self, volume_id: str, staging_path: str, *, block: bool, fs_type: str,
                   mount_flags: Sequence[str] = (), read_only: bool = False) -> None:
        self._call("NodeStage", pb.NodeStageRequest(
            volume_id=volume_id, staging_path=staging_path, block=block, fs_type=fs_type,
            mount_flags=list(mount_flags), read_only=read_only), NODE_TIMEOUT)

    def node_unstage(self, volume_id: str, staging_path: str) -> None:
        self._call("NodeUnstage", pb.NodeUnstageRequest(volume_id=volume_id, staging_path=staging_path),
                   NODE_TIMEOUT)

    def node_publish(self, volume_id: str, staging_path: str, target_path: str, *, block: bool,
                     read_only: bool = False, mount_flags: Sequence[str] = (), single_writer: bool = False) -> None:
        self._call("NodePublish", pb.NodePublishRequest(
            volume_id=volume_id, staging_path=staging_path, target_path=target_path, block=block,
            read_only=read_only, mount_flags=list(mount_flags), single_writer=single_writer), NODE_TIMEOUT)

    def node_unpublish(self, volume_id: str, target_path: str) -> None:
        self._call("NodeUnpublish", pb.NodeUnpublishRequest(volume_id=volume_id, target_path=target_path),
                   NODE_TIMEOUT)

    def node_stats(self, volume_id: str, volume_path: str) -> NodeStats:
        try:
            r = self._call("NodeStats", pb.NodeStatsRequest(volume_id=volume_id, volume_path=volume_path))
        except wire.EngineUnavailable as e:
            return _stats_without_engine(volume_path, str(e))
        return to_stats(r)

    def node_expand(self, volume_id: str, volume_path: str, required_bytes: int) -> int:
        return int(self._call("NodeExpand", pb.NodeExpandRequest(
            volume_id=volume_id, volume_path=volume_path, required_bytes=required_bytes),
            NODE_TIMEOUT).capacity_bytes)


def _stats_without_engine(volume_path: str, why: str) -> NodeStats:
    """Abnormal stats while the engine is down: a mounted filesystem's counters are still in the kernel."""
    msg = f"engine unavailable: {why}"
    if os.path.isdir(volume_path):
        try:
            st = os.statvfs(volume_path)
        except OSError:
            return NodeStats(block=False, total_bytes=0, used_bytes=0, available_bytes=0, abnormal=True,
                             message=msg)
        return NodeStats(block=False, total_bytes=st.f_blocks * st.f_frsize,
                         used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
                         available_bytes=st.f_bavail * st.f_frsize, total_inodes=st.f_files,
                         used_inodes=st.f_files - st.f_ffree, available_inodes=st.f_favail, abnormal=True,
                         message=msg)
    return NodeStats(block=True, total_bytes=0, used_bytes=0, available_bytes=0, abnormal=True, message=msg)
