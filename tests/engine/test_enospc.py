"""Out of space: a copy-on-write that cannot be stored stops the snapshot; the source write still succeeds."""

from __future__ import annotations

import os
import subprocess

import pytest

from csi_driver.engine import CopyItem, Engine, MappingState, errors
from tests.diskfull import fill_to_last_byte

MiB = 1024 * 1024


@pytest.fixture
def tiny_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path, leave: int) -> None:
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(os.path.join(path, "filler"), "wb") as f:
        f.write(b"\xee" * max(0, free - leave))


def test_cow_out_of_space_stops_mapping_source_keeps_working(tiny_fs) -> None:
    eng = Engine.open(str(tiny_fs / "state"), background=False)
    try:
        src = eng.create_volume("src", 64 * MiB, grain_size=64 * 1024)
        first = os.urandom(8 * MiB)
        eng.write(src.id, 0, first)
        eng.flush()
        snap, m = eng.snapshot(src.id, "snap")
        fill(str(tiny_fs), leave=1 * MiB)  # room for metadata, not for 8 MiB of copies
        second = os.urandom(8 * MiB)
        for off in range(0, 8 * MiB, MiB):  # every write must succeed even though the copies cannot
            eng.write(src.id, off, second[off:off + MiB])
        eng.flush()
        assert eng.read(src.id, 0, 8 * MiB) == second
        info = eng.get_mapping(m.id)
        assert info.state == MappingState.STOPPED
        assert "out of space" in info.error
        vinfo = eng.get_volume(snap.id)
        assert vinfo.status == "offline" and "out of space" in vinfo.error
        with pytest.raises(errors.VolumeOffline):
            eng.read(snap.id, 0, 4096)
        # space comes back: the snapshot can be deleted and a new one taken
        os.unlink(tiny_fs / "filler")
        eng.delete_volume(snap.id)
        snap2, _ = eng.snapshot(src.id, "snap2")
        eng.write(src.id, 0, b"x" * MiB)
        assert eng.read(snap2.id, 0, 8 * MiB) == second
    finally:
        eng.close()
    # and it all survives a reopen
    eng = Engine.open(str(tiny_fs / "state"), background=False)
    try:
        assert eng.read(eng.find_volume("snap2").id, 0, 8 * MiB) == second
    finally:
        eng.close()


def test_host_write_out_of_space_is_a_clear_error(tiny_fs) -> None:
    eng = Engine.open(str(tiny_fs / "state"), background=False)
    try:
        vol = eng.create_volume("v", 64 * MiB)
        fill(str(tiny_fs), leave=512 * 1024)
        with pytest.raises(errors.NoSpace):
            for off in range(0, 16 * MiB, MiB):
                eng.write(vol.id, off, b"\x01" * MiB)
    finally:
        os.unlink(tiny_fs / "filler")
        eng.close()


def test_background_copy_waits_for_space_and_the_clone_stays_usable(tiny_fs) -> None:
    eng = Engine.open(str(tiny_fs / "state"), background=False)
    try:
        src = eng.create_volume("src", 32 * MiB, grain_size=64 * 1024)
        data = os.urandom(6 * MiB)
        eng.write(src.id, 0, data)
        eng.flush()
        fill(str(tiny_fs), leave=1 * MiB)
        clone, m = eng.clone(src.id, "clone", copy_rate=150)
        eng.run_copies()
        info = eng.get_mapping(m.id)
        assert info.state == MappingState.COPYING and "waiting for space" in info.error
        assert info.progress < 100
        assert eng.get_volume(clone.id).status == "online"
        assert eng.read(clone.id, 0, 6 * MiB) == data  # still served through the source
        eng.write(clone.id, 0, b"mine")  # the user's own writes to the clone keep working
        os.unlink(tiny_fs / "filler")  # space comes back: the copy finishes and the clone is independent
        eng.run_copies()
        with pytest.raises(errors.NotFound):
            eng.get_mapping(m.id)
        assert eng.read(clone.id, 0, 6 * MiB) == b"mine" + data[4:]
    finally:
        eng.close()


def fill_all(path, *, keep_reserves: bool = False) -> None:
    """Fill the filesystem to the last byte (and give up the engine's reserves first unless asked not to, as a
    long full spell would: the reserve files are the engine's own)."""
    for name in () if keep_reserves else ("metadata.reserve", "free.reserve"):
        p = os.path.join(path, "state", name)
        if os.path.exists(p):
            os.truncate(p, 0)
    fill_to_last_byte(path)


