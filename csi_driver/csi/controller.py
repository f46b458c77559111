"""CSI Controller service: volumes, clones, snapshots over the Backend.

Every handler: validate the request (INVALID_ARGUMENT naming the field), take the per-name/per-id try-lock
(ABORTED if busy), then look up, compare, and act. Create* are idempotent by name through the engine's own
records; Delete* succeed for objects that are already gone. No ControllerPublish: the driver is attach-free.
"""

from __future__ import annotations

import grpc

from csi_driver.api import Backend, Volume
from csi_driver.csi import objects as o
from csi_driver.csi import placement
from csi_driver.csi.driver import Driver
from csi_driver.csi.errors import (
    CsiError,
    already_exists,
    failed_precondition,
    invalid,
    not_found,
    out_of_range,
)
from csi_driver.csi.params import MutableParams, parse_mutable_params, parse_snapshot_params, parse_volume_params
from csi_driver.csi.settings import Settings
from csi_driver.csi.validation import (
    capacity_range,
    check_capability_shape,
    is_valid_id,
    max_entries,
    require_capabilities,
    require_id,
    require_name,
    unsupported_reason,
)
from csi_driver.engine import errors as engine_errors
from csi_driver.proto_gen import csi_pb2, csi_pb2_grpc


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def choose_size(required: int, limit: int, grain: int, source_size: int, default: int) -> int:
    """The volume size for a capacity range: grain aligned, never below a content source's size."""
    if required:
        target = max(required, source_size)
    elif source_size:
        target = source_size
    else:
        target = min(default, limit) if limit else default
    size = round_up(max(target, 1), grain)
    if limit and size > limit:
        size = (limit // grain) * grain
        if size == 0 or size < max(required, source_size):
            if source_size > limit:
                raise out_of_range(f"the content source is {source_size} bytes, more than limit_bytes {limit}")
            raise out_of_range(f"no multiple of the {grain}-byte grain fits in [{required}, {limit}] bytes")
    return size


def get_kind(backend: Backend, object_id: str, kind: o.Kind) -> Volume:
    """The volume (kind "volume") or snapshot (kind "snapshot") with that id, else NOT_FOUND."""
    try:
        v = backend.get_volume(object_id)
    except engine_errors.NotFound:
        v = None
    if v is None or v.attrs.get(o.KIND) != kind:
        raise not_found(f"{kind} {object_id} does not exist")
    return v


class ControllerServicer(csi_pb2_grpc.ControllerServicer):
    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    @property
    def settings(self) -> Settings:
        return self.driver.settings

    # ------------------------------------------------------------------ volumes

    def CreateVolume(self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
                     ) -> csi_pb2.CreateVolumeResponse:
        name = require_name(request.name)
        require_capabilities(request.volume_capabilities, self.settings)
        required, limit = capacity_range(request.capacity_range)
        params = parse_volume_params(request.parameters)
        # a VolumeAttributesClass named at creation: its rates override the StorageClass's for the clone's mapping
        mutable = parse_mutable_params(request.mutable_parameters)
        source = (o.ContentSource.from_csi(request.volume_content_source)
                  if request.HasField("volume_content_source") else None)
        source_attr = source.encode() if source is not None else ""
        topology = request.accessibility_requirements if request.HasField("accessibility_requirements") else None

        backend = self.driver.backend
        ename = o.engine_name(o.KIND_VOLUME, name)
        with self.driver.locks.hold(f"volume-name:{name}"):
            existing = backend.find_volume(ename)
            if existing is not None:
                self._check_same_volume(existing, required, limit, params.canonical(), source_attr)
                # mutable parameters are state, not identity (ModifyVolume changes them): a retry applies its own
                self._modify(existing.id, mutable)
                return csi_pb2.CreateVolumeResponse(volume=o.csi_volume(existing, self.settings))
            src: Volume | None = None
            if source is not None:
                src = get_kind(backend, source.id, source.kind)
            grain = src.grain_size if src is not None else params.grain_size
            size = choose_size(required, limit, grain, src.size if src is not None else 0,
                               self.settings.default_volume_size)
            if src is not None:
                node = placement.volume_node(src, self.settings)
                placement.check_source_node(node, f"{source.kind} {src.id}" if source else src.id, topology,
                                            self.settings)
            else:
                node = placement.choose_node(backend.nodes(), topology, size, self.settings)
            attrs = {o.KIND: o.KIND_VOLUME, o.NAME: name, o.PARAMS: params.canonical(), o.SOURCE: source_attr,
                     o.NODE: node, o.MODE: o.mode_of(request.volume_capabilities)}
            if src is not None:  # what a later refresh may bring this clone to (ops.actions.refresh)
                attrs[o.ORIGIN] = src.attrs.get(o.SOURCE_VOLUME, "") if o.is_snapshot(src) else src.id
            vid = o.new_volume_id(node)
            if src is not None:
                copy_rate = params.copy_rate if mutable.copy_rate is None else mutable.copy_rate
                clean_rate = params.clean_rate if mutable.clean_rate is None else mutable.clean_rate
                v = backend.clone(src.id, ename, size=size, copy_rate=copy_rate, clean_rate=clean_rate,
                                  attrs=attrs, volume_id=vid)
            else:
                v = backend.create_volume(ename, size, grain_size=grain, attrs=attrs, volume_id=vid)
        return csi_pb2.CreateVolumeResponse(volume=o.csi_volume(v, self.settings))

    @staticmethod
    def _check_same_volume(v: Volume, required: int, limit: int, params: str, source: str) -> None:
        if v.attrs.get(o.SOURCE, "") != source:
            raise already_exists(f"volume {v.attrs.get(o.NAME)!r} exists ({v.id}) with another content source")
        if v.attrs.get(o.PARAMS) != params:
            raise already_exists(f"volume {v.attrs.get(o.NAME)!r} exists ({v.id}) with other parameters")
        if v.size < required or (limit and v.size > limit):
            raise already_exists(f"volume {v.attrs.get(o.NAME)!r} exists ({v.id}) with {v.size} bytes, "
                                 f"outside the requested range")

    def DeleteVolume(self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
                     ) -> csi_pb2.DeleteVolumeResponse:
        vid = require_id(request.volume_id, "volume_id")
        backend = self.driver.backend
        with self.driver.locks.hold(f"volume:{vid}"):
            try:
                v = backend.get_volume(vid)
                if o.is_volume(v):  # a snapshot id is not a volume: nothing to delete
                    backend.delete_volume(vid)
            except engine_errors.NotFound:
                pass  # already gone: success (idempotent)
        return csi_pb2.DeleteVolumeResponse()

    def ValidateVolumeCapabilities(self, request: csi_pb2.ValidateVolumeCapabilitiesRequest,
                                   context: grpc.ServicerContext) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        vid = require_id(request.volume_id, "volume_id")
        if not request.volume_capabilities:
            raise invalid("volume_capabilities", "required")
        for i, cap in enumerate(request.volume_capabilities):
            check_capability_shape(cap, f"volume_capabilities[{i}]")
        v = get_kind(self.driver.backend, vid, o.KIND_VOLUME)
        reasons = [r for r in (unsupported_reason(c, self.settings) for c in request.volume_capabilities) if r]
        if request.parameters:
            try:
                if parse_volume_params(request.parameters).canonical() != v.attrs.get(o.PARAMS):
                    reasons.append("parameters differ from the ones the volume was created with")
            except CsiError as e:
                reasons.append(e.message)
        try:
            parse_mutable_params(request.mutable_parameters)
        except CsiError as e:
            reasons.append(e.message)
        if reasons:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message="; ".join(reasons))
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
            mutable_parameters=request.mutable_parameters,
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    def ListVolumes(self, request: csi_pb2.ListVolumesRequest, context: grpc.ServicerContext
                    ) -> csi_pb2.ListVolumesResponse:
        limit = max_entries(request.max_entries)
        volumes = self.driver.backend.find_volumes({o.KIND: o.KIND_VOLUME})
        chosen, next_token = o.paginate(volumes, limit, request.starting_token)
        with_condition = "VOLUME_CONDITION" in self.settings.controller_rpcs
        entries = []
        for v in chosen:
            entry = csi_pb2.ListVolumesResponse.Entry(volume=o.csi_volume(v, self.settings))
            if with_condition:
                entry.status.volume_condition.CopyFrom(o.condition(v))
            entries.append(entry)
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=next_token)

    def GetCapacity(self, request: csi_pb2.GetCapacityRequest, context: grpc.ServicerContext
                    ) -> csi_pb2.GetCapacityResponse:
        for i, cap in enumerate(request.volume_capabilities):
            check_capability_shape(cap, f"volume_capabilities[{i}]")
        parse_volume_params(request.parameters)
        if any(unsupported_reason(c, self.settings) for c in request.volume_capabilities):
            return csi_pb2.GetCapacityResponse(available_capacity=0)  # no such volume can be made anywhere
        topology = request.accessible_topology if request.HasField("accessible_topology") else None
        free = placement.capacity_for(self.driver.backend.nodes(), topology, self.settings)
        return csi_pb2.GetCapacityResponse(available_capacity=free)

    def ControllerGetCapabilities(self, request: csi_pb2.ControllerGetCapabilitiesRequest,
                                  context: grpc.ServicerContext) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=self.settings.controller_capabilities())

    def ControllerGetVolume(self, request: csi_pb2.ControllerGetVolumeRequest, context: grpc.ServicerContext
                            ) -> csi_pb2.ControllerGetVolumeResponse:
        vid = require_id(request.volume_id, "volume_id")
        v = get_kind(self.driver.backend, vid, o.KIND_VOLUME)
        status = csi_pb2.ControllerGetVolumeResponse.VolumeStatus(volume_condition=o.condition(v))
        return csi_pb2.ControllerGetVolumeResponse(volume=o.csi_volume(v, self.settings), status=status)

    def ControllerExpandVolume(self, request: csi_pb2.ControllerExpandVolumeRequest,
                               context: grpc.ServicerContext) -> csi_pb2.ControllerExpandVolumeResponse:
        vid = require_id(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise invalid("capacity_range", "required")
        required, limit = capacity_range(request.capacity_range)
        if not required and not limit:
            raise invalid("capacity_range", "required_bytes or limit_bytes must be set")
        if request.HasField("volume_capability"):
            check_capability_shape(request.volume_capability, "volume_capability")
            why = unsupported_reason(request.volume_capability, self.settings)
            if why:
                raise invalid("volume_capability", why)
        backend = self.driver.backend
        with self.driver.locks.hold(f"volume:{vid}"):
            v = get_kind(backend, vid, o.KIND_VOLUME)
            size = choose_size(required or limit, limit, v.grain_size, 0, 0)
            if size > v.size:
                v = backend.resize_volume(vid, size)
        # The node always has work after a resize: a filesystem must grow, and a block device exported from
        # the volume file (loop) must re-read its size. NodeExpandVolume does both (node data path).
        return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=v.size, node_expansion_required=True)

    def ControllerModifyVolume(self, request: csi_pb2.ControllerModifyVolumeRequest,
                               context: grpc.ServicerContext) -> csi_pb2.ControllerModifyVolumeResponse:
        """A VolumeAttributesClass's copyRate/cleanRate applied to the volume's running mappings at once.

        Every key and value is validated before anything changes (all or nothing); the same request again
        sets the same rates (idempotent). A volume that is no copy target has nothing to change: OK."""
        vid = require_id(request.volume_id, "volume_id")
        mutable = parse_mutable_params(request.mutable_parameters)
        with self.driver.locks.hold(f"volume:{vid}"):
            get_kind(self.driver.backend, vid, o.KIND_VOLUME)
            self._modify(vid, mutable)
        return csi_pb2.ControllerModifyVolumeResponse()

    def _modify(self, vid: str, mutable: MutableParams) -> None:
        if mutable:
            self.driver.backend.modify_copies(vid, copy_rate=mutable.copy_rate, clean_rate=mutable.clean_rate)

    # ------------------------------------------------------------------ snapshots

    def CreateSnapshot(self, request: csi_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
                       ) -> csi_pb2.CreateSnapshotResponse:
        name = require_name(request.name)
        src_id = require_id(request.source_volume_id, "source_volume_id")
        params = parse_snapshot_params(request.parameters)
        backend = self.driver.backend
        ename = o.engine_name(o.KIND_SNAPSHOT, name)
        with self.driver.locks.hold(f"snapshot-name:{name}"):
            existing = backend.find_volume(ename)
            if existing is not None:
                if existing.attrs.get(o.SOURCE_VOLUME) != src_id:
                    raise already_exists(f"snapshot {name!r} exists ({existing.id}) of another source volume")
                if existing.attrs.get(o.PARAMS) != params.canonical():
                    raise already_exists(f"snapshot {name!r} exists ({existing.id}) with other parameters")
                return csi_pb2.CreateSnapshotResponse(snapshot=o.csi_snapshot(existing))
            src = get_kind(backend, src_id, o.KIND_VOLUME)
            node = placement.volume_node(src, self.settings)  # a snapshot lives on its source's node
            attrs = {o.KIND: o.KIND_SNAPSHOT, o.NAME: name, o.PARAMS: params.canonical(), o.SOURCE_VOLUME: src.id,
                     o.NODE: node, o.MODE: src.attrs.get(o.MODE, "")}
            v = backend.snapshot(src.id, ename, copy_rate=params.copy_rate, attrs=attrs,
                                 volume_id=o.new_snapshot_id(node))
        return csi_pb2.CreateSnapshotResponse(snapshot=o.csi_snapshot(v))

    def DeleteSnapshot(self, request: csi_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
                       ) -> csi_pb2.DeleteSnapshotResponse:
        sid = require_id(request.snapshot_id, "snapshot_id")
        backend = self.driver.backend
        with self.driver.locks.hold(f"snapshot:{sid}"):
            try:
                v = backend.get_volume(sid)
                if o.is_snapshot(v):
                    group = v.attrs.get(o.GROUP)
                    if group:
                        raise failed_precondition(f"snapshot {sid} belongs to group snapshot {group}: delete the group")
                    # volumes restored from it keep reading through it: the engine reclaims it later
                    backend.delete_volume(sid)
            except engine_errors.NotFound:
                pass
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(self, request: csi_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
                      ) -> csi_pb2.ListSnapshotsResponse:
        limit = max_entries(request.max_entries)
        backend = self.driver.backend
        if request.snapshot_id:
            # a filter, not a reference: an unknown or malformed id simply matches nothing
            snaps = []
            if is_valid_id(request.snapshot_id):
                try:
                    v = backend.get_volume(request.snapshot_id)
                    snaps = [v] if o.is_snapshot(v) else []
                except engine_errors.NotFound:
                    pass
        else:
            snaps = backend.find_volumes({o.KIND: o.KIND_SNAPSHOT})
        if request.source_volume_id:
            snaps = [v for v in snaps if v.attrs.get(o.SOURCE_VOLUME) == request.source_volume_id]
        chosen, next_token = o.paginate(snaps, limit, request.starting_token)
        entries = [csi_pb2.ListSnapshotsResponse.Entry(snapshot=o.csi_snapshot(v)) for v in chosen]
        return csi_pb2.ListSnapshotsResponse(entries=entries, next_token=next_token)

    def GetSnapshot(self, request: csi_pb2.GetSnapshotRequest, context: grpc.ServicerContext
                    ) -> csi_pb2.GetSnapshotResponse:
        sid = require_id(request.snapshot_id, "snapshot_id")
        v = get_kind(self.driver.backend, sid, o.KIND_SNAPSHOT)
        return csi_pb2.GetSnapshotResponse(snapshot=o.csi_snapshot(v))
