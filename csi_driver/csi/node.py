"""CSI Node service: make a volume usable on this node (stage/publish), report usage, grow it online.

The data path itself (FUSE export, loop device, mkfs/mount, bind mounts) lives behind the NodeBackend
protocol (csi_driver.datapath.node.DataPath, in-process or in the node engine process). This servicer only
validates requests, takes the per-volume try-lock and maps the answers.

Paths are checked before anything touches the host, because the data path runs as root and mounts,
unmounts and deletes at the paths it is given: they must be absolute and normalised, never "/", and
(as the CSI spec makes the CO guarantee) a staging path must be an existing directory and a target
path's parent must exist. Unpublish/unstage only ever undo what the data path itself recorded or mounted.
"""

from __future__ import annotations

import os

import grpc

from csi_driver.api import NodeBackend
from csi_driver.csi import objects as o
from csi_driver.csi.controller import get_kind
from csi_driver.csi.driver import Driver
from csi_driver.csi.errors import CsiError, failed_precondition, invalid, not_found, out_of_range
from csi_driver.csi.validation import MODE, capacity_range, check_capability_shape, require_id, unsupported_reason
from csi_driver.engine.model import path_problem, valid_mount_flag
from csi_driver.proto_gen import csi_pb2, csi_pb2_grpc

READ_ONLY_MODES = frozenset({MODE.SINGLE_NODE_READER_ONLY, MODE.MULTI_NODE_READER_ONLY})


def require_path(value: str, field: str) -> str:
    """An absolute, normalised path that is not the root directory (engine.model.path_problem: the engine API
    applies the same grammar)."""
    why = path_problem(value)
    if why:
        raise invalid(field, why)
    return os.path.normpath(value)


def volume_path(value: str, field: str) -> str | None:
    """A path to look a volume up at: required, but one that cannot be ours is simply not found (None)."""
    if not value:
        raise invalid(field, "required")
    try:
        return require_path(value, field)
    except CsiError:
        return None


def require_capability(cap: csi_pb2.VolumeCapability, has: bool, driver: Driver,
                       field: str = "volume_capability") -> None:
    if not has:
        raise invalid(field, "required")
    check_capability_shape(cap, field)
    why = unsupported_reason(cap, driver.settings)
    if why:
        # the CSI spec's "exceeds capabilities" answer for the node service
        raise failed_precondition(f"{field}: {why}")


def mount_flags(cap: csi_pb2.VolumeCapability) -> list[str]:
    if cap.WhichOneof("access_type") != "mount":
        return []
    flags = list(cap.mount.mount_flags)
    for i, flag in enumerate(flags):
        if not valid_mount_flag(flag):
            raise invalid(f"volume_capability.mount.mount_flags[{i}]", "empty or contains control characters")
    return flags


