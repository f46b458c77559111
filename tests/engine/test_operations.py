"""Engine operations behind the operator surface: refresh of incremental clones, inspect, rate changes."""

from __future__ import annotations

import random

import pytest

from csi_driver.engine import Engine, MappingState, errors
from tests.waiting import wait_for

KiB = 1024
G = 64 * KiB
N = 64  # grains per volume


@pytest.fixture
def eng(tmp_path):
    e = Engine.open(str(tmp_path), background=False)
    yield e
    e.close()


def _fill(eng: Engine, vid: str, grains: list[int], tag: int) -> None:
    for g in grains:
        eng.write(vid, g * G, bytes([tag, g & 0xFF]) * (G // 2))


def _image(eng: Engine, vid: str) -> bytes:
    return eng.read(vid, 0, N * G)


def test_refresh_of_an_incremental_clone_copies_only_grains_changed_on_either_side(eng) -> None:
    rng = random.Random(7)
    prod = eng.create_volume("prod", N * G, grain_size=G)
    _fill(eng, prod.id, list(range(N)), 1)
    snap1, _ = eng.snapshot(prod.id, "snap1")
    clone, m = eng.clone(snap1.id, "clone", copy_rate=0, incremental=True)
    eng.modify_copies(clone.id, copy_rate=150)
    eng.run_copies()
    assert eng.get_mapping(m.id).state == MappingState.IDLE_OR_COPIED  # kept once copied: it is incremental
    on_prod = rng.sample(range(N), 9)
    on_clone = rng.sample(range(N), 5)
    _fill(eng, prod.id, on_prod, 2)
    _fill(eng, clone.id, on_clone, 3)
    snap2, _ = eng.snapshot(prod.id, "snap2")
    _fill(eng, prod.id, list(range(N)), 4)  # after the new point in time: must not show in the clone
    expected = _image(eng, snap2.id)

    info, dropped = eng.refresh(clone.id, snap2.id, copy_rate=0)
    assert dropped == len(set(on_prod) | set(on_clone))
    assert info.source_id == snap2.id and info.state == MappingState.COPYING
    assert info.bytes_to_copy == dropped * G
    assert _image(eng, clone.id) == expected  # at once, before any copy
    eng.modify_copies(clone.id, copy_rate=150)
    eng.run_copies()
    assert _image(eng, clone.id) == expected
    # snap1 is no longer needed by the clone: deleting it changes nothing the clone shows
    eng.delete_volume(snap1.id)
    assert _image(eng, clone.id) == expected

    # a second refresh with nothing changed copies nothing
    snap3, _ = eng.snapshot(snap2.id, "snap3")
    _, again = eng.refresh(clone.id, snap3.id)
    assert again == 0
    assert _image(eng, clone.id) == expected


def test_refresh_while_still_copying_keeps_what_was_copied(eng) -> None:
    prod = eng.create_volume("prod", N * G, grain_size=G)
    _fill(eng, prod.id, list(range(N)), 1)
    snap1, _ = eng.snapshot(prod.id, "snap1")
    clone, _ = eng.clone(snap1.id, "clone", copy_rate=0, incremental=True)
    _fill(eng, clone.id, [0, 1], 3)  # the clone owns these two (its own writes)
    _fill(eng, prod.id, [5], 2)
    snap2, _ = eng.snapshot(prod.id, "snap2")
    _, dropped = eng.refresh(clone.id, snap2.id)
    assert dropped == N  # it owned only grains it wrote itself: everything comes from snap2 again
    assert _image(eng, clone.id) == _image(eng, snap2.id)


def test_refresh_without_an_incremental_mapping_copies_everything(eng) -> None:
    prod = eng.create_volume("prod", N * G, grain_size=G)
    _fill(eng, prod.id, list(range(N)), 1)
    other = eng.create_volume("other", N * G, grain_size=G)
    _fill(eng, other.id, [3], 9)
    info, dropped = eng.refresh(other.id, prod.id)
    assert dropped == N and info.incremental
    assert _image(eng, other.id) == _image(eng, prod.id)
    small = eng.create_volume("small", G, grain_size=G)
    with pytest.raises(errors.OutOfRange):
        eng.refresh(small.id, prod.id)
    with pytest.raises(errors.InvalidArgument):
        eng.refresh(prod.id, prod.id)
    with pytest.raises(errors.NotFound):
        eng.refresh("nope", prod.id)


def test_refresh_survives_reopen(tmp_path) -> None:
    eng = Engine.open(str(tmp_path), background=False)
    prod = eng.create_volume("prod", N * G, grain_size=G)
    _fill(eng, prod.id, list(range(N)), 1)
    snap1, _ = eng.snapshot(prod.id, "snap1")
    clone, _ = eng.clone(snap1.id, "clone", copy_rate=150, incremental=True)
    eng.run_copies()
    _fill(eng, prod.id, [2, 4], 2)
    snap2, _ = eng.snapshot(prod.id, "snap2")
    eng.refresh(clone.id, snap2.id, copy_rate=0)
    expected = _image(eng, snap2.id)
    eng.close()
    eng = Engine.open(str(tmp_path), background=False)
    try:
        assert _image(eng, clone.id) == expected
        eng.modify_copies(clone.id, copy_rate=150)
        eng.run_copies()
        eng.delete_volume(snap1.id)  # what `refresh` does once no clone is made from it
        _fill(eng, clone.id, [7], 5)  # tracked again after reopen
        _fill(eng, prod.id, [9], 6)
        snap3, _ = eng.snapshot(prod.id, "snap3")
        _, dropped = eng.refresh(clone.id, snap3.id)
        assert dropped == 2
        assert _image(eng, clone.id) == _image(eng, snap3.id)
    finally:
        eng.close()


def test_refresh_of_a_clone_others_read_through_keeps_their_data(eng) -> None:
    prod = eng.create_volume("prod", N * G, grain_size=G)
    _fill(eng, prod.id, list(range(N)), 1)
    snap1, _ = eng.snapshot(prod.id, "snap1")
    clone, _ = eng.clone(snap1.id, "clone", copy_rate=0, incremental=True)
    _fill(eng, clone.id, [1], 3)
    inner, _ = eng.snapshot(clone.id, "snap-of-clone")  # reads the clone's data through it
    before = _image(eng, inner.id)
    _fill(eng, prod.id, [5], 2)
    snap2, _ = eng.snapshot(prod.id, "snap2")
    _, dropped = eng.refresh(clone.id, snap2.id)
    assert dropped == N  # copied whole: its old data stays in a hidden node for the snapshot
    assert _image(eng, clone.id) == _image(eng, snap2.id)
    assert _image(eng, inner.id) == before
    eng.run_copies()
    assert _image(eng, inner.id) == before and _image(eng, clone.id) == _image(eng, snap2.id)


def test_inspect_reports_progress_bytes_left_and_hidden_dependents(eng) -> None:
    prod = eng.create_volume("prod", N * G, grain_size=G)
    _fill(eng, prod.id, list(range(N)), 1)
    snap, _ = eng.snapshot(prod.id, "snap")
    clone, cm = eng.clone(prod.id, "clone", copy_rate=0)
    _fill(eng, prod.id, [0, 1, 2], 2)  # copy-on-write into the clone (newest, next to prod)
    vols, maps, groups = eng.inspect()
    by_id = {m.id: m for m in maps}
    assert by_id[cm.id].state == MappingState.COPYING
    assert by_id[cm.id].bytes_to_copy == (N - 3) * G
    eng.delete_volume(prod.id)  # hidden: the clone and the snapshot still read through it
    vols, maps, groups = eng.inspect()
    hidden = [v for v in vols if v.deleted]
    assert [v.id for v in hidden] == [prod.id]
    assert set(hidden[0].dependents) == {clone.id, snap.id}
    assert groups == []


def test_modify_copies_changes_only_mappings_into_the_volume(eng) -> None:
    prod = eng.create_volume("prod", N * G, grain_size=G)
    snap, sm = eng.snapshot(prod.id, "snap")
    clone, cm = eng.clone(prod.id, "clone", copy_rate=10)
    changed = eng.modify_copies(clone.id, copy_rate=0, clean_rate=70)
    assert [(m.id, m.copy_rate, m.clean_rate) for m in changed] == [(cm.id, 0, 70)]
    assert eng.get_mapping(sm.id).copy_rate == 0 and eng.get_mapping(sm.id).clean_rate == 0
    assert eng.modify_copies(prod.id, copy_rate=50) == []
    with pytest.raises(errors.InvalidArgument):
        eng.modify_copies(clone.id, copy_rate=151)


def test_a_full_restart_of_a_used_target_swaps_its_file_and_drops_the_old_one_after_the_commit(tmp_path) -> None:
    eng = Engine.open(str(tmp_path), background=False)
    prod = eng.create_volume("prod", N * G, grain_size=G)
    _fill(eng, prod.id, list(range(N)), 1)
    snap, _ = eng.snapshot(prod.id, "snap", copy_rate=150)
    eng.run_copies()  # the snapshot is independent: a restore from it no longer shares prod's cascade
    _fill(eng, prod.id, list(range(N)), 2)
    expected = _image(eng, snap.id)
    data = tmp_path / "volumes"
    before = {p.name for p in data.iterdir() if p.name.startswith(prod.id)}
    eng.restore(snap.id, prod.id, copy_rate=0)

    def files() -> set[str]:
        return {p.name for p in data.iterdir() if p.name.startswith(prod.id)}
    # a new file at once; the old one goes in the background, after the commit and without the engine lock
    after = wait_for(lambda: files() if len(files()) == 1 else None, timeout=10, what="the old data file dropped")
    assert before != after
    assert _image(eng, prod.id) == expected
    eng.close()
    eng = Engine.open(str(tmp_path), background=False)
    try:
        assert _image(eng, prod.id) == expected
        eng.modify_copies(prod.id, copy_rate=150)
        eng.run_copies()
        eng.delete_volume(snap.id)
        assert _image(eng, prod.id) == expected
    finally:
        eng.close()
