"""The node data path over the real engine: loop devices on FUSE-exported volumes, ext4/xfs, freeze.

Everything here is real: engine, FUSE export, loop devices with direct I/O, mkfs, mount, fstrim.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from csi_driver.datapath import privileged
from csi_driver.engine import errors
from tests.datapath.conftest import needs_kernel
from tests.datapath.csi_node import check_files, write_files

pytestmark = [needs_kernel, pytest.mark.root]

MiB = 1 << 20
# mkfs.xfs refuses filesystems under 300 MiB
SIZES = {"ext4": 64 * MiB, "xfs": 320 * MiB}


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_filesystem_snapshot_while_mounted_restore_larger(engine, datapath, workdir, fs):
    vol = engine.create_volume("src", SIZES[fs])
    stg, tgt = f"{workdir}/stg/src", f"{workdir}/pod/src"
    datapath.stage(vol.id, stg, block=False, fs_type=fs)
    datapath.publish(vol.id, stg, tgt, block=False)
    assert privileged.filesystem_type(datapath.record(vol.id).loop_device) == fs
    before = write_files(tgt, 8, "a")

    snap, _ = engine.snapshot(vol.id, "snap", quiesce=datapath.quiesce)
    assert 0 < datapath.last_freeze_window < 10
    # written after the snapshot instant: must not show up in the restore
    after = write_files(tgt, 3, "late")
    os.sync()

    big, _ = engine.clone(snap.id, "restore", size=SIZES[fs] * 2)
    rstg, rtgt = f"{workdir}/stg/restore", f"{workdir}/pod/restore"
    datapath.stage(big.id, rstg, block=False, fs_type=fs)  # existing fs: mounted, never reformatted
    datapath.publish(big.id, rstg, rtgt, block=False)
    check_files(rtgt, before)
    for name in after:
        if name not in before:
            assert not os.path.exists(os.path.join(rtgt, name))
    # the restored filesystem was grown to the larger volume
    assert os.statvfs(rtgt).f_blocks * os.statvfs(rtgt).f_frsize > SIZES[fs] * 1.3

    for vid, s, t in ((vol.id, stg, tgt), (big.id, rstg, rtgt)):
        datapath.unpublish(vid, t)
        datapath.unstage(vid, s)
        assert not os.path.exists(t)


def test_block_volume_publish_snapshot(engine, datapath, workdir):
    vol = engine.create_volume("blk", 16 * MiB)
    stg, tgt = f"{workdir}/stg/blk", f"{workdir}/pod/blk/dev"
    datapath.stage(vol.id, stg, block=True)
    datapath.publish(vol.id, stg, tgt, block=True)
    pattern = os.urandom(MiB)
    fd = os.open(tgt, os.O_RDWR)
    try:
        os.pwrite(fd, pattern, 3 * MiB)  # buffered: the quiesce flush must push it down
    finally:
        os.close(fd)
    snap, _ = engine.snapshot(vol.id, "bsnap", quiesce=datapath.quiesce)
    assert engine.read(snap.id, 3 * MiB, MiB) == pattern
    assert privileged.block_size_bytes(tgt) == vol.size
    st = datapath.stats(vol.id, tgt)
    assert st.block and st.total_bytes == vol.size and not st.abnormal
    datapath.unpublish(vol.id, tgt)
    datapath.unstage(vol.id, stg)


def test_existing_data_is_never_reformatted(engine, datapath, workdir):
    vol = engine.create_volume("x", 64 * MiB)
    stg = f"{workdir}/stg/x"
    datapath.stage(vol.id, stg, block=False, fs_type="ext4")
    with open(f"{stg}/keep", "w") as f:
        f.write("precious")
    datapath.unstage(vol.id, stg)
    with pytest.raises(errors.InvalidState, match="refusing to reformat"):
        datapath.stage(vol.id, stg, block=False, fs_type="xfs")
    datapath.stage(vol.id, stg, block=False, fs_type="ext4")
    with open(f"{stg}/keep") as f:
        assert f.read() == "precious"
    datapath.unstage(vol.id, stg)
    dev = privileged.attach_loop(datapath.export.add(vol.id, _Vol(engine, vol.id)))
    try:
        with pytest.raises(privileged.HasFilesystem):
            privileged.mkfs(dev, "xfs")
    finally:
        privileged.detach_loop(dev)
        datapath.export.remove(vol.id)


def _Vol(engine, vid):  # noqa: N802 - reads like the class it builds
    from csi_driver.datapath.fuse_export import EngineVolume

    return EngineVolume(engine, vid)


def test_stage_publish_idempotent_and_unstage_half_done(engine, datapath, workdir):
    vol = engine.create_volume("idem", 64 * MiB)
    stg, tgt = f"{workdir}/stg/i", f"{workdir}/pod/i"
    for _ in range(2):
        datapath.stage(vol.id, stg, block=False)
        datapath.publish(vol.id, stg, tgt, block=False)
    assert len([m for m in privileged.mounts() if m.mount_point == tgt]) == 1
    with pytest.raises(errors.AlreadyExists):
        datapath.stage(vol.id, f"{workdir}/stg/other", block=False)
    with pytest.raises(errors.AlreadyExists):
        datapath.stage(vol.id, stg, block=True)
    for _ in range(2):
        datapath.unpublish(vol.id, tgt)
        datapath.unstage(vol.id, stg)
    # half set up (export + loop, as a crash between the two steps leaves it): unstage cleans it
    dev = privileged.attach_loop(datapath.export.add(vol.id, _Vol(engine, vol.id)))
    assert datapath.record(vol.id) is None
    datapath.unstage(vol.id, stg)
    assert not os.path.exists(f"/sys/block/{os.path.basename(dev)}/loop/backing_file") or \
        privileged.list_loops() == [lo for lo in privileged.list_loops() if lo.device != dev]
    assert vol.id not in datapath.export.names()


def test_publish_before_stage_fails(engine, datapath, workdir):
    vol = engine.create_volume("nostage", 64 * MiB)
    with pytest.raises(errors.InvalidState):
        datapath.publish(vol.id, f"{workdir}/stg/n", f"{workdir}/pod/n", block=False)
    with pytest.raises(errors.NotFound):
        datapath.stage("no-such-volume", f"{workdir}/stg/n", block=False)


def test_read_only_publish_refuses_writes(engine, datapath, workdir):
    vol = engine.create_volume("ro", 64 * MiB)
    stg, tgt, btgt = f"{workdir}/stg/ro", f"{workdir}/pod/ro", f"{workdir}/pod/ro-w"
    datapath.stage(vol.id, stg, block=False)
    datapath.publish(vol.id, stg, tgt, block=False, read_only=True)
    datapath.publish(vol.id, stg, btgt, block=False)
    with open(f"{btgt}/ok", "w") as f:
        f.write("rw")
    with pytest.raises(OSError) as e, open(f"{tgt}/nope", "w"):
        pass
    assert e.value.errno == errno.EROFS
    with open(f"{tgt}/ok") as f:
        assert f.read() == "rw"
    datapath.unpublish(vol.id, tgt)
    datapath.unpublish(vol.id, btgt)
    datapath.unstage(vol.id, stg)


@pytest.mark.parametrize("fs", ["ext4", "xfs", "block"])
def test_online_expand_and_stats(engine, datapath, workdir, fs):
    if fs == "ext4" and not privileged.can_resize_ext4_online():
        pytest.skip("online ext4 resize needs CAP_SYS_RESOURCE, which this environment does not grant")
    block = fs == "block"
    size = 16 * MiB if block else SIZES[fs]
    vol = engine.create_volume("grow", size)
    stg = f"{workdir}/stg/g"
    datapath.stage(vol.id, stg, block=block, fs_type="" if block else fs)
    path = stg
    if block:
        path = f"{workdir}/pod/g"
        datapath.publish(vol.id, stg, path, block=True)
    st = datapath.stats(vol.id, path)
    assert not st.abnormal and st.total_bytes > 0
    if not block:
        assert st.total_inodes > 0 and st.used_bytes > 0 and st.available_bytes > 0
        write_files(stg, 2, "g")
    new = datapath.expand(vol.id, path, size * 2)
    assert new == size * 2
    st2 = datapath.stats(vol.id, path)
    assert st2.total_bytes > st.total_bytes * 1.5
    if block:
        datapath.unpublish(vol.id, path)
    datapath.unstage(vol.id, stg)
    with pytest.raises(errors.NotFound):
        datapath.stats(vol.id, stg)


def test_discard_and_fsync_reach_the_engine(engine, datapath, workdir):
    vol = engine.create_volume("thin", 128 * MiB)
    stg = f"{workdir}/stg/t"
    datapath.stage(vol.id, stg, block=False)
    base = engine.get_volume(vol.id).allocated_bytes
    with open(f"{stg}/big", "wb") as f:
        f.write(os.urandom(48 * MiB))
        f.flush()
        os.fsync(f.fileno())  # through FUSE fsync to engine.flush: durable in the engine's file now
    assert engine.get_volume(vol.id).allocated_bytes >= base + 40 * MiB
    os.unlink(f"{stg}/big")
    os.sync()  # the freed blocks count as free for FITRIM only once the journal committed the unlink
    subprocess.run(["fstrim", stg], check=True)
    assert engine.get_volume(vol.id).allocated_bytes < base + 8 * MiB
    datapath.unstage(vol.id, stg)


def test_clone_of_mounted_volume(engine, datapath, workdir):
    vol = engine.create_volume("live", 64 * MiB)
    stg = f"{workdir}/stg/live"
    datapath.stage(vol.id, stg, block=False)
    files = write_files(stg, 5, "c")
    os.sync()
    clone, _ = engine.clone(vol.id, "copy")
    write_files(stg, 5, "changed-after-clone")
    cstg = f"{workdir}/stg/copy"
    datapath.stage(clone.id, cstg, block=False)
    check_files(cstg, files)
    datapath.unstage(clone.id, cstg)
    datapath.unstage(vol.id, stg)
