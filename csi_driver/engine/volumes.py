"""Volumes: create, look up, resize, delete (at once for the caller, storage when nothing reads through it)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import time
from collections.abc import Iterator

from csi_driver.engine import datafiles, errors
from csi_driver.engine.bitmap import Bitmap
from csi_driver.engine.bypass import changes_io
from csi_driver.engine.cascade import Cascade
from csi_driver.engine.model import (
    DEFAULT_GRAIN,
    GRAIN_SIZES,
    MAX_VOLUME_SIZE,
    GroupInfo,
    MappingInfo,
    MappingState,
    VolumeInfo,
    valid_id,
)
from csi_driver.engine.state import Group, Map, Vol
from csi_driver.engine.store import Changes

log = logging.getLogger(__name__)

FILE_CHECK_INTERVAL = 5.0  # seconds between checks that every open data file is still whole


class Volumes(Cascade):
    """The volume part of the public API (methods without a leading underscore take the engine lock)."""

    def _new_volume(self, name: str, size: int, grain: int, attrs: dict[str, str] | None,
                    volume_id: str | None) -> Vol:
        self._check_name(name)
        if grain not in GRAIN_SIZES:
            raise errors.InvalidArgument(f"grain size must be one of {GRAIN_SIZES}, got {grain}")
        if not isinstance(size, int) or size <= 0:
            raise errors.InvalidArgument(f"size must be a positive integer, got {size!r}")
        if size > MAX_VOLUME_SIZE:  # a file offset cannot reach it (ftruncate would overflow)
            raise errors.OutOfRange(f"size {size} is more than the largest volume ({MAX_VOLUME_SIZE} bytes)")
        if self.find_volume(name) is not None:
            raise errors.AlreadyExists(f"a volume named {name!r} exists")
        if volume_id is None:
            volume_id = self._new_id("vol")
        elif not valid_id(volume_id):
            raise errors.InvalidArgument(f"invalid volume id {volume_id!r}")
        elif volume_id in self._vols:
            raise errors.AlreadyExists(f"volume id {volume_id!r} exists")
        attrs = dict(attrs or {})
        if not all(isinstance(k, str) and isinstance(x, str) for k, x in attrs.items()):
            raise errors.InvalidArgument("attrs must map strings to strings")
        size = -(-size // grain) * grain
        v = Vol(volume_id, next(self._seq), name, size, grain, attrs, time.time(),
                f"{volume_id}.{secrets.token_hex(4)}.img")
        self._create_file(v)
        return v

    def create_volume(self, name: str, size: int, *, grain_size: int = DEFAULT_GRAIN,
                      attrs: dict[str, str] | None = None, volume_id: str | None = None) -> VolumeInfo:
        with self._lock:
            self._check_open()
            v = self._new_volume(name, size, grain_size, attrs, volume_id)
            self._vols[v.id] = v
            self._dirty_vol(v)
            self._commit_or_forget([v])
            return self._vinfo(v)

    def _load_records(self) -> int:
        """Volumes, mappings and groups from the store into memory (at open, and to undo a failed change).
        Returns how many volume rows there are."""
        vols, maps, groups, bitmaps = self._store.load()
        maxseq = 0
        for r in vols:
            f = r["file"]
            if not isinstance(f, str) or f in ("", ".", "..") or "/" in f or "\0" in f:
                # a path outside volumes/ (a tampered or corrupt meta.db): never opened, extended or unlinked
                raise errors.InvalidState(f"meta.db names data file {f!r} for volume {r['id']}: not a file name "
                                          f"in volumes/; refusing to open the state dir")
            v = Vol(r["id"], r["seq"], r["name"], r["size"], r["grain"], r["attrs"], r["created"], f)
            v.deleted = bool(r["deleted"])
            v.offline = r["offline"]
            v.clean_rate = r["clean_rate"]
            bm = bitmaps.get("v:" + v.id)
            if bm is not None:
                v.bits = Bitmap(bm[0], bm[1])
            self._vols[v.id] = v
            maxseq = max(maxseq, v.seq)
        for r in vols:
            if r["upstream"]:
                v, up = self._vols[r["id"]], self._vols[r["upstream"]]
                v.upstream, up.downstream = up, v
        for r in maps:
            m = Map(r["id"], r["seq"], r["name"], r["source"], r["target"], r["grain"])
            m.state = MappingState(r["state"])
            for k in ("copy_rate", "clean_rate", "group_id", "start_time", "error"):
                setattr(m, k, r[k])
            m.incremental, m.autodelete = bool(r["incremental"]), bool(r["autodelete"])
            m.restore, m.copied = bool(r["restore"]), bool(r["copied"])
            bm = bitmaps.get("d:" + m.id)
            if m.incremental and bm is not None:
                m.diff = Bitmap(bm[0], bm[1])
            # a prepare interrupted by the crash never started: back to where it can be prepared again
            if m.state in (MappingState.PREPARING, MappingState.PREPARED):
                m.state = MappingState.STOPPED if m.start_time else MappingState.IDLE_OR_COPIED
                self._dirty_map(m)
            self._maps[m.id] = m
            maxseq = max(maxseq, m.seq)
        for r in groups:
            g = Group(r["id"], r["seq"], r["name"])
            g.start_time = r["start_time"]
            self._groups[g.id] = g
            maxseq = max(maxseq, g.seq)
        self._seq = itertools.count(maxseq + 1)
        self._attach_trackers()
        return len(vols)

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """A change whose commit may fail (a full state dir) leaves memory as the disk has it: what came before
        is committed first (a failure there changes nothing), and a failure inside reloads the records from
        the store, so a retry fails the same way or succeeds for real, never answers OK for a change that
        comes back after a restart. Lock held."""
        self._commit()
        try:
            yield
        except BaseException:
            self._reload_records()
            raise

    def _reload_records(self) -> None:
        """Memory := the store (after `_commit` failed). Open files, held writes and in-memory findings
        (broken data files) carry over to the reloaded records of the same volume and file."""
        old = self._vols
        self._vols, self._maps, self._groups, self._feeds = {}, {}, {}, None
        self._ch, self._bits_dirty = Changes(), {}
        self._load_records()
        for v in self._vols.values():
            o = old.pop(v.id, None)
            if o is not None and o.file == v.file:
                v.fd, o.fd = o.fd, -1
                v.pending, o.pending = o.pending, {}
                if o.offline.startswith(datafiles.BROKEN) and not v.offline:
                    v.offline = o.offline
        for o in old.values():  # made by the failed change only: its intent lets the next open drop the file
            if o.fd >= 0 and o not in self._unlink_later:
                self._io.close(o.fd)
                o.fd = -1
        keep = {v.file for v in self._vols.values()}
        self._unlink_later = [v for v in self._unlink_later if v.file not in keep]
        by_id = self._vols
        self._host_dirty = {by_id[v.id] for v in self._host_dirty if v.id in by_id}
        self._copy_dirty = {by_id[v.id] for v in self._copy_dirty if v.id in by_id}

    def _commit_freeing(self) -> None:
        """Commit a change that frees space (a delete): on a full state dir the space kept for such changes
        (durability.FREE_RESERVE) is given up, so space can always be freed through the driver."""
        try:
            self._commit()
        except errors.NoSpace:
            if not self._release_free_reserve():
                raise
            self._commit()

    def _check_files(self) -> None:
        """The copier's tick, every FILE_CHECK_INTERVAL: a data file deleted or cut short under the running
        engine takes its volume offline (I/O fails, the condition says why; datafiles.py), never refilled."""
        now = time.monotonic()
        if now - self._files_checked < FILE_CHECK_INTERVAL:
            return
        self._files_checked = now
        with self._lock:
            for v in self._vols.values():
                if v.fd < 0 or v.offline:
                    continue
                st = os.fstat(v.fd)
                why = ""
                if st.st_nlink == 0:
                    why = f"{datafiles.BROKEN}{v.file} was deleted under the running engine"
                elif st.st_size < v.size:
                    why = (f"{datafiles.BROKEN}{v.file} was truncated under the running engine: "
                           f"{st.st_size} of {v.size} bytes")
                if why:
                    log.error("volume %s is unusable: %s", v.id, why)
                    v.offline = why  # in memory only (datafiles.py): the next open looks again

    def _commit_or_forget(self, new_vols: list[Vol]) -> None:
        try:
            self._commit()
        except BaseException:
            for v in new_vols:
                self._vols.pop(v.id, None)
                self._drop_file(v)
            raise

    def get_volume(self, volume_id: str) -> VolumeInfo:
        with self._lock:
            return self._vinfo(self._vol(volume_id))

    def find_volume(self, name: str) -> VolumeInfo | None:
        with self._lock:
            for v in self._vols.values():
                if v.name == name and not v.deleted:
                    return self._vinfo(v)
            return None

    def list_volumes(self) -> list[VolumeInfo]:
        with self._lock:
            vols = sorted((v for v in self._vols.values() if not v.deleted), key=lambda v: v.seq)
            return [self._vinfo(v) for v in vols]

    def inspect(self) -> tuple[list[VolumeInfo], list[MappingInfo], list[GroupInfo]]:
        """Everything at one instant, hidden nodes included (deleted=True, with the volumes they stay for)."""
        with self._lock:
            vols = sorted(self._vols.values(), key=lambda v: v.seq)
            maps = sorted(self._maps.values(), key=lambda m: m.seq)
            groups = sorted(self._groups.values(), key=lambda g: g.seq)
            return ([self._vinfo(v) for v in vols], [self._minfo(m) for m in maps],
                    [self._ginfo(g) for g in groups])

    def set_volume_attrs(self, volume_id: str, attrs: dict[str, str]) -> VolumeInfo:
        with self._lock:
            v = self._vol(volume_id)
            v.attrs = dict(attrs)
            self._dirty_vol(v)
            self._commit()
            return self._vinfo(v)

    @changes_io
    def resize_volume(self, volume_id: str, new_size: int) -> VolumeInfo:
        with self._lock:
            self._check_open()
            v = self._vol(volume_id)
            if not isinstance(new_size, int) or new_size <= 0:
                raise errors.InvalidArgument(f"size must be a positive integer, got {new_size!r}")
            if new_size > MAX_VOLUME_SIZE:
                raise errors.OutOfRange(f"size {new_size} is more than the largest volume ({MAX_VOLUME_SIZE} bytes)")
            new_size = -(-new_size // v.grain) * v.grain
            if new_size < v.size:
                raise errors.OutOfRange(f"volume {volume_id} is {v.size} bytes; shrinking is not supported")
            if new_size == v.size:
                return self._vinfo(v)
            self._flush_all()
            try:
                self._io.truncate(self._fd(v), new_size)
                self._io.fdatasync(self._fd(v))  # the size is durable before the commit names it (datafiles.py)
            except errors.OutOfRange as e:
                raise errors.OutOfRange(f"{new_size} bytes is more than the filesystem allows") from e
            v.size = new_size
            if v.bits is not None:
                v.bits.resize(v.ngrains, fill=True)  # I3: the new range is ours and reads as zeros
                self._mark_bit("v:" + v.id, v.bits, v)
            for m in self._maps.values():
                if m.diff is not None and volume_id in (m.source, m.target):
                    m.diff.resize(max(m.diff.n, v.ngrains), fill=True)
                    self._dirty_map(m)
            self._dirty_vol(v)
            self._commit()
            return self._vinfo(v)

    @changes_io
    def delete_volume(self, volume_id: str) -> None:
        """Delete at once for the caller; storage goes when nothing reads through the volume any more."""
        with self._lock:
            self._check_open()
            v = self._vol(volume_id)
            with self._all_or_nothing():
                self._delete_volume(v)
            self._ensure_reserve()  # space may have come back
            self._work.notify_all()

    def _delete_volume(self, v: Vol) -> None:
        """delete_volume's change, lock held, inside _all_or_nothing."""
        inc = self._incoming(v) if v.upstream is not None else None
        if inc is not None:
            v.clean_rate = inc.clean_rate
        elif v.downstream is not None:
            dm = self._incoming(v.downstream)
            v.clean_rate = dm.clean_rate if dm else 0
        for m in list(self._maps.values()):
            # mappings into v are pointless now; mappings out of v that still copy keep going
            if m.target == v.id or (m.source == v.id and m.state not in (MappingState.COPYING,
                                                                        MappingState.STOPPING)):
                self._forget_mapping(m)
        if v.upstream is not None and v.downstream is None:
            self._unlink(v)  # a target nobody reads through: just cut it off
        v.deleted = True
        v.name = f"{v.name}\0deleted\0{v.id}"  # frees the name for reuse
        self._dirty_vol(v)
        self._reap()
        self._commit_freeing()
