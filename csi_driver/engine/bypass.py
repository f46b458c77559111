"""Bypass grants: host I/O that reaches a volume's data file without the engine, where the engine allows it.

The node data path serves most host requests of a staged volume without a Python call: a compiled FUSE loop
reads and writes the volume's own data file directly, outside the engine lock, for the grains the engine has
granted, and hands every other request to the engine. The engine decides, per volume and grain:

B1 (read grant)   grain g may be read from v's own file: v owns g (I1) and holds no newer image of it (I5).
B2 (write grant)  grain g may be overwritten in place with no engine work: exactly `_can_write_in_place(v, g)`
                  (no copy-on-write due, I2/I5), v owns g by a committed bit (a bypassed write needs no record
                  in the held-write journal, J1), every incremental mapping of v already records g durably,
                  v is online and its writes are not held by a group start (I7).
B3 (revocation)   a grant is withdrawn before anything that could make it untrue, and `Bypass.revoke` returns
                  only once no bypassing I/O of the volume is in flight; grants are only widened under the
                  engine lock. So every bypassed request is one the engine's own path would have served the
                  same way, at the same instant.
B4 (durability)   bypassed writes are reported back (`Bypass.take_dirty`) and the next flush syncs the file,
                  as for the engine's own writes.

What narrows a grant, and where it is withdrawn: structural changes made by public operations (mapping starts,
stops, deletes, restores, refreshes, resizes, group starts that hold writes) revoke every grant first
(`changes_io`); background ones (a copy finishing, a hidden node reaped, an out-of-space stop) revoke in
`_bypass_quiet`; a held image of a grain (I5) clears its read grant at once (`_bypass_unread`). Everything else
only widens grants: they are recomputed after each commit (new durable bits) and after each structural change.

Grant masks are conservative: a clear bit only means the request goes through the engine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

from csi_driver.engine.bitmap import Bitmap
from csi_driver.engine.state import EngineState, Vol


class Bypass(Protocol):
    """The party that serves granted I/O directly (the data path's FUSE loop; a simulator in tests)."""

    def grant(self, volume_id: str, fd: int, size: int, grain: int, read: bytes, write: bytes) -> None:
        """Serve reads of the grains set in `read` and writes of those set in `write` (bit g = byte g >> 3,
        bit g & 7) from `fd` (v's data file, offset = volume offset). Replaces any earlier grant of the volume."""

    def revoke(self, volume_id: str) -> None:
        """Stop bypassing the volume; return only once no bypassed request of it is in flight (B3)."""

    def unread(self, volume_id: str, grain: int) -> None:
        """Clear the read grant of one grain (the engine holds a newer image of it)."""

    def take_dirty(self, volume_id: str) -> bool:
        """True if bypassed writes reached the volume's file since the last call (B4)."""


_F = TypeVar("_F", bound=Callable[..., Any])


def changes_io(fn: _F) -> _F:
    """Decorate a public engine operation that may narrow grants (B3): every grant is withdrawn first and
    recomputed when the last such operation in flight ends."""

    @functools.wraps(fn)
    def call(self: BypassGrants, *args: Any, **kwargs: Any) -> Any:
        if self._bypass is None:
            return fn(self, *args, **kwargs)
        self._bypass_pause()
        try:
            return fn(self, *args, **kwargs)
        finally:
            self._bypass_resume()

    return cast(_F, call)


def _mask(bm: Bitmap | None, n: int, *, durable: bool) -> int:
    """Grains of an n-grain volume that bm owns (set, and durably so if asked); past bm's end: owned."""
    full = (1 << n) - 1
    if bm is None:
        return full
    m = bm.as_int()
    if durable:
        for g in bm.undurable:
            m &= ~(1 << g)
    if bm.n < n:
        m |= full & ~((1 << bm.n) - 1)
    return m & full


class BypassGrants(EngineState):
    """The engine's side of bypass grants (module doc: B1-B4)."""

    _bypass: Bypass | None
    _bypass_vols: set[str]
    #: volume id -> the grant last given (fd, size, grain, read mask, write mask)
    _grants: dict[str, tuple[int, int, int, int, int]]
    _bypass_depth: int
    _bypass_stale: bool

    def _init_bypass(self) -> None:
        self._bypass = None
        self._bypass_vols = set()
        self._grants = {}
        self._bypass_depth = 0
        self._bypass_stale = False

    def attach_bypass(self, bypass: Bypass | None) -> None:
        """Let `bypass` serve granted I/O of the volumes named by `bypass_volume` (None: detach, revoking all)."""
        with self._lock:
            self._bypass_quiet()
            self._bypass = bypass
            self._bypass_regrant()

    def bypass_volume(self, volume_id: str, on: bool) -> None:
        """Offer grants for one volume (its data path export exists) or stop (revoked before returning)."""
        with self._lock:
            if on:
                self._vol(volume_id)
                self._bypass_vols.add(volume_id)
                self._bypass_regrant()
            else:
                self._bypass_vols.discard(volume_id)
                self._bypass_revoke(volume_id)

    def granted(self, volume_id: str) -> tuple[int, int] | None:
        """(read, write) grant masks of a volume, or None: for tests and `inspect`."""
        with self._lock:
            g = self._grants.get(volume_id)
            return None if g is None else (g[3], g[4])

    # ------------------------------------------------------------------ internal

    def _bypass_revoke(self, vid: str) -> None:
        if self._grants.pop(vid, None) is not None and self._bypass is not None:
            self._bypass.revoke(vid)
            # B4: from here on the engine alone answers for the file, its unsynced bypassed writes included
            # (a start's prepare syncs dirty sources: those writes are in the point-in-time copy)
            self._bypass_collect_dirty([vid])

    def _bypass_quiet(self) -> None:
        """Withdraw every grant now (before a change that may narrow one); they come back after the next commit."""
        if self._grants:
            for vid in list(self._grants):
                self._bypass_revoke(vid)
        self._bypass_stale = True

    def _bypass_unread(self, v: Vol, g: int) -> None:
        gr = self._grants.get(v.id)
        if gr is not None and gr[3] >> g & 1:
            self._grants[v.id] = (gr[0], gr[1], gr[2], gr[3] & ~(1 << g), gr[4] & ~(1 << g))
            assert self._bypass is not None
            self._bypass.unread(v.id, g)

    def _bypass_pause(self) -> None:
        with self._lock:
            self._bypass_depth += 1
            self._bypass_quiet()

    def _bypass_resume(self) -> None:
        with self._lock:
            self._bypass_depth -= 1
            self._bypass_regrant()

    def _bypass_collect_dirty(self, vids: list[str] | None = None) -> None:
        """B4: volumes the bypass wrote since the last flush are synced like the engine's own writes."""
        if self._bypass is None:
            return
        for vid in list(self._bypass_vols) if vids is None else vids:
            if self._bypass.take_dirty(vid):
                x = self._vols.get(vid)
                if x is not None:
                    self._host_dirty.add(x)

    def _bypass_regrant(self) -> None:
        """Recompute every offered volume's grant (under the lock; only while no narrowing change runs)."""
        if self._bypass is None or self._bypass_depth or self._closed:
            return
        self._bypass_stale = False
        for vid in list(self._bypass_vols):
            v = self._vols.get(vid)
            if v is None or v.deleted:
                self._bypass_vols.discard(vid)
                self._bypass_revoke(vid)
                continue
            read, write = self._grant_masks(v)
            fd = self._fd(v)
            new = (fd, v.size, v.grain, read, write)
            old = self._grants.get(vid)
            if old == new:
                continue
            if old is not None:
                self._bypass_revoke(vid)
            if not read and not write:
                continue
            n = (v.size + v.grain - 1) // v.grain
            nbytes = (n + 7) >> 3
            self._bypass.grant(vid, fd, v.size, v.grain, read.to_bytes(nbytes, "little"),
                               write.to_bytes(nbytes, "little"))
            self._grants[vid] = new

    def _grant_masks(self, v: Vol) -> tuple[int, int]:
        """B1 and B2 for every grain of v, as bit masks (a conservative form of `_can_write_in_place`)."""
        if v.offline:
            return 0, 0
        n = (v.size + v.grain - 1) // v.grain
        full = (1 << n) - 1
        own = full if v.upstream is None else _mask(v.bits, n, durable=False)
        for g in v.pending:
            own &= ~(1 << g)
        read = own
        if v.id in self._held:
            return read, 0
        # J1: a bypassed write leaves no journal record, so it may only land where v owns g by a committed bit
        write = own if v.upstream is None else own & _mask(v.bits, n, durable=True)
        for m in v.trackers:
            if m.diff is not None:
                write &= _mask(m.diff, n, durable=True) if m.diff.n >= n else _partial(m.diff, n)
        d = v.downstream
        if d is not None and d.bits is not None:
            write &= _mask(d.bits, n, durable=True)
        return read, write


def _partial(bm: Bitmap, n: int) -> int:
    """Durable bits of a difference bitmap shorter than the volume: grains past its end are not recorded."""
    return _mask(bm, bm.n, durable=True)
