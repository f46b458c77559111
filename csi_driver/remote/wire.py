"""What crosses proto/engine.proto besides the messages themselves: api records <-> messages, and errors.

Errors: the service turns an exception into a status through csi_driver.status.status_for (the same mapping
the CSI servicers use) and names the engine error class in the trailing metadata key ERROR_KEY; the client
raises that same class again (or, for a class it does not know, the engine base class with the same status),
so the CSI layer maps a remote engine's error exactly as it would an embedded engine's. A failure without the
key (the engine process is down, the socket is gone) becomes EngineUnavailable.
"""

from __future__ import annotations

from typing import Any

import grpc

from csi_driver.api import (
    CopyStatus,
    ExtentPage,
    GroupStatus,
    NodeStats,
    Report,
    SnapshotItem,
    Volume,
    VolumeStatus,
)
from csi_driver.engine import errors
from csi_driver.proto_gen import engine_pb2 as pb
from csi_driver.status import Status, status_for

ERROR_KEY = "flashcopy-error"


class EngineUnavailable(errors.EngineClosed):
    """The node engine process does not answer (not started yet, restarting, or dead).

    A subclass of EngineClosed, so the CSI layer answers UNAVAILABLE (retry later).
    """


# -- records


def extents_msg(p: ExtentPage) -> pb.ExtentsResponse:
    return pb.ExtentsResponse(size=p.size, offsets=[o for o, _ in p.extents], lengths=[n for _, n in p.extents])


def to_extents(m: pb.ExtentsResponse) -> ExtentPage:
    return ExtentPage(size=int(m.size), extents=tuple(zip(map(int, m.offsets), map(int, m.lengths), strict=True)))


def volume_msg(v: Volume) -> pb.Volume:
    msg = pb.Volume(id=v.id, name=v.name, size=v.size, grain_size=v.grain_size, attrs=dict(v.attrs),
                    created_at=v.created_at, condition=v.condition, copy_progress=v.copy_progress,
                    allocated_bytes=v.allocated_bytes)
    if v.source_id is not None:
        msg.source_id = v.source_id
    return msg


def to_volume(m: pb.Volume) -> Volume:
    return Volume(id=m.id, name=m.name, size=m.size, grain_size=m.grain_size, attrs=dict(m.attrs),
                  created_at=m.created_at, condition=m.condition,
                  source_id=m.source_id if m.HasField("source_id") else None,
                  copy_progress=m.copy_progress, allocated_bytes=m.allocated_bytes)


def item_msg(it: SnapshotItem) -> pb.SnapshotItem:
    return pb.SnapshotItem(source_id=it.source_id, name=it.name, attrs=dict(it.attrs), volume_id=it.volume_id)


def to_item(m: pb.SnapshotItem) -> SnapshotItem:
    return SnapshotItem(source_id=m.source_id, name=m.name, attrs=dict(m.attrs),
                        volume_id=m.volume_id if m.HasField("volume_id") else None)


def stats_msg(s: NodeStats) -> pb.NodeStatsResponse:
    return pb.NodeStatsResponse(
        block=s.block, total_bytes=s.total_bytes, used_bytes=s.used_bytes, available_bytes=s.available_bytes,
        total_inodes=s.total_inodes, used_inodes=s.used_inodes, available_inodes=s.available_inodes,
        abnormal=s.abnormal, message=s.message)


def to_stats(r: pb.NodeStatsResponse) -> NodeStats:
    return NodeStats(block=r.block, total_bytes=r.total_bytes, used_bytes=r.used_bytes,
                     available_bytes=r.available_bytes, total_inodes=r.total_inodes, used_inodes=r.used_inodes,
                     available_inodes=r.available_inodes, abnormal=r.abnormal, message=r.message)


def copy_msg(c: CopyStatus) -> pb.CopyStatus:
    return pb.CopyStatus(id=c.id, source_id=c.source_id, target_id=c.target_id, state=c.state,
                         copy_rate=c.copy_rate, clean_rate=c.clean_rate, progress=c.progress,
                         bytes_to_copy=c.bytes_to_copy, bytes_to_clean=c.bytes_to_clean, error=c.error,
                         incremental=c.incremental, restore=c.restore, group_id=c.group_id, start_time=c.start_time)


def to_copy(m: pb.CopyStatus, node: str = "") -> CopyStatus:
    return CopyStatus(id=m.id, source_id=m.source_id, target_id=m.target_id, state=m.state, copy_rate=m.copy_rate,
                      clean_rate=m.clean_rate, progress=m.progress, bytes_to_copy=m.bytes_to_copy,
                      bytes_to_clean=m.bytes_to_clean, error=m.error, incremental=m.incremental,
                      restore=m.restore, group_id=m.group_id, start_time=m.start_time, node=node)


def report_msg(r: Report) -> pb.ReportResponse:
    return pb.ReportResponse(
        volumes=[pb.VolumeStatus(id=v.id, name=v.name, size=v.size, allocated_bytes=v.allocated_bytes,
                                 attrs=dict(v.attrs), condition=v.condition, created_at=v.created_at,
                                 hidden=v.hidden, staged=v.staged, dependents=list(v.dependents))
                 for v in r.volumes],
        mappings=[copy_msg(c) for c in r.mappings],
        groups=[pb.GroupStatus(id=g.id, name=g.name, state=g.state, mapping_ids=list(g.mapping_ids),
                               start_time=g.start_time) for g in r.groups])


def to_report(m: pb.ReportResponse, node: str = "") -> Report:
    return Report(
        volumes=tuple(VolumeStatus(id=v.id, name=v.name, size=v.size, allocated_bytes=v.allocated_bytes,
                                   attrs=dict(v.attrs), condition=v.condition, created_at=v.created_at,
                                   hidden=v.hidden, staged=v.staged, dependents=tuple(v.dependents), node=node)
                      for v in m.volumes),
        mappings=tuple(to_copy(c, node) for c in m.mappings),
        groups=tuple(GroupStatus(id=g.id, name=g.name, state=g.state, mapping_ids=tuple(g.mapping_ids),
                                 start_time=g.start_time, node=node) for g in m.groups))


# -- errors


def encode(exc: BaseException) -> Status:
    """The status (code, message, engine error class) for an exception raised while serving a call."""
    return status_for(exc)


def _by_status(code_name: str) -> type[errors.EngineError]:
    """The engine's own class for a status code, for an error class this process does not know."""
    for cls in (errors.InvalidArgument, errors.NotFound, errors.AlreadyExists, errors.OutOfRange,
                errors.InvalidState, errors.NoSpace, errors.EngineClosed, errors.Timeout):
        if cls.status == code_name:
            return cls
    return errors.EngineError


def decode(err: grpc.RpcError, endpoint: str) -> errors.EngineError:
    """The engine error to raise for a failed call."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else "") or ""
    name = ""
    md: Any = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in md or ():
        if key == ERROR_KEY:
            name = value if isinstance(value, str) else value.decode()
    if name:
        cls = errors.error_classes().get(name) or _by_status(code.name)
        exc = cls.__new__(cls)
        errors.EngineError.__init__(exc, details)  # subclasses may take other constructor arguments
        return exc
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return EngineUnavailable(f"the node engine process at {endpoint} is not answering ({code.name}: {details})")
    return errors.EngineError(f"node engine process: {code.name}: {details}")
