"""Consistency groups: many mappings prepared and started at one instant (FlashCopy's consistency groups).

A group's members are the mappings naming it (`Map.group_id`); its state is its most active member's
(`model.GroupState.of`). Members may join or leave only while the group is idle, stopped or empty.

`GroupStart` is one engine's part of a group whose members live on several engines (nodes): a coordinator
drives FlashCopy's phases itself. prepare (targets made in memory, sources synced and quiesced, their host
writes held) -> start (the instant: the cascade insertion and its commit) -> release (host writes go on).
I7 (one instant across engines): a source write is acknowledged either before its engine's prepare returned
(so it is in the copy) or after its release (so it is not); a coordinator that releases no engine before every
engine has started therefore gets a single instant for all of them. All or none: release(abort=True) removes
what prepare and start made, and a watchdog does that by itself (or, once started, just releases) when the
coordinator goes quiet.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence

from csi_driver.engine import errors
from csi_driver.engine.bypass import changes_io
from csi_driver.engine.mappings import Mappings
from csi_driver.engine.model import CopyItem, GroupInfo, MappingInfo, VolumeInfo
from csi_driver.engine.state import Group, Map, Quiesce, Vol

log = logging.getLogger(__name__)


class Groups(Mappings):
    """The group part of the public API (every method takes the engine lock)."""

    def create_group(self, name: str) -> GroupInfo:
        with self._lock:
            self._check_open()
            self._check_name(name)
            if any(g.name == name for g in self._groups.values()):
                raise errors.AlreadyExists(f"a group named {name!r} exists")
            g = Group(self._new_id("grp"), next(self._seq), name)
            self._groups[g.id] = g
            self._dirty_group(g)
            self._commit()
            return self._ginfo(g)

    def get_group(self, group_id: str) -> GroupInfo:
        with self._lock:
            return self._ginfo(self._group(group_id))

    def list_groups(self) -> list[GroupInfo]:
        with self._lock:
            return [self._ginfo(g) for g in sorted(self._groups.values(), key=lambda g: g.seq)]

    @changes_io
    def prepare_group(self, group_id: str) -> GroupInfo:
        with self._lock:
            g = self._group(group_id)
            self._prepare(self._members(g))
            return self._ginfo(g)

    @changes_io
    def start_group(self, group_id: str, *, quiesce: Quiesce | None = None) -> GroupInfo:
        with self._lock:
            self._check_open()
            g = self._group(group_id)
            ms = self._members(g)
            if not ms:
                raise errors.InvalidState(f"group {group_id} has no mappings")
            for m in ms:
                self._check_startable(m)
        self._start(ms, quiesce, g)
        with self._lock:
            return self._ginfo(g)

    @changes_io
    def stop_group(self, group_id: str, *, force: bool = False) -> GroupInfo:
        with self._lock:
            g = self._group(group_id)
            for m in self._members(g):
                self._stop(m, force)
            self._commit()
            self._work.notify_all()
            return self._ginfo(g)

    @changes_io
    def delete_group(self, group_id: str) -> None:
        """Delete the group; its mappings become stand-alone (FlashCopy's group 0)."""
        with self._lock:
            g = self._group(group_id)
            with self._all_or_nothing():  # a failed commit (a full state dir) leaves the group as on disk
                for m in self._members(g):
                    m.group_id = None
                    self._dirty_map(m)
                self._groups.pop(g.id)
                self._ch.del_groups.add(g.id)
                self._commit_freeing()

    @changes_io
    def snapshot_group(self, items: Sequence[CopyItem], *, group_name: str, copy_rate: int = 0,
                       quiesce: Quiesce | None = None) -> tuple[GroupInfo, list[tuple[VolumeInfo, MappingInfo]]]:
        """Snapshots of several volumes at one instant (a consistency group). All are made or none."""
        if not items:
            raise errors.InvalidArgument("a group snapshot needs at least one source volume")
        grp, pairs = self._copy_set(items, group_name, copy_rate, 0, autodelete=False, quiesce=quiesce)
        assert grp is not None
        return grp, pairs

    @changes_io
    def begin_group_start(self, items: Sequence[CopyItem], *, group_name: str, copy_rate: int = 0,
                          quiesce: Quiesce | None = None, watchdog: float = 5.0) -> GroupStart:
        """Prepare this engine's part of a multi-engine group start (see GroupStart); returns once prepared."""
        if not items:
            raise errors.InvalidArgument("a group snapshot needs at least one source volume")
        gs = GroupStart(self, items, group_name, copy_rate, quiesce, watchdog)
        gs._prepare()
        return gs


class GroupStart:
    """One engine's part of a consistency-group start driven from elsewhere (module doc, I7). Thread-safe;
    every method is idempotent in its final phase."""

    def __init__(self, engine: Groups, items: Sequence[CopyItem], group_name: str, copy_rate: int,
                 quiesce: Quiesce | None, watchdog: float) -> None:
        self._e = engine
        self._items = list(items)
        self.group_name = group_name
        self._copy_rate = copy_rate
        self._quiesce = quiesce
        self.watchdog = watchdog
        self._mu = threading.Lock()
        self.phase = "new"  # new -> prepared -> started -> released | aborted
        self._vols: list[Vol] = []
        self._maps: list[Map] = []
        self._group: Group | None = None
        self._ctx: contextlib.AbstractContextManager[object] | None = None
        self._gated: list[str] = []
        self._held_since = 0.0
        #: how long host writes to the sources were held (quiesce to release), once released
        self.hold_seconds = 0.0
        self._timer: threading.Timer | None = None

    @property
    def source_ids(self) -> list[str]:
        return [it.source_id for it in self._items]

    def _prepare(self) -> None:
        e = self._e
        try:
            with e._lock:
                self._group = e._new_copy_set(self._items, self.group_name, self._copy_rate, 0, False, None,
                                              self._vols, self._maps)
                e._prepare(self._maps)
            self._held_since = time.perf_counter()
            if self._quiesce is not None:
                ctx = self._quiesce(self.source_ids)
                ctx.__enter__()  # freezes flush through the engine: before the gate closes
                self._ctx = ctx
            with e._lock:
                e._check_open()
                for vid in dict.fromkeys(self.source_ids):
                    e._held[vid] = e._held.get(vid, 0) + 1
                    self._gated.append(vid)
            self.phase = "prepared"
        except BaseException:
            self._undo()
            self._ungate()
            raise
        self._timer = threading.Timer(self.watchdog, self._on_watchdog)
        self._timer.daemon = True
        self._timer.start()

    def start(self) -> list[tuple[VolumeInfo, MappingInfo]]:
        """The instant. InvalidState unless prepared (the watchdog may have aborted it)."""
        e = self._e
        with self._mu:
            if self.phase == "started":
                return self._pairs()
            if self.phase != "prepared":
                raise errors.InvalidState(f"group start {self.group_name!r} is {self.phase}, not prepared")
            if self._timer is not None:
                self._timer.cancel()
            with e._lock:
                e._start_prepared(self._maps, self._group)
            e._drop_stale()
            with e._lock:
                e._bypass_regrant()
            self.phase = "started"
            # the coordinator releases next; if it does not, the copies stay and the writes go on
            self._timer = threading.Timer(self.watchdog, self._on_watchdog)
            self._timer.daemon = True
            self._timer.start()
            return self._pairs()

    def _pairs(self) -> list[tuple[VolumeInfo, MappingInfo]]:
        e = self._e
        with e._lock:
            return [(e._vinfo(e._vols[m.target]), e._minfo(m)) for m in self._maps]

    def release(self, *, abort: bool = False) -> float:
        """Let host writes go on; with abort (or when never started) remove every target, mapping and the
        group first. Returns the hold in seconds."""
        with self._mu:
            if self.phase in ("released", "aborted"):
                return self.hold_seconds
            if self._timer is not None:
                self._timer.cancel()
            if abort or self.phase != "started":
                self._undo()
                self.phase = "aborted"
            else:
                self.phase = "released"
            self._ungate()
            return self.hold_seconds

    def _on_watchdog(self) -> None:
        with self._mu:
            phase = self.phase
        if phase in ("prepared", "started"):
            log.warning("group start %r: no word from the coordinator for %.1f s while %s; %s", self.group_name,
                        self.watchdog, phase, "aborting" if phase == "prepared" else "releasing")
            self.release(abort=phase == "prepared")

    def _undo(self) -> None:
        e = self._e
        with e._lock:
            e._forget_new(self._vols, self._maps, self._group)
        self._vols, self._maps, self._group = [], [], None

    def _ungate(self) -> None:
        e = self._e
        with e._lock:
            for vid in self._gated:
                n = e._held.get(vid, 0) - 1
                if n > 0:
                    e._held[vid] = n
                else:
                    e._held.pop(vid, None)
            self._gated = []
            e._bypass_regrant()  # writes of the sources may be bypassed again (B2)
            e._gate.notify_all()
        ctx, self._ctx = self._ctx, None
        try:
            if ctx is not None:
                ctx.__exit__(None, None, None)
        finally:
            if self._held_since:
                self.hold_seconds = time.perf_counter() - self._held_since
