"""Changed-block tracking (`Engine.allocated_extents`, `Engine.delta_extents`) against a simple bytes model.

Properties, for random writes, discards, snapshots, snapshot deletes (hidden nodes, cleaning) and reopens on one
volume, checked for every pair of live points in time (each snapshot and the volume itself):

- delta covers every byte that differs between base and target;
- every grain delta reports differs, or was written or discarded on the volume between the two instants (no grain
  that is the same by construction);
- allocated covers every byte that reads non-zero (a grain written with zeros only may be a hole); every grain it
  reports was written or discarded before the volume's point in time (nothing never written).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi_driver.engine import Engine, errors

G = 64 * 1024
NG = 12
SIZE = NG * G
HEAVY = os.environ.get("CSI_FLASHCOPY_HEAVY") == "1"


@dataclass
class Point:
    vid: str
    data: bytearray                     # the bytes the point in time shows
    epoch: int                          # index of the operation at which it was taken
    touched_before: set[int] = field(default_factory=set)   # grains written or discarded before it


def _grains(extents: list[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for off, length in extents:
        assert off % G == 0
        out.update(range(off // G, (off + length + G - 1) // G))
    return out


def _covers(extents: list[tuple[int, int]], byte_mask: bytes | bytearray) -> None:
    covered = bytearray(len(byte_mask))
    for off, length in extents:
        covered[off:off + length] = b"\x01" * length
    missing = [i for i, (a, c) in enumerate(zip(byte_mask, covered, strict=True)) if a and not c]
    assert not missing, f"bytes not covered, first {missing[0]}"


def _well_formed(extents: list[tuple[int, int]], size: int) -> None:
    end = -1
    for off, length in extents:
        assert length > 0 and off > end and off + length <= size  # ascending, merged, inside the volume
        end = off + length


ops = st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, SIZE - 1), st.integers(1, 3 * G), st.integers(0, 255)),
    st.tuples(st.just("d"), st.integers(0, SIZE - 1), st.integers(1, 3 * G)),
    st.tuples(st.just("s")),
    st.tuples(st.just("del"), st.integers(0, 10)),
    st.tuples(st.just("reopen")),
), max_size=25)


@settings(max_examples=300 if HEAVY else 40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_delta_and_allocated_against_model(seq: list[tuple]) -> None:
    d = tempfile.mkdtemp(prefix="cbt-")
    eng = Engine.open(d, background=False)
    try:
        vid = eng.create_volume("v", SIZE, grain_size=G).id
        live = Point(vid, bytearray(SIZE), 0)
        snaps: list[Point] = []
        touched: list[tuple[int, set[int]]] = []   # (epoch, grains) of every write and discard
        for i, op in enumerate(seq, start=1):
            if op[0] in ("w", "d"):
                off = op[1]
                n = min(op[2], SIZE - off)
                if op[0] == "w":
                    eng.write(vid, off, bytes([op[3]]) * n)
                    live.data[off:off + n] = bytes([op[3]]) * n
                else:
                    eng.discard(vid, off, n)
                    live.data[off:off + n] = bytes(n)
                gs = set(range(off // G, (off + n - 1) // G + 1))
                touched.append((i, gs))
                live.touched_before |= gs
            elif op[0] == "s":
                s, _ = eng.snapshot(vid, f"s{i}")
                snaps.append(Point(s.id, bytearray(live.data), i,
                                   set(live.touched_before)))
            elif op[0] == "del" and snaps:
                eng.delete_volume(snaps.pop(op[1] % len(snaps)).vid)
            elif op[0] == "reopen":
                eng.close()
                eng = Engine.open(d, background=False)
        live.epoch = len(seq) + 1
        points = [*snaps, live]
        for p in points:
            assert eng.read(p.vid, 0, SIZE) == p.data
            alloc = eng.allocated_extents(p.vid)
            _well_formed(alloc, SIZE)
            _covers(alloc, bytes(b != 0 for b in p.data))  # zeros-only grains may be holes
            assert _grains(alloc) <= p.touched_before, "allocated reports a grain never written"
        for a, base in enumerate(points):
            for target in points[a + 1:]:
                delta = eng.delta_extents(base.vid, target.vid)
                _well_formed(delta, SIZE)
                _covers(delta, bytes(x != y for x, y in zip(base.data, target.data, strict=True)))
                between: set[int] = set()
                for epoch, gs in touched:
                    if base.epoch < epoch < target.epoch:
                        between |= gs
                differ = {g for g in range(NG) if base.data[g * G:(g + 1) * G] != target.data[g * G:(g + 1) * G]}
                assert _grains(delta) <= differ | between, "delta reports a grain the same by construction"
                with pytest.raises(errors.InvalidState):
                    eng.delta_extents(target.vid, base.vid)
    finally:
        eng.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def eng(tmp_path: Path) -> Iterator[Engine]:
    e = Engine.open(str(tmp_path), background=False)
    yield e
    e.close()


def test_errors(eng: Engine) -> None:
    v = eng.create_volume("v", 8 * G, grain_size=G).id
    eng.write(v, 0, b"x" * G)
    s1, m1 = eng.snapshot(v, "s1")
    other = eng.create_volume("o", 8 * G, grain_size=G).id
    s_other, _ = eng.snapshot(other, "so")
    with pytest.raises(errors.NotFound):
        eng.delta_extents("vol-nope", s1.id)
    with pytest.raises(errors.NotFound):
        eng.allocated_extents("vol-nope")
    with pytest.raises(errors.InvalidState, match="not older"):
        eng.delta_extents(s1.id, s1.id)
    with pytest.raises(errors.InvalidState, match="share no cascade"):
        eng.delta_extents(s1.id, s_other.id)
    # a clone that became independent (split after its background copy) shares no node with its source
    c, _ = eng.clone(s1.id, "c", copy_rate=150)
    eng.wait_copies()
    s_c, _ = eng.snapshot(c.id, "sc")
    with pytest.raises(errors.InvalidState, match="tracking not possible"):
        eng.delta_extents(s1.id, s_c.id)
    # a snapshot whose mapping was stopped is offline
    s2, m2 = eng.snapshot(v, "s2")
    eng.write(v, 0, b"y" * G)
    eng.stop_mapping(m2.id, force=True)
    with pytest.raises(errors.InvalidState, match="tracking not possible"):
        eng.delta_extents(s1.id, s2.id)
    with pytest.raises(errors.InvalidState, match="tracking not possible"):
        eng.allocated_extents(s2.id)


def test_sparse_cost_follows_changes(eng: Engine) -> None:
    """64 GiB thin volume, 1 MiB changed between two snapshots: exact extents, no data read."""
    v = eng.create_volume("big", 64 << 30).id
    eng.write(v, 5 << 30, b"a" * (1 << 20))
    s1, _ = eng.snapshot(v, "s1")
    eng.write(v, 40 << 30, b"b" * (1 << 20))
    s2, _ = eng.snapshot(v, "s2")
    assert eng.allocated_extents(s1.id) == [(5 << 30, 1 << 20)]
    assert eng.allocated_extents(s2.id) == [(5 << 30, 1 << 20), (40 << 30, 1 << 20)]
    assert eng.delta_extents(s1.id, s2.id) == [(40 << 30, 1 << 20)]
    assert eng.delta_extents(s1.id, v) == [(40 << 30, 1 << 20)]


def test_paging(eng: Engine) -> None:
    v = eng.create_volume("v", 64 * G, grain_size=G).id
    s0, _ = eng.snapshot(v, "s0")
    for g in range(0, 64, 3):
        eng.write(v, g * G, b"x" * (2 * G if g % 2 and g < 63 else 1))
    s1, _ = eng.snapshot(v, "s1")
    for get in (lambda **kw: eng.allocated_extents(s1.id, **kw), lambda **kw: eng.delta_extents(s0.id, s1.id, **kw)):
        whole = get()
        assert len(whole) > 5
        pages, start = [], 0
        while True:
            page = get(start=start, limit=4)
            assert len(page) <= 4
            if not page:
                break
            pages += page
            start = page[-1][0] + page[-1][1]
            if start >= 64 * G:
                break
        assert pages == whole
        off, length = whole[2]
        assert get(start=off + 7)[0] == (off, length)          # the extent holding start, from its grain
        assert get(start=off + G, limit=1) == ([(off + G, length - G)] if length > G else [whole[3]])
    with pytest.raises(errors.OutOfRange):
        eng.allocated_extents(s1.id, start=64 * G)
    with pytest.raises(errors.OutOfRange):
        eng.delta_extents(s0.id, s1.id, start=-1)


def _differing_grains(eng: Engine, a: str, b: str, n: int) -> set[int]:
    return {g for g in range(n) if eng.read(a, g * G, G) != eng.read(b, g * G, G)}


def test_delta_across_a_restore_and_a_cascaded_clone(eng: Engine) -> None:
    """Chains other than one volume's snapshots: a restore in place between the two snapshots (the volume
    starts over below the snapshot it was restored from, a hidden node keeps its old data), and snapshots of a
    clone of a snapshot (cascaded). Delta still covers every differing grain and only grains written since."""
    v = eng.create_volume("v", 8 * G, grain_size=G).id
    eng.write(v, 0, b"a" * 8 * G)
    s1, _ = eng.snapshot(v, "s1")
    eng.write(v, 2 * G, b"b" * G)
    s2, _ = eng.snapshot(v, "s2")
    eng.restore(s1.id, v, copy_rate=0)           # v shows s1 again
    eng.write(v, 5 * G, b"c" * G)
    s3, _ = eng.snapshot(v, "s3")
    for base, target, written in ((s1.id, s3.id, {2, 5}), (s2.id, s3.id, {2, 5}), (s1.id, s2.id, {2})):
        got = _grains(eng.delta_extents(base, target))
        assert _differing_grains(eng, base, target, 8) <= got <= written | _differing_grains(eng, base, target, 8)
        assert got <= written
    c, _ = eng.clone(s1.id, "c", copy_rate=0)     # a clone of a snapshot, then snapshots of the clone
    t1, _ = eng.snapshot(c.id, "t1")
    eng.write(c.id, 7 * G, b"d" * 10)
    t2, _ = eng.snapshot(c.id, "t2")
    assert _grains(eng.delta_extents(t1.id, t2.id)) == {7}
    with pytest.raises(errors.InvalidState, match="not older"):   # a clone's point in time is its start
        eng.delta_extents(t1.id, c.id)
    assert _differing_grains(eng, s1.id, t2.id, 8) <= _grains(eng.delta_extents(s1.id, t2.id))
