"""Cascades: views, copy-on-write, grain primitives and the chain surgery (insert, unlink, split, reap).

Every volume is a node in a linear chain ``head -> n1 -> n2 -> ...``; a node's `Vol.bits` says which grains it
owns (the head, and a node that was never a target, own every grain). Invariants kept here:

I1 (view)       the data a node shows for grain g is its own grain if it owns g, else its upstream's view of g
                (`_source_of`, `_range_source`, `_read_range`).
I2 (cow)        before a node's view of g changes, its downstream neighbour owns g: `_write_grain` copies the old
                view down first (`_push_down`), so every other node's view is unchanged by a write.
I3 (range)      a non-head node owns every grain at or past its upstream's end, so views never read past a file
                (`_insert_target` sets those bits; `Volumes.resize_volume` sets the bits of a grown range).

Chain links change only through `_insert_below`, `_unlink`, `_split` and `_stop_dependents`, each recording every
node it touched for the next commit (I6, durability.py).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable

from csi_driver.engine import errors
from csi_driver.engine.bitmap import Bitmap, set_grains
from csi_driver.engine.durability import Durability
from csi_driver.engine.model import MappingState
from csi_driver.engine.state import Map, Vol

log = logging.getLogger(__name__)


class Cascade(Durability):
    """Views and chain surgery (I1-I3). Every method expects the engine lock held."""

    # ------------------------------------------------------------------ views (I1)

    def _source_of(self, v: Vol, g: int) -> Vol:
        """The node whose own grain g is v's view (I1)."""
        while not v.owns(g):
            up = v.upstream
            assert up is not None
            v = up
        return v

    def _read_own(self, v: Vol, g: int) -> bytes:
        img = v.pending.get(g)
        if img is not None:
            return bytes(img)
        off = g * v.grain
        return self._io.pread(self._fd(v), min(v.grain, v.size - off), off)

    def _read_view(self, v: Vol, g: int) -> bytes:
        return self._read_own(self._source_of(v, g), g)

    def _range_source(self, v: Vol, first: int, last: int) -> Vol | None:
        """The node serving every grain in [first, last] for v, or None when several do."""
        n = last - first + 1
        mask = (1 << n) - 1
        x = v
        while x.upstream is not None and x.bits is not None:
            b0 = first >> 3
            word = int.from_bytes(x.bits.bits[b0:(last >> 3) + 1], "little") >> (first - (b0 << 3))
            owned = word & mask
            if owned == mask:
                return x
            if owned:
                return None
            x = x.upstream
        return x

    def _read_range(self, v: Vol, offset: int, length: int) -> bytes:
        """v's view of [offset, offset+length) (I1), read in runs of grains one node serves."""
        grain = v.grain
        end = offset + length
        first, last = offset // grain, (end - 1) // grain if length else offset // grain
        src = self._range_source(v, first, last)
        if src is not None and not src.pending:
            return self._io.pread(self._fd(src), length, offset)  # one node serves it all
        out = bytearray(length)
        view = memoryview(out)
        pos = offset
        while pos < end:
            g = pos // grain
            src = self._source_of(v, g)
            stop = min(end, (g + 1) * grain)
            img = src.pending.get(g)
            if img is None:
                # extend the run while the same node serves the next grains from its file
                while stop < end:
                    g2 = stop // grain
                    if g2 in src.pending or self._source_of(v, g2) is not src:
                        break
                    stop = min(end, (g2 + 1) * grain)
                view[pos - offset:stop - offset] = self._io.pread(self._fd(src), stop - pos, pos)
            else:
                goff = pos - g * grain
                view[pos - offset:stop - offset] = img[goff:goff + stop - pos]
            pos = stop
        return bytes(out)

    # ------------------------------------------------------------------ grain primitives, copy-on-write (I2)

    def _copy_grain(self, src: Vol, dst: Vol, g: int) -> None:
        """Copy src's own grain g into dst's file (in the kernel; a hole stays a hole), recorded for I4."""
        self._check_copy_space()
        off = g * src.grain
        n = min(src.grain, dst.size - off, src.size - off)
        img = src.pending.get(g)
        if img is not None:
            self._store_grain(dst, g, img)
            return
        sfd, dfd = self._fd(src), self._fd(dst)
        if self._io.is_hole(sfd, off, n):
            self._io.punch(dfd, off, n)
        else:
            self._io.copy(sfd, dfd, n, off, off)
        self._copy_dirty.add(dst)

    def _push_down(self, v: Vol, g: int, view: Callable[[], bytes]) -> None:
        """I2: give v's downstream neighbour its own copy of g before v's view of g changes."""
        d = v.downstream
        if d is None or d.owns(g):
            return
        assert d.bits is not None  # a downstream node is a target: it has a bitmap
        try:
            src = self._source_of(v, g)
            if g in src.pending:
                self._check_copy_space()
                self._store_grain(d, g, view())
            else:
                self._copy_grain(src, d, g)  # in the kernel; a hole stays a hole
        except errors.NoSpace as e:
            # the copy cannot be stored: the target (and whatever reads through it) stops; the write goes on
            self._stop_dependents(d, f"out of space copying grain {g} from {v.id}: {e}")
            return
        d.bits.set(g)
        self._bits_dirty["v:" + d.id] = (d.bits, d)
        if self.stats is not None:
            self.stats.cow_grains += 1
            self.stats.cow_bytes += min(d.grain, d.size - g * d.grain)

    def _can_write_in_place(self, v: Vol, g: int) -> bool:
        """I5: may v's own grain g be overwritten on disk right now?"""
        if g in v.pending or not v.owns(g):
            return False
        for m in v.trackers:
            if m.diff is not None and not m.diff.durable(g):
                return False
        d = v.downstream
        if d is not None and d.bits is not None and not d.owns(g):
            return False  # I2: d reads g through v (since before v took it, maybe): _push_down first
        if v.bits is not None and v.upstream is not None and g in v.bits.undurable:
            return True  # v took g this epoch and d owns it: a crash forgets both bits, both read upstream
        return d is None or d.bits is None or d.owns_durably(g)

    def _write_grain(self, v: Vol, g: int, goff: int, piece: bytes | memoryview) -> None:
        """Write `piece` at offset `goff` inside grain g of v, keeping every other view (I2, I5)."""
        grain = v.grain
        glen = min(grain, v.size - g * grain)
        cache: list[bytes] = []

        def view() -> bytes:
            if not cache:
                cache.append(self._read_view(v, g))
            return cache[0]

        self._push_down(v, g, view)
        for m in v.trackers:
            if m.diff is not None and m.diff.set(g):
                self._bits_dirty["d:" + m.id] = (m.diff, m)
        if v.owns(g):
            img = v.pending.get(g)
            if img is not None:
                img[goff:goff + len(piece)] = piece
            elif self._can_write_in_place(v, g):
                self._io.pwrite(self._fd(v), piece, g * grain + goff)
                self._host_dirty.add(v)
            else:
                pool = self._pool.get(grain)
                img = pool.pop() if pool and glen == grain else bytearray(glen)
                if goff == 0 and len(piece) == glen:
                    img[:] = piece
                else:
                    img[:] = view()
                    img[goff:goff + len(piece)] = piece
                v.pending[g] = img
                self._bypass_unread(v, g)  # B1: the file no longer holds v's current g
                self._pending_bytes += len(img)
        else:
            # a target that does not own g: fill the grain from upstream, write it whole, then own it
            if goff == 0 and len(piece) == glen:
                img = bytearray(piece)
            else:
                img = bytearray(view())
                img[goff:goff + len(piece)] = piece
            self._store_grain(v, g, img)
            assert v.bits is not None
            v.bits.set(g)
            self._bits_dirty["v:" + v.id] = (v.bits, v)

    def _owned_between(self, b: Vol, t: Vol) -> int | None:
        """The grains (an int mask over max(b, t) grains) some node owns on the cascade path from b and from t up
        to their nearest common node, that node excluded; None when b and t share no node (different cascades,
        or one was split or detached from its chain).

        Invariant (from I1 and I2): a grain outside the mask is served to b and to t by the same node, the
        common one or one above it, so its views in b and t are the same bytes. Every grain whose views differ
        is in the mask. Costs bitmap operations on ints of the volume's grain count, never a data read.
        """
        chain_b, chain_t = _chain_up(b), _chain_up(t)
        on_b = set(map(id, chain_b))
        common = next((x for x in chain_t if id(x) in on_b), None)
        if common is None:
            return None
        owned = 0
        for chain in (chain_b, chain_t):
            for x in chain:
                if x is common:
                    break
                owned |= x.bits.as_int() if x.bits is not None else (1 << x.ngrains) - 1
                if x.bits is not None and x.bits.n < x.ngrains:  # owns() counts grains past its bitmap as owned
                    owned |= ((1 << x.ngrains) - 1) ^ ((1 << x.bits.n) - 1)
        return owned

    def _differing(self, b: Vol, t: Vol) -> list[int]:
        """Grains whose views differ between b and t."""
        n = max(b.ngrains, t.ngrains)
        owned = self._owned_between(b, t)
        if owned is not None:
            candidates = set_grains(owned.to_bytes((n + 7) >> 3, "little"), n)
        else:
            candidates = list(range(n))
        out = []
        for g in candidates:
            a = self._read_view(b, g) if g < b.ngrains else b""
            c = self._read_view(t, g) if g < t.ngrains else b""
            if a != c:
                out.append(g)
        return out

    def _allocated_mask(self, v: Vol) -> int:
        """The grains of v's view (an int mask over v's grains) whose serving node (I1) holds data for them: data
        in its file (SEEK_DATA extents, so a hole copied on write stays unreported) or a held grain (I5).

        Invariant: a byte written to v (or to the node v read it through, before v's point in time) and not
        discarded since lies in a reported grain; a grain that was never written anywhere along the path reads
        from a hole and is not reported. Walks v's chain upward once, resolving each grain at the first node
        that owns it; cost follows the data extents of the nodes walked, not the volume size.
        """
        n = v.ngrains
        grain = v.grain
        unresolved = (1 << n) - 1
        out = 0
        x: Vol | None = v
        while x is not None and unresolved:
            if x.upstream is None or x.bits is None:
                here = unresolved
            else:
                here = unresolved & x.bits.as_int()
                if x.bits.n < n:
                    here |= unresolved & ~((1 << x.bits.n) - 1)
            if here:
                data = 0
                for off, length in self._io.data_extents(self._fd(x), 0, min(n, x.ngrains) * grain):
                    g0, g1 = off // grain, (off + length - 1) // grain
                    data |= ((1 << (g1 - g0 + 1)) - 1) << g0
                for g in x.pending:
                    data |= 1 << g
                out |= here & data
                unresolved &= ~here
            x = x.upstream
        return out & ((1 << n) - 1)

    # ------------------------------------------------------------------ chain surgery

    def _insert_below(self, src: Vol, t: Vol) -> None:
        down = src.downstream
        t.upstream, t.downstream = src, down
        src.downstream = t
        if down is not None:
            down.upstream = t
            self._dirty_vol(down)
        self._dirty_vol(src)
        self._dirty_vol(t)

    def _hide_under_keeper(self, t: Vol) -> Vol:
        """t's data is still read by others: a hidden node takes over t's file, bits and place in its cascade,
        and t starts over, unlinked, with an empty file (a restore, a refresh of a volume others read through)."""
        keeper = Vol(self._new_id("vol"), next(self._seq), f"\0kept\0{t.id}", t.size, t.grain, {},
                     time.time(), t.file)
        keeper.deleted, keeper.fd, keeper.bits = True, t.fd, t.bits
        keeper.pending, t.pending = t.pending, {}
        keeper.upstream, keeper.downstream = t.upstream, t.downstream
        if t.downstream is not None:
            t.downstream.upstream = keeper
            self._dirty_vol(t.downstream)
        if t.upstream is not None:
            t.upstream.downstream = keeper
        dm = self._incoming(t.downstream) if t.downstream is not None else None
        keeper.clean_rate = dm.clean_rate if dm else 0
        self._vols[keeper.id] = keeper
        # mappings out of t that still copy address t by id; their targets now read through keeper
        t.upstream = t.downstream = None
        t.bits = None  # the caller's start gives t its new bits
        t.fd = -1
        self._create_file(t, f"{t.id}.{secrets.token_hex(4)}.img")
        self._dirty_vol(keeper)
        if keeper.bits is not None:
            self._mark_bit("v:" + keeper.id, keeper.bits, keeper)
        return keeper

    def _insert_target(self, m: Map, now: float) -> list[Vol]:
        """Start m's cascade change: its target goes directly below its source with the bits it keeps (I3).

        Returns the targets whose old data must be dropped once the start's commit is durable.
        """
        s, t = self._vols[m.source], self._vols[m.target]
        fresh: list[Vol] = []
        m.restore = False
        if t.downstream is not None:
            # t's current data is still read by others (t may even be upstream of s: a restore)
            self._hide_under_keeper(t)
            m.restore = True
            bits = Bitmap(t.ngrains)
        elif m.incremental and m.copied and m.diff is not None:
            # incremental restart: keep every grain changed on neither side since the last start
            mask = (1 << t.ngrains) - 1
            owned = t.bits.as_int() if t.bits is not None else mask
            keep = owned & ~m.diff.as_int() & mask
            bits = Bitmap(t.ngrains, keep.to_bytes((t.ngrains + 7) >> 3, "little"))
        else:
            bits = Bitmap(t.ngrains)
            fresh.append(t)
        # I3: the range past the source's end belongs to the target and reads as zeros. It is zeroed now, before
        # the commit that makes it owned (FlashCopy's prepare may change a target that is never started too).
        if t.ngrains > s.ngrains:
            for g in range(s.ngrains, t.ngrains):
                bits.bits[g >> 3] |= 1 << (g & 7)
            self._io.punch(self._fd(t), s.size, t.size - s.size)
            self._copy_dirty.add(t)
        bits.undurable.clear()
        t.bits = bits
        t.offline = ""
        t.pending.clear()
        self._insert_below(s, t)
        self._mark_bit("v:" + t.id, t.bits, t)
        m.state = MappingState.COPYING
        m.start_time = now
        m.error = ""
        if m.diff is not None:
            m.diff = Bitmap(max(s.ngrains, t.ngrains))
            self._dirty_map(m)
            self._attach_trackers()
        self._dirty_map(m)
        return fresh

    def _join(self, up: Vol | None, down: Vol | None) -> None:
        """Make up and down neighbours (whatever lay between them leaves the chain)."""
        if down is not None:
            down.upstream = up
            self._dirty_vol(down)
        if up is not None:
            up.downstream = down
            self._dirty_vol(up)

    def _unlink(self, v: Vol) -> None:
        """Take v out of its cascade; its downstream neighbour reads v's upstream from now on."""
        self._join(v.upstream, v.downstream)
        v.upstream = v.downstream = None
        self._dirty_vol(v)

    def _split(self, v: Vol) -> None:
        """v owns every grain durably: cut it from upstream; its downstream keeps reading through it."""
        up = v.upstream
        if up is not None:
            self._bypass_stale = True  # both sides may gain grants at the next commit
            up.downstream = None
            v.upstream = None
            self._dirty_vol(up)
            self._dirty_vol(v)

    def _depends(self, below: Vol, owned: int) -> bool:
        """Does `below` read any grain in `owned` (an int bitset) through its upstream?"""
        if below.bits is None:
            return False
        mine = below.bits.as_int()
        limit = (1 << below.ngrains) - 1
        return bool(owned & ~mine & limit)

    def _stop_dependents(self, d: Vol, reason: str) -> None:
        """Forced stop of target d and of every node below it that needs d's grains (out-of-space policy)."""
        self._bypass_quiet()  # B3: links and online states change below
        victims = [d]
        owned = d.bits.as_int() if d.bits is not None else (1 << d.ngrains) - 1
        e = d.downstream
        while e is not None and self._depends(e, owned):
            victims.append(e)
            owned |= e.bits.as_int() if e.bits is not None else 0
            e = e.downstream
        self._join(victims[0].upstream, victims[-1].downstream)
        for x in victims:
            x.upstream = x.downstream = None
            x.offline = reason if x is d else f"stopped with {d.id}: {reason}"
            x.pending.clear()
            self._dirty_vol(x)
            m = self._incoming(x)
            if m is not None and m.state in (MappingState.COPYING, MappingState.STOPPING):
                m.state = MappingState.STOPPED
                m.error = x.offline
                self._dirty_map(m)
        log.warning("mapping stopped: %s", reason)
        self._reap()

    def _forget_mapping(self, m: Map) -> None:
        self._maps.pop(m.id, None)
        self._feeds = None
        self._ch.del_mappings.add(m.id)
        self._ch.del_bitmaps.add("d:" + m.id)
        self._bits_dirty.pop("d:" + m.id, None)
        if m.diff is not None:
            self._attach_trackers()

    def _reap(self) -> None:
        """Free deleted volumes nothing reads through: a tail is unlinked at once (no one depends on it)."""
        changed = True
        while changed:
            changed = False
            for v in list(self._vols.values()):
                if not v.deleted or v.downstream is not None:
                    continue
                for m in list(self._maps.values()):
                    if v.id in (m.source, m.target) and m.state not in (MappingState.COPYING,
                                                                       MappingState.STOPPING):
                        self._forget_mapping(m)
                up = v.upstream
                if up is not None:
                    up.downstream = None
                    v.upstream = None
                self._vols.pop(v.id)
                self._ch.del_volumes.add(v.id)
                self._ch.volumes.pop(v.id, None)
                self._ch.del_bitmaps.add("v:" + v.id)
                self._bits_dirty.pop("v:" + v.id, None)
                self._copy_dirty.discard(v)
                self._host_dirty.discard(v)
                v.pending.clear()
                # the file goes after the metadata no longer names it; an orphan left by a crash goes at open
                self._unlink_later.append(v)
                self._bypass_stale = True
                changed = True


def _chain_up(v: Vol) -> list[Vol]:
    out = []
    x: Vol | None = v
    while x is not None:
        out.append(x)
        x = x.upstream
    return out
