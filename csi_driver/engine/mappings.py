"""Mappings and their FlashCopy state transitions: create, prepare, start, stop, complete, delete.

    idle_or_copied --prepare--> preparing -> prepared --start--> copying --(target owns every grain)--> idle_or_copied
    copying --stop--> stopping (cleaning) -> stopped;  copying --force stop / out of space--> stopped

A start is the point-in-time instant: `_start` holds the engine lock (host I/O) only for the final flush of the
sources and the one commit that inserts every target (`Cascade._insert_target`). Copy sets (`snapshot`,
`clone`, and groups.py's `snapshot_group`) create their targets and mappings and start them together: all or
nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Sequence

from csi_driver.engine import errors
from csi_driver.engine.bitmap import Bitmap
from csi_driver.engine.bypass import changes_io
from csi_driver.engine.model import (
    DEFAULT_CLEAN_RATE,
    DEFAULT_COPY_RATE,
    CopyItem,
    GroupInfo,
    GroupState,
    MappingInfo,
    MappingState,
    VolumeInfo,
)
from csi_driver.engine.state import Group, Map, Quiesce, Vol, check_rate
from csi_driver.engine.volumes import Volumes

_STARTABLE = (MappingState.IDLE_OR_COPIED, MappingState.STOPPED, MappingState.PREPARED, MappingState.PREPARING)
_GROUP_OPEN = (GroupState.IDLE_OR_COPIED, GroupState.STOPPED, GroupState.EMPTY)


class Mappings(Volumes):
    """The mapping part of the public API (methods without a leading underscore take the engine lock)."""

    # ------------------------------------------------------------------ create, look up, modify

    @changes_io
    def create_mapping(self, source_id: str, target_id: str, *, copy_rate: int = DEFAULT_COPY_RATE,
                       clean_rate: int = DEFAULT_CLEAN_RATE, grain_size: int | None = None,
                       incremental: bool = False, autodelete: bool = False, group_id: str | None = None,
                       name: str | None = None) -> MappingInfo:
        with self._lock:
            self._check_open()
            m = self._new_mapping(source_id, target_id, copy_rate=copy_rate, clean_rate=clean_rate,
                                  grain_size=grain_size, incremental=incremental, autodelete=autodelete,
                                  group_id=group_id, name=name)
            self._maps[m.id] = m
            self._dirty_map(m)
            self._commit()
            return self._minfo(m)

    def _new_mapping(self, source_id: str, target_id: str, *, copy_rate: int, clean_rate: int,
                     grain_size: int | None = None, incremental: bool = False, autodelete: bool = False,
                     group_id: str | None = None, name: str | None = None) -> Map:
        s, t = self._vol(source_id), self._vol(target_id)
        if s is t:
            raise errors.InvalidArgument("source and target must differ")
        check_rate("copy_rate", copy_rate)
        check_rate("clean_rate", clean_rate)
        if grain_size is not None and grain_size != s.grain:
            raise errors.InvalidArgument(
                f"grain size {grain_size} differs from the source's {s.grain} (a cascade has one grain size)")
        if t.grain != s.grain:
            raise errors.InvalidArgument(f"target grain {t.grain} differs from source grain {s.grain}")
        if t.size < s.size:
            raise errors.OutOfRange(f"target {t.id} ({t.size} bytes) is smaller than source {s.id} ({s.size})")
        if group_id is not None:
            g = self._groups.get(group_id)
            if g is None:
                raise errors.NotFound(f"group {group_id!r} not found")
            if self._group_state(g) not in _GROUP_OPEN:
                raise errors.InvalidState(f"group {group_id} is active; membership cannot change")
        mid = self._new_id("map")
        m = Map(mid, next(self._seq), name or mid, s.id, t.id, s.grain)
        m.copy_rate, m.clean_rate = copy_rate, clean_rate
        m.incremental, m.autodelete, m.group_id = bool(incremental), bool(autodelete), group_id
        if m.incremental:
            m.diff = Bitmap(max(s.ngrains, t.ngrains))
        return m

    def get_mapping(self, mapping_id: str) -> MappingInfo:
        with self._lock:
            return self._minfo(self._map(mapping_id))

    def list_mappings(self, *, volume_id: str | None = None) -> list[MappingInfo]:
        with self._lock:
            ms = sorted(self._maps.values(), key=lambda m: m.seq)
            return [self._minfo(m) for m in ms if volume_id is None or volume_id in (m.source, m.target)]

    def modify_mapping(self, mapping_id: str, *, copy_rate: int | None = None, clean_rate: int | None = None,
                       autodelete: bool | None = None) -> MappingInfo:
        with self._lock:
            m = self._map(mapping_id)
            if copy_rate is not None:
                m.copy_rate = check_rate("copy_rate", copy_rate)
            if clean_rate is not None:
                m.clean_rate = check_rate("clean_rate", clean_rate)
            if autodelete is not None:
                m.autodelete = bool(autodelete)
            self._dirty_map(m)
            if m.autodelete and m.state == MappingState.IDLE_OR_COPIED and m.start_time:
                self._forget_mapping(m)
                self._reap()
            self._commit()
            self._work.notify_all()
            return self._minfo(m)

    # ------------------------------------------------------------------ prepare and start

    def _check_startable(self, m: Map) -> None:
        if m.state not in _STARTABLE:
            raise errors.InvalidState(f"mapping {m.id} is {m.state.value}; stop it before starting again")
        s, t = self._vols.get(m.source), self._vols.get(m.target)
        if s is None or s.deleted:
            raise errors.InvalidState(f"mapping {m.id}: source {m.source} was deleted")
        if t is None or t.deleted:
            raise errors.InvalidState(f"mapping {m.id}: target {m.target} was deleted")
        if s.offline:
            raise errors.InvalidState(f"mapping {m.id}: source {s.id} is offline: {s.offline}")
        if t.upstream is not None:
            raise errors.InvalidState(f"target {t.id} is already the target of an active mapping")

    @changes_io
    def prepare_mapping(self, mapping_id: str) -> MappingInfo:
        with self._lock:
            self._check_open()
            m = self._map(mapping_id)
            if m.group_id is not None:
                raise errors.InvalidState(f"mapping {m.id} is in group {m.group_id}; prepare the group")
            self._prepare([m])
            return self._minfo(m)

    def _prepare(self, ms: list[Map]) -> None:
        """FlashCopy's prepare: flush the sources so the start itself has little left to do.

        Called with the lock held once; the lock is dropped while the data is synced so host I/O goes on.
        The prepared state is not made durable: after a crash a prepared mapping is simply not started.
        """
        for m in ms:
            self._check_startable(m)
            m.state = MappingState.PREPARING
        self._commit_data()
        sources = {self._vols[m.source] for m in ms}
        fds = [os.dup(v.fd) for v in sources if v in self._host_dirty and v.fd >= 0]
        self._host_dirty -= sources
        self._lock.release()
        try:
            for fd in fds:
                self._io.fdatasync(fd)
                os.close(fd)
        finally:
            self._lock.acquire()
        for m in ms:
            if m.state == MappingState.PREPARING:
                m.state = MappingState.PREPARED

    @changes_io
    def start_mapping(self, mapping_id: str, *, quiesce: Quiesce | None = None) -> MappingInfo:
        with self._lock:
            self._check_open()
            m = self._map(mapping_id)
            if m.group_id is not None:
                raise errors.InvalidState(f"mapping {m.id} is in group {m.group_id}; start the group")
            self._check_startable(m)
        self._start([m], quiesce)
        with self._lock:
            return self._minfo(m)

    def _start(self, ms: list[Map], quiesce: Quiesce | None, group: Group | None = None) -> None:
        """Start mappings at one instant: host I/O to every source is held while the cascades change.

        Called without the lock: the prepare syncs with it released, and the quiesce hook (a filesystem
        freeze) writes through the engine.
        """
        with self._lock:
            self._prepare(ms)
        ctx = quiesce([m.source for m in ms]) if quiesce is not None else contextlib.nullcontext()
        with ctx, self._lock:
            held = time.perf_counter()
            self._start_prepared(ms, group)
            self.last_start_hold = time.perf_counter() - held
        self._drop_stale()

    def _start_prepared(self, ms: list[Map], group: Group | None) -> None:
        """The instant itself, lock held: prepared mappings join their cascades in one transaction."""
        self._check_open()
        for m in ms:
            if m.state != MappingState.PREPARED:
                raise errors.InvalidState(f"mapping {m.id} left the prepared state")
            self._check_startable(m)
        # writes since prepare: the instant holds exactly what the host saw, durably
        self._commit()
        for m in ms:
            s = self._vols[m.source]
            if s in self._host_dirty:
                self._io.fdatasync(self._fd(s))
                self._host_dirty.discard(s)
        now = time.time()
        truncate: list[Vol] = []
        for m in ms:
            truncate += self._insert_target(m, now)
        if group is not None:
            group.start_time = now
            self._dirty_group(group)
        for t in truncate:
            if self._io.allocated(self._fd(t)):
                # old data to drop (a full restart of a used target): t gets an empty file now, and the old one is
                # dropped once no committed bitmap vouches for it (I4), outside the engine lock (`_drop_stale`):
                # freeing a large file's extents takes long, and host I/O to every volume waits on this lock
                old = Vol(t.id, t.seq, t.name, t.size, t.grain, {}, t.created, t.file)
                old.fd, t.fd = t.fd, -1
                self._create_file(t, f"{t.id}.{secrets.token_hex(4)}.img")
                self._dirty_vol(t)
                self._stale_files.append(old)
        self._commit()  # I6: every target, mapping and link of the start in one transaction
        self._work.notify_all()

    def _drop_stale(self) -> None:
        """Drop the data files starts replaced (their metadata no longer names them), without the lock."""
        with self._lock:
            stale, self._stale_files = self._stale_files, []
        if stale:
            # freeing a large file's extents takes a while: the caller's copy is complete already, so it
            # does not wait (a crash before the drop leaves an orphan that the next open removes)
            threading.Thread(target=self._drop_files, args=(stale,), name="drop-stale", daemon=True).start()

    def _drop_files(self, files: list[Vol]) -> None:
        for v in files:
            self._drop_file(v)

    # ------------------------------------------------------------------ stop, complete, delete

    @changes_io
    def stop_mapping(self, mapping_id: str, *, force: bool = False) -> MappingInfo:
        with self._lock:
            self._check_open()
            m = self._map(mapping_id)
            self._stop(m, force)
            self._commit()
            self._work.notify_all()
            return self._minfo(m)

    def _stop(self, m: Map, force: bool) -> None:
        if m.state in (MappingState.PREPARED, MappingState.PREPARING):
            m.state = MappingState.STOPPED if m.start_time else MappingState.IDLE_OR_COPIED
            self._dirty_map(m)
            return
        if m.state not in (MappingState.COPYING, MappingState.STOPPING):
            return  # idle_or_copied and stopped: nothing to stop
        t = self._vols[m.target]
        if t.bits is not None and t.bits.full():
            self._complete(m, t)
            return
        if t.downstream is None:
            self._detach_stopped(m, t, "")
        elif force:
            self._stop_dependents(t, f"mapping {m.id} stopped by force")
            m.error = ""
            self._dirty_map(m)
        else:
            m.state = MappingState.STOPPING  # the copier cleans t into its downstream, then detaches it
            t.offline = f"mapping {m.id} is stopping before the copy completed"  # FlashCopy: target offline
            self._dirty_map(m)
            self._dirty_vol(t)

    def _detach_stopped(self, m: Map, t: Vol, error: str) -> None:
        self._unlink(t)
        t.offline = error or f"mapping {m.id} was stopped before the copy completed"
        t.pending.clear()
        m.state = MappingState.STOPPED
        m.error = error
        self._dirty_vol(t)
        self._dirty_map(m)
        self._reap()

    def _complete(self, m: Map, t: Vol) -> None:
        """The target owns every grain: it becomes independent (FlashCopy's copy complete)."""
        self._commit()  # the split below needs every bit durable
        self._split(t)
        m.state = MappingState.IDLE_OR_COPIED
        m.copied = True
        self._dirty_map(m)
        if m.autodelete:
            self._forget_mapping(m)
        self._reap()

    def _copy_finished(self, m: Map, t: Vol) -> None:
        """Background copy of m is done (t owns every grain): complete it, commit, wake whoever waits."""
        self._complete(m, t)
        self._commit()
        self._work.notify_all()

    @changes_io
    def delete_mapping(self, mapping_id: str, *, force: bool = False) -> None:
        with self._lock:
            m = self._map(mapping_id)
            if m.state == MappingState.STOPPED and not force:
                raise errors.InvalidState(f"mapping {m.id} is stopped; delete with force")
            if m.state not in (MappingState.IDLE_OR_COPIED, MappingState.STOPPED) and not force:
                raise errors.InvalidState(f"mapping {m.id} is {m.state.value}; stop it first")
            with self._all_or_nothing():  # a failed commit (a full state dir) leaves the mapping as on disk
                if m.state not in (MappingState.IDLE_OR_COPIED, MappingState.STOPPED):
                    self._stop(m, True)
                t = self._vols.get(m.target)
                if t is not None and m.state == MappingState.STOPPED:
                    t.offline = ""  # force-deleting a stopped mapping brings its target back, as it is
                    self._dirty_vol(t)
                self._forget_mapping(m)
                self._reap()
                self._commit_freeing()

    # ------------------------------------------------------------------ one-call copies

    @changes_io
    def snapshot(self, source_id: str, name: str, *, copy_rate: int = 0, clean_rate: int = 0,
                 attrs: dict[str, str] | None = None, volume_id: str | None = None,
                 quiesce: Quiesce | None = None) -> tuple[VolumeInfo, MappingInfo]:
        """A point-in-time copy of source: a new target volume and a started (by default no-copy) mapping."""
        _, pairs = self._copy_set([CopyItem(source_id, name, attrs, volume_id)], None, copy_rate, clean_rate,
                                  autodelete=False, quiesce=quiesce)
        return pairs[0]

    @changes_io
    def clone(self, source_id: str, name: str, *, size: int | None = None, copy_rate: int = DEFAULT_COPY_RATE,
              clean_rate: int = DEFAULT_CLEAN_RATE, attrs: dict[str, str] | None = None,
              volume_id: str | None = None, autodelete: bool = True, incremental: bool = False,
              quiesce: Quiesce | None = None) -> tuple[VolumeInfo, MappingInfo]:
        """A new volume with source's data, usable at once; background copy makes it independent.

        incremental: the mapping stays once copied (never autodeleted) and records the grains either side
        writes, so a later `refresh` of the clone copies only those.
        """
        _, pairs = self._copy_set([CopyItem(source_id, name, attrs, volume_id)], None, copy_rate, clean_rate,
                                  autodelete=autodelete and not incremental, size=size, quiesce=quiesce,
                                  incremental=incremental)
        return pairs[0]

    def _copy_set(self, items: Sequence[CopyItem], group_name: str | None, copy_rate: int, clean_rate: int, *,
                  autodelete: bool, size: int | None = None, quiesce: Quiesce | None = None,
                  incremental: bool = False) -> tuple[GroupInfo | None, list[tuple[VolumeInfo, MappingInfo]]]:
        """Create targets and mappings (and a group when group_name is given), then start them together.

        All or nothing. The start runs without the caller holding the engine lock: its prepare syncs data with
        the lock released and its quiesce hook (a filesystem freeze) writes through the engine.
        """
        new_vols: list[Vol] = []
        new_maps: list[Map] = []
        group: Group | None = None
        try:
            with self._lock:
                group = self._new_copy_set(items, group_name, copy_rate, clean_rate, autodelete, size,
                                           new_vols, new_maps)
                for m in new_maps:
                    if incremental:
                        m.incremental = True
                        m.diff = Bitmap(self._vols[m.target].ngrains)
            # the new rows reach disk in the start's own commit: a crash leaves all of it or none
            self._start(new_maps, quiesce, group)
        except BaseException:
            with self._lock:
                self._forget_new(new_vols, new_maps, group)
            raise
        with self._lock:
            pairs = [(self._vinfo(self._vols[m.target]), self._minfo(m)) for m in new_maps]
            if autodelete:
                self._work.notify_all()
            return (self._ginfo(group) if group else None), pairs

    def _new_copy_set(self, items: Sequence[CopyItem], group_name: str | None, copy_rate: int, clean_rate: int,
                      autodelete: bool, size: int | None, new_vols: list[Vol], new_maps: list[Map]) -> Group | None:
        """Targets and mappings (and the group) in memory only, appended to new_vols/new_maps as they are
        made so that `_forget_new` undoes a partial set. Lock held."""
        check_rate("copy_rate", copy_rate)
        check_rate("clean_rate", clean_rate)
        for it in items:
            if not isinstance(it, CopyItem):
                raise TypeError(f"copy items are CopyItem records, got {type(it).__name__}")
        names = [it.name for it in items]
        if len(set(names)) != len(names):
            raise errors.InvalidArgument("target names must be distinct")
        self._check_open()
        group: Group | None = None
        if group_name is not None:
            self._check_name(group_name)
            if any(g.name == group_name for g in self._groups.values()):
                raise errors.AlreadyExists(f"a group named {group_name!r} exists")
            group = Group(self._new_id("grp"), next(self._seq), group_name)
        for it in items:
            s = self._vol(it.source_id)
            if s.offline:
                raise errors.InvalidState(f"source {s.id} is offline: {s.offline}")
            tsize = s.size if size is None else size
            if tsize < s.size:
                raise errors.OutOfRange(f"requested size {tsize} is smaller than source {s.id} ({s.size})")
            t = self._new_volume(it.name, tsize, s.grain, it.attrs, it.volume_id)
            new_vols.append(t)
            self._vols[t.id] = t
            m = Map(self._new_id("map"), next(self._seq), t.id, s.id, t.id, s.grain)
            m.copy_rate, m.clean_rate, m.autodelete = copy_rate, clean_rate, autodelete
            m.group_id = group.id if group else None
            new_maps.append(m)
            self._maps[m.id] = m
            self._feeds = None
        if group is not None:
            self._groups[group.id] = group
        return group

    def _forget_new(self, new_vols: list[Vol], new_maps: list[Map], group: Group | None) -> None:
        """Undo a failed _copy_set, in memory and (if a commit already wrote any of it) on disk."""
        for m in new_maps:
            self._maps.pop(m.id, None)
            self._feeds = None
            self._ch.mappings.pop(m.id, None)
            self._ch.del_mappings.add(m.id)
        for v in new_vols:
            if v.upstream is not None or v.downstream is not None:
                self._unlink(v)
            self._vols.pop(v.id, None)
            self._ch.volumes.pop(v.id, None)
            self._ch.del_volumes.add(v.id)
            self._ch.del_bitmaps.add("v:" + v.id)
            self._bits_dirty.pop("v:" + v.id, None)
            self._copy_dirty.discard(v)
            self._unlink_later.append(v)
        if group is not None:
            self._groups.pop(group.id, None)
            self._ch.groups.pop(group.id, None)
            self._ch.del_groups.add(group.id)
        if not self._closed:
            with contextlib.suppress(Exception):
                self._commit()

    @changes_io
    def refresh(self, target_id: str, source_id: str, *, copy_rate: int | None = None) -> tuple[MappingInfo, int]:
        """Incremental refresh: target shows source's data at once, and only grains that may differ are copied.

        The target's incremental mapping (from `clone(incremental=True)`) knows the grains either side wrote
        since its last start; the grains where its old source and the new one differ come from their cascade
        (`_differing`, reading only the grains some node between them owns). The target keeps every other grain
        it owns, which equals the new source's by construction, and its mapping now runs from `source_id`.
        Without such a mapping (or with its old source gone) every grain is copied again. Returns the mapping
        and the number of grains the refresh drops (the copy's work). Snapshots of the target keep their data
        (a hidden node, as for a restore: then the whole target is copied).
        """
        with self._lock:
            self._check_open()
            t, s = self._vol(target_id), self._vol(source_id)
            if s is t:
                raise errors.InvalidArgument("a volume cannot be refreshed from itself")
            if s.grain != t.grain:
                raise errors.InvalidArgument(f"grain sizes differ ({s.grain} and {t.grain})")
            if t.size < s.size:
                raise errors.OutOfRange(f"{t.id} ({t.size} bytes) is smaller than {s.id} ({s.size})")
            if s.offline:
                raise errors.InvalidState(f"source {s.id} is offline: {s.offline}")
            m = self._incoming(t)
            if m is not None and m.state in (MappingState.STOPPING, MappingState.PREPARING, MappingState.PREPARED):
                raise errors.InvalidState(f"mapping {m.id} into {t.id} is {m.state.value}; try again later")
            old = self._vols.get(m.source) if m is not None else None
            mask = (1 << t.ngrains) - 1
            if m is not None and m.diff is not None and m.start_time and old is not None and not t.offline:
                drop = m.diff.as_int()
                for g in self._differing(old, s):
                    drop |= 1 << g
            else:
                if m is None or m.diff is None:
                    m = self._new_mapping(s.id, t.id, copy_rate=DEFAULT_COPY_RATE, clean_rate=DEFAULT_CLEAN_RATE,
                                          incremental=True)
                    self._maps[m.id] = m
                drop = mask
            # what _insert_target will keep: the grains t owns (all, once independent) that cannot differ
            owned = t.bits.as_int() if (t.bits is not None and t.upstream is not None) else mask
            if t.downstream is not None and self._dependents(t):
                # others still read t's grains (a clone below it, or an older snapshot its last start put
                # under it): they keep t's data in a hidden node, t is copied whole
                self._hide_under_keeper(t)
                drop = mask
            elif t.upstream is not None or t.downstream is not None:
                self._unlink(t)  # nothing reads t's grains through it; it leaves its old cascade
            dropped = t.ngrains - (owned & ~drop & mask).bit_count()
            m.source, m.state, m.copied, m.autodelete, m.error = s.id, MappingState.IDLE_OR_COPIED, True, False, ""
            assert m.diff is not None
            m.diff = Bitmap(max(m.diff.n, t.ngrains), (drop & mask).to_bytes((t.ngrains + 7) >> 3, "little"))
            if copy_rate is not None:
                m.copy_rate = check_rate("copy_rate", copy_rate)
            self._feeds = None
            self._dirty_map(m)
        self._start([m], None)
        with self._lock:
            return self._minfo(m), dropped

    def modify_copies(self, volume_id: str, *, copy_rate: int | None = None,
                      clean_rate: int | None = None) -> list[MappingInfo]:
        """Change the rates of every mapping that copies into volume_id (its background copy and cleaning)."""
        with self._lock:
            self._vol(volume_id)
            ids = [m.id for m in sorted(self._maps.values(), key=lambda m: m.seq) if m.target == volume_id]
        return [self.modify_mapping(i, copy_rate=copy_rate, clean_rate=clean_rate) for i in ids]

    @changes_io
    def restore(self, from_volume_id: str, to_volume_id: str, *, copy_rate: int = DEFAULT_COPY_RATE) -> MappingInfo:
        """Reverse FlashCopy: to_volume shows from_volume's data at once; other snapshots are kept."""
        with self._lock:
            self._check_open()
            m = self._new_mapping(from_volume_id, to_volume_id, copy_rate=copy_rate, clean_rate=DEFAULT_CLEAN_RATE,
                                  autodelete=True)
            self._maps[m.id] = m
            self._feeds = None
        try:
            self._start([m], None)  # the mapping row is written by the start's commit
        except BaseException:
            with self._lock:
                self._maps.pop(m.id, None)
                self._feeds = None
                self._ch.mappings.pop(m.id, None)
            raise
        with self._lock:
            return self._minfo(m)