def _snapshot_state(tiny_fs) -> tuple[str, str]:
    eng = Engine.open(str(tiny_fs / "state"), background=False)
    try:
        src = eng.create_volume("src", 4 * MiB)
        eng.write(src.id, 0, b"s" * MiB)
        snap, _ = eng.snapshot(src.id, "snap")
        eng.write(src.id, 0, b"t" * MiB)  # the snapshot owns data now
        eng.flush()
        return src.id, snap.id
    finally:
        eng.close()


def test_failed_delete_on_a_full_state_dir_changes_nothing_and_the_retry_tells_the_truth(tiny_fs) -> None:
    """Issue 22 item 3: DeleteSnapshot failing RESOURCE_EXHAUSTED must not drop the snapshot in memory (before: the
    retry answered OK (NotFound) and the snapshot came back after a restart)."""
    _src, snap = _snapshot_state(tiny_fs)
    eng = Engine.open(str(tiny_fs / "state"), background=False)
    try:
        fill_all(str(tiny_fs))
        for _ in range(2):  # the retry fails the same way: nothing changed in memory
            with pytest.raises(errors.NoSpace):
                eng.delete_volume(snap)
            assert eng.get_volume(snap).name == "snap"
            assert eng.read(snap, 0, MiB) == b"s" * MiB
        os.unlink(tiny_fs / "filler")
        eng.delete_volume(snap)  # and succeeds for real once there is space
        with pytest.raises(errors.NotFound):
            eng.get_volume(snap)
    finally:
        eng.close()
    eng = Engine.open(str(tiny_fs / "state"), background=False)
    try:
        with pytest.raises(errors.NotFound):
            eng.get_volume(snap)
    finally:
        eng.close()


def test_delete_frees_space_on_a_full_state_dir_also_after_a_restart(tiny_fs) -> None:
    """Issue 22 item 3: a reserve kept for deletes (and made again at open) lets space be freed through the driver
    when the state dir is full and the metadata reserve is long gone."""
    src, snap = _snapshot_state(tiny_fs)
    eng = Engine.open(str(tiny_fs / "state"), background=False)
    eng.close()
    # full, with the metadata reserve given up earlier; the engine restarts on the full filesystem
    os.truncate(tiny_fs / "state" / "metadata.reserve", 0)
    fill_all(str(tiny_fs), keep_reserves=True)
    eng = Engine.open(str(tiny_fs / "state"), background=False)
    try:
        assert eng._reserve_released  # copies leave room for metadata until the reserve is back
        eng.delete_volume(snap)
        eng.delete_volume(src)
    finally:
        eng.close()
    eng = Engine.open(str(tiny_fs / "state"), background=False)
    try:
        assert eng.list_volumes() == []
    finally:
        eng.close()


def test_failed_group_and_mapping_deletes_on_a_full_state_dir_change_nothing(tiny_fs) -> None:
    """Issue 22 item 3, the same rule for DeleteVolumeGroupSnapshot (delete_group) and a mapping's delete."""
    eng = Engine.open(str(tiny_fs / "state"), background=False)
    try:
        a = eng.create_volume("a", 4 * MiB)
        b = eng.create_volume("b", 4 * MiB)
        group, _pairs = eng.snapshot_group([CopyItem(a.id, "sa"), CopyItem(b.id, "sb")], group_name="g")
        clone, m = eng.clone(a.id, "clone", copy_rate=0)
        fill_all(str(tiny_fs))
        for _ in range(2):
            with pytest.raises(errors.NoSpace):
                eng.delete_group(group.id)
            assert eng.get_group(group.id).name == "g"
            with pytest.raises(errors.NoSpace):
                eng.delete_mapping(m.id, force=True)
            assert eng.get_mapping(m.id).target_id == clone.id
        os.unlink(tiny_fs / "filler")
        eng.delete_group(group.id)
        eng.delete_mapping(m.id, force=True)
    finally:
        eng.close()
    eng = Engine.open(str(tiny_fs / "state"), background=False)
    try:
        with pytest.raises(errors.NotFound):
            eng.get_group(group.id)
        with pytest.raises(errors.NotFound):
            eng.get_mapping(m.id)
    finally:
        eng.close()
