"""CSI SnapshotMetadata service: changed-block tracking from the FlashCopy bitmaps (KEP-3314).

GetMetadataAllocated(snapshot) lists the ranges of a snapshot that hold data; GetMetadataDelta(base, target) the
ranges that changed between two snapshots of one volume. Both come from the engine's bitmaps and cascade
(Backend.allocated_extents / delta_extents), never from reading data, paged from the engine and streamed.

Block type: VARIABLE_LENGTH. The engine's unit is a grain (64 or 256 KiB) and changes come in runs of grains
(a database file, a filesystem's extents), so merged extents make far fewer tuples than FIXED_LENGTH at grain
size would (1 GiB rewritten: one tuple instead of 4096), and the count follows the number of runs, not bytes.

Rules (CSI v1.10 SnapshotMetadata):
- every message carries block_metadata_type VARIABLE_LENGTH and the same volume_capacity_bytes (the snapshot's
  size; the target's for a delta); tuples are ascending and do not overlap, also across messages;
- starting_offset: no tuple ends at or before it; a tuple holding it starts at it (cut there), so a client
  resuming at the end of the last tuple it received gets exactly the rest;
- max_results > 0: at most that many tuples per message; 0: the driver's choice (DEFAULT_MAX_RESULTS);
- errors: missing or malformed ids, a negative starting_offset or max_results, base and target of different
  volumes INVALID_ARGUMENT; an unknown id (or one naming a volume, not a snapshot) NOT_FOUND; starting_offset at
  or past the end OUT_OF_RANGE; no tracking possible between the two (a snapshot whose mapping was stopped, one
  split from its cascade, different nodes) or a base not older than the target FAILED_PRECONDITION, so the
  client falls back to a full backup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc

from csi_driver.api import MAX_EXTENTS_PAGE, ExtentPage, Volume
from csi_driver.csi import objects as o
from csi_driver.csi.controller import get_kind
from csi_driver.csi.driver import Driver
from csi_driver.csi.errors import invalid, out_of_range
from csi_driver.csi.validation import require_id
from csi_driver.proto_gen import csi_pb2, csi_pb2_grpc

DEFAULT_MAX_RESULTS = 4096  # tuples per message when the client leaves it to the driver
VARIABLE = csi_pb2.BlockMetadataType.VARIABLE_LENGTH


def _check_paging(starting_offset: int, max_results: int) -> None:
    if starting_offset < 0:
        raise invalid("starting_offset", "must not be negative")
    if max_results < 0:
        raise invalid("max_results", "must not be negative")


def _check_offset(v: Volume, starting_offset: int) -> None:
    if starting_offset >= v.size:
        raise out_of_range(f"starting_offset {starting_offset} is not below the snapshot's size {v.size}")


def stream_pages(fetch: Callable[[int, int], ExtentPage], starting_offset: int, max_results: int
                 ) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """(capacity, tuples) messages from pages of extents fetched from `starting_offset` on: the first tuple cut
    to begin at starting_offset, at most max_results tuples each (0: DEFAULT_MAX_RESULTS), at least one message.

    fetch(start, limit) returns the extents ending after byte `start` (the one holding it may begin before),
    `limit` at most; a page shorter than asked for is the last.
    """
    per_message = max_results or DEFAULT_MAX_RESULTS
    limit = min(per_message, MAX_EXTENTS_PAGE)
    pos = starting_offset
    sent = False
    capacity: int | None = None
    while True:
        page = fetch(pos, limit)
        if capacity is None:
            capacity = page.size
        out: list[tuple[int, int]] = []
        for off, length in page.extents:
            end = off + length
            if end <= pos:
                continue
            start = max(off, pos)
            out.append((start, end - start))
        for i in range(0, len(out), per_message):
            yield capacity, out[i:i + per_message]
            sent = True
        if len(page.extents) < limit or not out:
            break
        pos = out[-1][0] + out[-1][1]
        if pos >= capacity:
            break
    if not sent:
        yield capacity, []


def _tuples(extents: list[tuple[int, int]]) -> list[csi_pb2.BlockMetadata]:
    return [csi_pb2.BlockMetadata(byte_offset=off, size_bytes=n) for off, n in extents]


class SnapshotMetadataServicer(csi_pb2_grpc.SnapshotMetadataServicer):
    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    def GetMetadataAllocated(self, request: csi_pb2.GetMetadataAllocatedRequest, context: grpc.ServicerContext
                             ) -> Iterator[csi_pb2.GetMetadataAllocatedResponse]:
        sid = require_id(request.snapshot_id, "snapshot_id")
        _check_paging(request.starting_offset, request.max_results)
        backend = self.driver.backend
        snap = get_kind(backend, sid, o.KIND_SNAPSHOT)
        _check_offset(snap, request.starting_offset)

        def fetch(start: int, limit: int) -> ExtentPage:
            return backend.allocated_extents(sid, start=start, limit=limit)

        for capacity, extents in stream_pages(fetch, request.starting_offset, request.max_results):
            yield csi_pb2.GetMetadataAllocatedResponse(block_metadata_type=VARIABLE, volume_capacity_bytes=capacity,
                                                       block_metadata=_tuples(extents))

    def GetMetadataDelta(self, request: csi_pb2.GetMetadataDeltaRequest, context: grpc.ServicerContext
                         ) -> Iterator[csi_pb2.GetMetadataDeltaResponse]:
        base_id = require_id(request.base_snapshot_id, "base_snapshot_id")
        target_id = require_id(request.target_snapshot_id, "target_snapshot_id")
        _check_paging(request.starting_offset, request.max_results)
        backend = self.driver.backend
        base = get_kind(backend, base_id, o.KIND_SNAPSHOT)
        target = get_kind(backend, target_id, o.KIND_SNAPSHOT)
        a, b = base.attrs.get(o.SOURCE_VOLUME, ""), target.attrs.get(o.SOURCE_VOLUME, "")
        if not a or a != b:
            raise invalid("base_snapshot_id", f"snapshot {base_id} is of volume {a or '?'}, target {target_id} "
                                              f"of volume {b or '?'}: a delta is between snapshots of one volume")
        _check_offset(target, request.starting_offset)

        def fetch(start: int, limit: int) -> ExtentPage:
            return backend.delta_extents(base_id, target_id, start=start, limit=limit)

        for capacity, extents in stream_pages(fetch, request.starting_offset, request.max_results):
            yield csi_pb2.GetMetadataDeltaResponse(block_metadata_type=VARIABLE, volume_capacity_bytes=capacity,
                                                   block_metadata=_tuples(extents))
