"""Issue 22 item 7 on the real node data path (engine, FUSE export, loop devices, mkfs, mount):
- NodeUnpublish deletes only what NodePublish created at the target: a regular file (block) or directory
  (filesystem) that was there before stays, with its bytes;
- the staged filesystem and its publish bind mount carry nosuid,nodev (per mount, /proc/self/mountinfo) unless
  the capability's mount_flags ask for suid / dev; a block publish keeps device access (nodev would break it)."""

from __future__ import annotations

import os

import pytest

from csi_driver.datapath import privileged
from tests.datapath.conftest import needs_kernel

pytestmark = [needs_kernel, pytest.mark.root]

MiB = 1 << 20


def test_block_unpublish_leaves_a_file_that_was_there(engine, datapath, workdir):
    vol = engine.create_volume("blk-pre", 16 * MiB)
    stg, tgt = f"{workdir}/stg/blk", f"{workdir}/pod/blk/dev"
    os.makedirs(os.path.dirname(tgt))
    with open(tgt, "wb") as f:
        f.write(b"a user's file")
    datapath.stage(vol.id, stg, block=True)
    datapath.publish(vol.id, stg, tgt, block=True)
    assert privileged.block_size_bytes(tgt) == vol.size
    datapath.unpublish(vol.id, tgt)
    assert not privileged.is_mountpoint(tgt)
    with open(tgt, "rb") as f:
        assert f.read() == b"a user's file"
    # a target publish made itself is deleted again
    own = f"{workdir}/pod/blk/own"
    datapath.publish(vol.id, stg, own, block=True)
    datapath.unpublish(vol.id, own)
    assert not os.path.lexists(own)
    datapath.unstage(vol.id, stg)


def test_mount_unpublish_leaves_a_directory_that_was_there(engine, datapath, workdir):
    vol = engine.create_volume("fs-pre", 64 * MiB)
    stg, tgt = f"{workdir}/stg/fs", f"{workdir}/pod/fs/mnt"
    os.makedirs(tgt)
    datapath.stage(vol.id, stg, block=False, fs_type="ext4")
    datapath.publish(vol.id, stg, tgt, block=False)
    datapath.unpublish(vol.id, tgt)
    assert os.path.isdir(tgt) and not privileged.is_mountpoint(tgt)
    own = f"{workdir}/pod/fs/own"
    datapath.publish(vol.id, stg, own, block=False)
    datapath.unpublish(vol.id, own)
    assert not os.path.lexists(own)
    datapath.unstage(vol.id, stg)


def _flags(path: str) -> frozenset[str]:
    return privileged.mounts_at(path)[-1].options  # per-mount options (field 6 of mountinfo)


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
@pytest.mark.parametrize("read_only", [False, True])
def test_filesystem_mounts_are_nosuid_nodev(engine, datapath, workdir, fs, read_only):
    vol = engine.create_volume(f"sec-{fs}-{read_only}", 320 * MiB if fs == "xfs" else 64 * MiB)
    stg, tgt = f"{workdir}/stg/{fs}", f"{workdir}/pod/{fs}/mnt"
    datapath.stage(vol.id, stg, block=False, fs_type=fs)
    datapath.publish(vol.id, stg, tgt, block=False, read_only=read_only)
    try:
        for path in (stg, tgt):
            assert {"nosuid", "nodev"} <= _flags(path), (path, _flags(path))
        assert ("ro" in _flags(tgt)) == read_only
    finally:
        datapath.unpublish(vol.id, tgt)
        datapath.unstage(vol.id, stg)


def test_mount_flags_may_ask_for_suid_and_dev(engine, datapath, workdir):
    vol = engine.create_volume("sec-opt-in", 64 * MiB)
    stg, tgt = f"{workdir}/stg/in", f"{workdir}/pod/in/mnt"
    datapath.stage(vol.id, stg, block=False, fs_type="ext4", mount_flags=["dev", "suid"])
    datapath.publish(vol.id, stg, tgt, block=False, mount_flags=["dev", "suid"])
    try:
        for path in (stg, tgt):
            assert not {"nosuid", "nodev"} & _flags(path), (path, _flags(path))
    finally:
        datapath.unpublish(vol.id, tgt)
        datapath.unstage(vol.id, stg)


def test_records_from_before_made_was_kept_delete_as_before(tmp_path):
    """A staging.json written by an older driver has no "made": its publishes' targets are the driver's (the old
    rule), so unpublish still removes them; a new record starts with an empty list."""
    import json

    from csi_driver.datapath.node import StageRecord, _Records

    path = tmp_path / "staging.json"
    legacy = {"volume_id": "vol-1", "staging_path": "/s", "block": True, "fs_type": "", "read_only": False,
              "publishes": {"/t": False}}
    path.write_text(json.dumps({"staged": [legacy]}))
    assert _Records(str(path)).items["vol-1"].made is None
    assert StageRecord("vol-2", "/s", True, "", False).made == []