class NodeServicer(csi_pb2_grpc.NodeServicer):
    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    def _node(self) -> NodeBackend:
        return self.driver.backend  # UNAVAILABLE until the engine is open

    def NodeGetInfo(self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
                    ) -> csi_pb2.NodeGetInfoResponse:
        s = self.driver.settings
        return csi_pb2.NodeGetInfoResponse(node_id=s.node_id, max_volumes_per_node=s.max_volumes_per_node,
                                           accessible_topology=s.topology())

    def NodeGetCapabilities(self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
                            ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=self.driver.settings.node_capabilities())

    # ------------------------------------------------------------------ stage / unstage

    def NodeStageVolume(self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
                        ) -> csi_pb2.NodeStageVolumeResponse:
        vid = require_id(request.volume_id, "volume_id")
        staging = require_path(request.staging_target_path, "staging_target_path")
        cap = request.volume_capability
        require_capability(cap, request.HasField("volume_capability"), self.driver)
        flags = mount_flags(cap)
        if not os.path.isdir(staging):
            raise failed_precondition(f"staging_target_path {staging} is not an existing directory "
                                      "(the CO creates it)")
        node = self._node()
        # a snapshot is an engine volume too, but never one to mount (writing would change the snapshot)
        get_kind(self.driver.backend, vid, o.KIND_VOLUME)
        block = cap.WhichOneof("access_type") == "block"
        with self.driver.locks.hold(f"node-volume:{vid}"):
            node.node_stage(vid, staging, block=block, fs_type="" if block else cap.mount.fs_type,
                            mount_flags=flags, read_only=cap.access_mode.mode in READ_ONLY_MODES)
        return csi_pb2.NodeStageVolumeResponse()

    def NodeUnstageVolume(self, request: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
                          ) -> csi_pb2.NodeUnstageVolumeResponse:
        vid = require_id(request.volume_id, "volume_id")
        staging = require_path(request.staging_target_path, "staging_target_path")
        node = self._node()
        with self.driver.locks.hold(f"node-volume:{vid}"):
            node.node_unstage(vid, staging)  # nothing staged there: success (idempotent)
        return csi_pb2.NodeUnstageVolumeResponse()

    # ------------------------------------------------------------------ publish / unpublish

    def NodePublishVolume(self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
                          ) -> csi_pb2.NodePublishVolumeResponse:
        vid = require_id(request.volume_id, "volume_id")
        target = require_path(request.target_path, "target_path")
        cap = request.volume_capability
        require_capability(cap, request.HasField("volume_capability"), self.driver)
        flags = mount_flags(cap)
        if not request.staging_target_path:
            # we advertise STAGE_UNSTAGE_VOLUME, so a publish without one is the CO's ordering error
            raise failed_precondition("staging_target_path: required (the driver stages volumes)")
        staging = require_path(request.staging_target_path, "staging_target_path")
        if not os.path.isdir(os.path.dirname(target)):
            raise failed_precondition(f"the parent directory of target_path {target} does not exist")
        node = self._node()
        block = cap.WhichOneof("access_type") == "block"
        read_only = request.readonly or cap.access_mode.mode in READ_ONLY_MODES
        with self.driver.locks.hold(f"node-volume:{vid}"):
            node.node_publish(vid, staging, target, block=block, read_only=read_only, mount_flags=flags,
                              single_writer=cap.access_mode.mode == MODE.SINGLE_NODE_SINGLE_WRITER)
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
                            ) -> csi_pb2.NodeUnpublishVolumeResponse:
        vid = require_id(request.volume_id, "volume_id")
        target = require_path(request.target_path, "target_path")
        node = self._node()
        with self.driver.locks.hold(f"node-volume:{vid}"):
            node.node_unpublish(vid, target)  # not published there: success (idempotent)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # ------------------------------------------------------------------ stats / expand

    def NodeGetVolumeStats(self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
                           ) -> csi_pb2.NodeGetVolumeStatsResponse:
        vid = require_id(request.volume_id, "volume_id")
        path = volume_path(request.volume_path, "volume_path")
        node = self._node()
        if path is None:
            raise not_found(f"volume {vid} is not staged or published at {request.volume_path[:200]!r}")
        st = node.node_stats(vid, path)  # NOT_FOUND: unknown volume, or nothing of it at path
        unit = csi_pb2.VolumeUsage.Unit
        usage = [csi_pb2.VolumeUsage(unit=unit.BYTES, total=st.total_bytes, used=st.used_bytes,
                                     available=st.available_bytes)]
        if not st.block:
            usage.append(csi_pb2.VolumeUsage(unit=unit.INODES, total=st.total_inodes, used=st.used_inodes,
                                             available=st.available_inodes))
        resp = csi_pb2.NodeGetVolumeStatsResponse(usage=usage)
        if "VOLUME_CONDITION" in self.driver.settings.node_rpcs:
            resp.volume_condition.CopyFrom(csi_pb2.VolumeCondition(abnormal=st.abnormal, message=st.message))
        return resp

    def NodeExpandVolume(self, request: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
                         ) -> csi_pb2.NodeExpandVolumeResponse:
        vid = require_id(request.volume_id, "volume_id")
        path = volume_path(request.volume_path, "volume_path")
        required, limit = capacity_range(request.capacity_range)
        if request.HasField("volume_capability"):
            require_capability(request.volume_capability, True, self.driver)
        node = self._node()
        if path is None:
            raise not_found(f"volume {vid} is not staged or published at {request.volume_path[:200]!r}")
        with self.driver.locks.hold(f"node-volume:{vid}"):
            capacity = node.node_expand(vid, path, required)
        if limit and capacity > limit:
            raise out_of_range(f"the volume already holds {capacity} bytes, more than limit_bytes {limit}")
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=capacity)
