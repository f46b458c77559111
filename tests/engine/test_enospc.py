"""Out of space: a copy-on-write that cannot be stored stops the snapshot; the source write still succeeds."""

from __future__ import annotations

import os
import subprocess

import pytest

from csi_driver.engine import Engine, MappingState, errors

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
