"""CSI GroupController service: group snapshots = one engine consistency group started at one instant.

A group snapshot's members are ordinary snapshot volumes whose attrs carry the group id and name, so the
group survives restarts with no state outside the engine. The id is chosen before the engine call, which
creates every member or none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import grpc

from csi_driver.api import Backend, SnapshotItem, Volume
from csi_driver.csi import objects as o
from csi_driver.csi import placement
from csi_driver.csi.controller import get_kind
from csi_driver.csi.driver import Driver
from csi_driver.csi.errors import already_exists, invalid, not_found, unavailable
from csi_driver.csi.params import parse_snapshot_params
from csi_driver.csi.validation import require_id, require_name
from csi_driver.engine import errors as engine_errors
from csi_driver.proto_gen import csi_pb2, csi_pb2_grpc


def group_members(backend: Backend, *, group_id: str = "", name: str = "") -> list[Volume]:
    key, value = (o.GROUP, group_id) if group_id else (o.GROUP_NAME, name)
    return backend.find_volumes({o.KIND: o.KIND_SNAPSHOT, key: value})


def group_snapshot(members: Sequence[Volume]) -> csi_pb2.VolumeGroupSnapshot:
    return csi_pb2.VolumeGroupSnapshot(
        group_snapshot_id=members[0].attrs[o.GROUP],
        snapshots=[o.csi_snapshot(m) for m in members],
        creation_time=o.timestamp(min(m.created_at for m in members)),
        ready_to_use=True,
    )


def complete(members: Sequence[Volume]) -> bool:
    """Every member is there (groups made before members carried GROUP_SIZE count as complete)."""
    want = members[0].attrs.get(o.GROUP_SIZE, "")
    return not want.isdigit() or len(members) >= int(want)


def _delete_members(backend: Backend, members: Sequence[Volume], gid: str = "") -> None:
    for m in members:
        with contextlib.suppress(engine_errors.NotFound):
            backend.delete_volume(m.id)
    for g in {gid} | {m.attrs.get(o.GROUP, "") for m in members} - {""}:
        with contextlib.suppress(engine_errors.NotFound):
            backend.delete_group(g)


def _snapshot_ids(ids: Sequence[str]) -> set[str]:
    return {require_id(s, f"snapshot_ids[{i}]") for i, s in enumerate(ids)}


def _check_ids(given: set[str], members: Sequence[Volume], group_id: str) -> None:
    if given and given != {m.id for m in members}:
        raise invalid("snapshot_ids", f"do not match the snapshots of group snapshot {group_id}")


class GroupControllerServicer(csi_pb2_grpc.GroupControllerServicer):
    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    def GroupControllerGetCapabilities(self, request: csi_pb2.GroupControllerGetCapabilitiesRequest,
                                       context: grpc.ServicerContext
                                       ) -> csi_pb2.GroupControllerGetCapabilitiesResponse:
        return csi_pb2.GroupControllerGetCapabilitiesResponse(
            capabilities=self.driver.settings.group_controller_capabilities())

    def CreateVolumeGroupSnapshot(self, request: csi_pb2.CreateVolumeGroupSnapshotRequest,
                                  context: grpc.ServicerContext) -> csi_pb2.CreateVolumeGroupSnapshotResponse:
        name = require_name(request.name)
        if not request.source_volume_ids:
            raise invalid("source_volume_ids", "required")
        ids = [require_id(v, f"source_volume_ids[{i}]") for i, v in enumerate(request.source_volume_ids)]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise invalid("source_volume_ids", f"{dup} is listed twice")
        params = parse_snapshot_params(request.parameters)
        backend = self.driver.backend
        with self.driver.locks.hold(f"group-name:{name}"):
            members = group_members(backend, name=name)
            if members and not complete(members):
                # left by a controller that died between the nodes' starts and their aborts: make it anew
                _delete_members(backend, members)
                members = []
            if members:
                if sorted(m.attrs.get(o.SOURCE_VOLUME, "") for m in members) != sorted(ids):
                    raise already_exists(f"group snapshot {name!r} exists with other source volumes")
                if any(m.attrs.get(o.PARAMS) != params.canonical() for m in members):
                    raise already_exists(f"group snapshot {name!r} exists with other parameters")
                return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=group_snapshot(members))
            sources = [get_kind(backend, i, o.KIND_VOLUME) for i in ids]
            gid = o.new_group_id()
            items = [
                SnapshotItem(
                    source_id=src.id,
                    name=o.member_name(gid, src.id),
                    attrs={o.KIND: o.KIND_SNAPSHOT, o.PARAMS: params.canonical(), o.SOURCE_VOLUME: src.id,
                           o.GROUP: gid, o.GROUP_NAME: name, o.GROUP_SIZE: str(len(sources)),
                           o.NODE: placement.volume_node(src, self.driver.settings), o.MODE: src.attrs.get(o.MODE, "")},
                    volume_id=o.new_snapshot_id(placement.volume_node(src, self.driver.settings)),
                )
                for src in sources
            ]
            members = backend.snapshot_group(gid, items, copy_rate=params.copy_rate)
        return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=group_snapshot(members))

    def DeleteVolumeGroupSnapshot(self, request: csi_pb2.DeleteVolumeGroupSnapshotRequest,
                                  context: grpc.ServicerContext) -> csi_pb2.DeleteVolumeGroupSnapshotResponse:
        gid = require_id(request.group_snapshot_id, "group_snapshot_id")
        given = _snapshot_ids(request.snapshot_ids)
        backend = self.driver.backend
        with self.driver.locks.hold(f"group:{gid}"):
            members = group_members(backend, group_id=gid)
            if members:
                _check_ids(given, members, gid)
            _delete_members(backend, members, gid)
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()

    def GetVolumeGroupSnapshot(self, request: csi_pb2.GetVolumeGroupSnapshotRequest,
                               context: grpc.ServicerContext) -> csi_pb2.GetVolumeGroupSnapshotResponse:
        gid = require_id(request.group_snapshot_id, "group_snapshot_id")
        given = _snapshot_ids(request.snapshot_ids)
        members = group_members(self.driver.backend, group_id=gid)
        if not members:
            raise not_found(f"group snapshot {gid} does not exist")
        if not complete(members):
            raise unavailable(f"group snapshot {gid}: {len(members)} of {members[0].attrs.get(o.GROUP_SIZE)} "
                              f"member snapshots answer (a node holding the others is down)")
        _check_ids(given, members, gid)
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=group_snapshot(members))
