"""Feature tests of the engine's public API (the model machine covers random mixes of the same)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from csi_driver.engine import CopyItem, Engine, MappingState, errors
from csi_driver.engine.model import rate_to_bytes_per_second

KiB = 1024
MiB = 1024 * KiB
G = 64 * KiB


@pytest.fixture
def eng(tmp_path):
    e = Engine.open(str(tmp_path), background=False)
    yield e
    e.close()


def test_rate_table_matches_flashcopy() -> None:
    assert rate_to_bytes_per_second(0) == 0
    assert rate_to_bytes_per_second(1) == rate_to_bytes_per_second(10) == 128 * KiB
    assert rate_to_bytes_per_second(50) == 2 * MiB
    assert rate_to_bytes_per_second(91) == rate_to_bytes_per_second(100) == 64 * MiB
    assert rate_to_bytes_per_second(141) == rate_to_bytes_per_second(150) == 2 * 1024 * MiB
    with pytest.raises(ValueError):
        rate_to_bytes_per_second(151)


def test_second_opener_is_refused(tmp_path, eng) -> None:
    code = "import sys; from csi_driver.engine import Engine, errors\n" \
           "try:\n    Engine.open(sys.argv[1])\nexcept errors.EngineLocked:\n    sys.exit(7)\n"
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=os.getcwd())
    assert r.returncode == 7


def test_sizes_round_up_and_thin(eng) -> None:
    v = eng.create_volume("v", 10, grain_size=G)
    assert v.size == G
    big = eng.create_volume("big", 10 * 1024 * MiB)
    assert big.allocated_bytes == 0
    eng.write(big.id, 5 * 1024 * MiB, b"x" * 4096)
    assert 0 < eng.get_volume(big.id).allocated_bytes <= 256 * KiB
    eng.discard(big.id, 5 * 1024 * MiB, 256 * KiB)
    assert eng.read(big.id, 5 * 1024 * MiB, 4096) == bytes(4096)
    assert eng.get_volume(big.id).allocated_bytes == 0
    with pytest.raises(errors.InvalidArgument):
        eng.create_volume("bad", 1, grain_size=4096)
    with pytest.raises(errors.AlreadyExists):
        eng.create_volume("v", G)
    with pytest.raises(errors.OutOfRange):
        eng.write(v.id, G - 1, b"ab")


def test_1024_targets_of_one_source_each_exact(eng) -> None:
    src = eng.create_volume("src", 4 * G, grain_size=G)
    snaps = []
    for i in range(1024):
        eng.write(src.id, (i % 4) * G + (i % 97), i.to_bytes(4, "little"))
        snaps.append((eng.snapshot(src.id, f"s{i}")[0].id, eng.read(src.id, 0, 4 * G)))
    eng.write(src.id, 0, b"\xff" * 4 * G)
    # delete some in the middle of the cascade: everyone else keeps its data
    for sid, _ in snaps[100:900:7]:
        eng.delete_volume(sid)
    kept = [s for i, s in enumerate(snaps) if not (100 <= i < 900 and (i - 100) % 7 == 0)]
    for sid, want in kept[::13] + kept[-3:]:
        assert eng.read(sid, 0, 4 * G) == want
    assert len(eng.list_mappings(volume_id=src.id)) == len(kept)


def test_target_larger_than_source_reads_zeros_past_the_source(eng) -> None:
    src = eng.create_volume("src", 2 * G, grain_size=G)
    eng.write(src.id, 0, b"\x11" * 2 * G)
    big, _ = eng.clone(src.id, "big", size=5 * G, copy_rate=0)
    assert eng.read(big.id, 0, 5 * G) == b"\x11" * 2 * G + bytes(3 * G)
    with pytest.raises(errors.OutOfRange):
        eng.clone(big.id, "small", size=G)


def test_incremental_refresh_copies_only_changes(eng) -> None:
    src = eng.create_volume("src", 16 * G, grain_size=G)
    dst = eng.create_volume("dst", 16 * G, grain_size=G)
    eng.write(src.id, 0, os.urandom(16 * G))
    m = eng.create_mapping(src.id, dst.id, copy_rate=100, incremental=True)
    eng.start_mapping(m.id)
    assert eng.run_copies() == 16 * G  # the first start copies everything
    assert eng.get_mapping(m.id).state == MappingState.IDLE_OR_COPIED
    eng.write(src.id, 3 * G, b"a" * 100)  # one grain changed on the source
    eng.write(dst.id, 9 * G, b"b" * 100)  # and one on the target
    eng.start_mapping(m.id)
    assert eng.get_mapping(m.id).progress == pytest.approx(100 * 14 / 16)
    assert eng.run_copies() == 2 * G
    assert eng.read(dst.id, 0, 16 * G) == eng.read(src.id, 0, 16 * G)


def test_restore_keeps_the_snapshot_and_the_others(eng) -> None:
    src = eng.create_volume("src", 4 * G, grain_size=G)
    eng.write(src.id, 0, b"1" * 4 * G)
    s1, _ = eng.snapshot(src.id, "s1")
    eng.write(src.id, 0, b"2" * 4 * G)
    s2, _ = eng.snapshot(src.id, "s2")
    eng.write(src.id, G, b"3" * G)
    m = eng.restore(s1.id, src.id, copy_rate=150)
    assert m.restore
    assert eng.read(src.id, 0, 4 * G) == b"1" * 4 * G
    assert eng.read(s1.id, 0, 4 * G) == b"1" * 4 * G
    assert eng.read(s2.id, 0, 4 * G) == b"2" * 4 * G
    eng.write(src.id, 0, b"4" * G)
    eng.run_copies()
    assert eng.read(src.id, 0, 2 * G) == b"4" * G + b"1" * G
    assert eng.read(s1.id, 0, 4 * G) == b"1" * 4 * G
    eng.delete_volume(s1.id)  # deleting the snapshot a restore copied from
    assert eng.read(src.id, 0, 2 * G) == b"4" * G + b"1" * G


def test_delete_source_with_dependents_reclaims_later(eng, tmp_path) -> None:
    src = eng.create_volume("src", 8 * G, grain_size=G)
    eng.write(src.id, 0, b"s" * 8 * G)
    snap, _ = eng.snapshot(src.id, "snap")
    clone, _ = eng.clone(src.id, "clone", copy_rate=100)
    eng.delete_volume(src.id)
    assert [v.name for v in eng.list_volumes()] == ["snap", "clone"]
    assert eng.read(snap.id, 0, 8 * G) == b"s" * 8 * G
    files_before = len(os.listdir(tmp_path / "volumes"))
    eng.run_copies()
    assert eng.read(clone.id, 0, 8 * G) == b"s" * 8 * G
    eng.delete_volume(snap.id)
    eng.run_copies()
    assert len(os.listdir(tmp_path / "volumes")) == files_before - 2  # source and snapshot files gone
    assert eng.read(clone.id, 0, 8 * G) == b"s" * 8 * G


def test_group_start_is_all_or_nothing(eng) -> None:
    a = eng.create_volume("a", 2 * G, grain_size=G)
    b = eng.create_volume("b", 2 * G, grain_size=G)
    eng.create_volume("taken", 2 * G, grain_size=G)
    with pytest.raises(errors.AlreadyExists):
        eng.snapshot_group([CopyItem(a.id, "a-snap"), CopyItem(b.id, "taken")], group_name="g")
    assert [v.name for v in eng.list_volumes()] == ["a", "b", "taken"]
    assert eng.list_groups() == [] and eng.list_mappings() == []
    grp, pairs = eng.snapshot_group([CopyItem(a.id, "a-snap"), CopyItem(b.id, "b-snap")],
                                    group_name="g")
    assert grp.state == "copying" and len(grp.mapping_ids) == 2
    assert len({m.start_time for _, m in pairs}) == 1


def test_prepare_start_stop_state_machine(eng) -> None:
    a = eng.create_volume("a", 4 * G, grain_size=G)
    b = eng.create_volume("b", 4 * G, grain_size=G)
    c = eng.create_volume("c", 4 * G, grain_size=G)
    m = eng.create_mapping(a.id, b.id, copy_rate=0)
    assert m.state == MappingState.IDLE_OR_COPIED
    assert eng.prepare_mapping(m.id).state == MappingState.PREPARED
    assert eng.start_mapping(m.id).state == MappingState.COPYING
    with pytest.raises(errors.InvalidState):
        eng.start_mapping(m.id)
    with pytest.raises(errors.InvalidState):
        eng.delete_mapping(m.id)
    eng.write(b.id, G, b"y" * G)  # b owns grain 1 now; c will read it through b
    m2 = eng.create_mapping(b.id, c.id, copy_rate=0)  # cascaded: a -> b -> c
    eng.start_mapping(m2.id)
    eng.write(a.id, 0, b"x" * G)
    assert eng.stop_mapping(m.id).state == MappingState.STOPPING  # c still reads through b
    with pytest.raises(errors.VolumeOffline):
        eng.read(b.id, 0, 1)
    eng.run_copies()
    assert eng.get_mapping(m.id).state == MappingState.STOPPED
    assert eng.read(c.id, 0, 2 * G) == bytes(G) + b"y" * G
    eng.delete_mapping(m.id, force=True)
    assert eng.get_volume(b.id).status == "online"


def test_changed_extents_between_snapshots(eng) -> None:
    v = eng.create_volume("v", 16 * G, grain_size=G)
    eng.write(v.id, 0, b"a" * 16 * G)
    s1, _ = eng.snapshot(v.id, "s1")
    eng.write(v.id, 3 * G + 5, b"b")
    eng.write(v.id, 10 * G, b"c" * 2 * G)
    s2, _ = eng.snapshot(v.id, "s2")
    assert eng.changed_extents(s1.id, s2.id) == [(3 * G, G), (10 * G, 2 * G)]
    sparse = eng.create_volume("sparse", 16 * G, grain_size=G)
    eng.write(sparse.id, 4 * G, b"z")
    assert eng.changed_extents(None, sparse.id) == [(4 * G, G)]


def test_autodelete_and_background_copy_thread(tmp_path) -> None:
    e = Engine.open(str(tmp_path / "bg"))
    try:
        v = e.create_volume("v", 8 * MiB)
        e.write(v.id, 0, os.urandom(8 * MiB))
        c, m = e.clone(v.id, "c", copy_rate=150)
        assert e.wait_copies(30)
        with pytest.raises(errors.NotFound):
            e.get_mapping(m.id)
        assert e.get_volume(c.id).source_mapping_id is None
        assert e.read(c.id, 0, 8 * MiB) == e.read(v.id, 0, 8 * MiB)
    finally:
        e.close()


def test_quiesce_hook_may_write_through_the_engine(tmp_path) -> None:
    """A filesystem freeze flushes dirty pages through the engine: the hook runs outside the engine lock."""
    import contextlib
    import threading

    e = Engine.open(str(tmp_path / "q"))
    try:
        a = e.create_volume("a", 4 * G, grain_size=G)
        b = e.create_volume("b", 4 * G, grain_size=G)
        seen: list[list[str]] = []

        @contextlib.contextmanager
        def freeze(sources: list[str]):
            seen.append(sources)
            t = threading.Thread(target=e.write, args=(a.id, 0, b"frozen-flush"))  # another thread, as FUSE
            t.start()
            t.join(10)
            assert not t.is_alive(), "the quiesce hook deadlocked against the engine lock"
            yield

        snap, _ = e.snapshot(a.id, "s", quiesce=freeze)
        _, pairs = e.snapshot_group([CopyItem(a.id, "g1"), CopyItem(b.id, "g2")], group_name="g",
                                    quiesce=freeze)
        assert seen == [[a.id], [a.id, b.id]]
        assert e.read(snap.id, 0, 12) == b"frozen-flush"  # what the freeze flushed is in the snapshot
    finally:
        e.close()


def test_too_large_for_the_filesystem_is_out_of_range(eng, tmp_path) -> None:
    with pytest.raises(errors.OutOfRange):
        eng.create_volume("huge", 1 << 60)
    assert os.listdir(tmp_path / "volumes") == []
    v = eng.create_volume("v", G, grain_size=G)
    with pytest.raises(errors.OutOfRange):
        eng.resize_volume(v.id, 1 << 60)
    assert eng.get_volume(v.id).size == G


def test_explicit_consistency_group_lifecycle(eng) -> None:
    a = eng.create_volume("a", 2 * G, grain_size=G)
    b = eng.create_volume("b", 2 * G, grain_size=G)
    ta = eng.create_volume("ta", 2 * G, grain_size=G)
    tb = eng.create_volume("tb", 2 * G, grain_size=G)
    eng.write(a.id, 0, b"a" * 2 * G)
    eng.write(b.id, 0, b"b" * 2 * G)
    grp = eng.create_group("nightly")
    assert grp.state == "empty"
    ma = eng.create_mapping(a.id, ta.id, copy_rate=150, group_id=grp.id)
    mb = eng.create_mapping(b.id, tb.id, copy_rate=150, group_id=grp.id)
    with pytest.raises(errors.InvalidState):
        eng.start_mapping(ma.id)  # members are driven through their group
    assert eng.prepare_group(grp.id).state == "prepared"
    started = eng.start_group(grp.id)
    assert started.state == "copying" and set(started.mapping_ids) == {ma.id, mb.id}
    assert eng.get_mapping(ma.id).start_time == eng.get_mapping(mb.id).start_time == started.start_time
    with pytest.raises(errors.InvalidState):  # membership is fixed while the group is active
        eng.create_mapping(a.id, eng.create_volume("tc", 2 * G, grain_size=G).id, group_id=grp.id)
    eng.write(a.id, 0, b"A" * G)
    eng.write(b.id, 0, b"B" * G)
    assert eng.read(ta.id, 0, 2 * G) == b"a" * 2 * G and eng.read(tb.id, 0, 2 * G) == b"b" * 2 * G
    eng.run_copies()
    assert eng.get_group(grp.id).state == "idle_or_copied"
    assert eng.stop_group(grp.id).state == "idle_or_copied"  # stopping copied mappings is a no-op
    eng.modify_mapping(ma.id, autodelete=True)  # turning autodelete on for a copied mapping deletes it
    with pytest.raises(errors.NotFound):
        eng.get_mapping(ma.id)
    assert eng.get_group(grp.id).mapping_ids == (mb.id,)
    eng.delete_group(grp.id)
    assert eng.get_mapping(mb.id).group_id is None
    with pytest.raises(errors.NotFound):
        eng.get_group(grp.id)
    with pytest.raises(errors.InvalidArgument):
        eng.modify_mapping(mb.id, copy_rate=151)


def test_attrs_are_kept_verbatim_across_reopen(tmp_path) -> None:
    e = Engine.open(str(tmp_path / "a"), background=False)
    v = e.create_volume("v", G, attrs={"kind": "volume", "csi.param/copyRate": "50"})
    e.set_volume_attrs(v.id, {"kind": "snapshot", "note": "ünïcode"})
    e.close()
    with Engine.open(str(tmp_path / "a"), background=False) as e:
        assert e.get_volume(v.id).attrs == {"kind": "snapshot", "note": "ünïcode"}
        with pytest.raises(errors.InvalidArgument):
            e.create_volume("w", G, attrs={"k": 1})  # type: ignore[dict-item]
