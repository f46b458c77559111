"""Fixtures for the node data path tests: root/FUSE/loop skips, a real engine, and a leak check.

Every test using `no_leaks` (all of them, through `datapath`) fails if it leaves a loop device, a mount or a
FUSE mount under its temporary directory behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from csi_driver.datapath import datapath_unavailable, privileged


def _why_no_kernel() -> str | None:
    # what the driver itself checks before it runs the data path, plus the host tools the tests drive
    why = datapath_unavailable()
    if why:
        return f"the kernel data path cannot run here: {why} (needs root, /dev/fuse, loop devices)"
    for tool in ("losetup", "mkfs.ext4", "mkfs.xfs", "blkid", "mount", "resize2fs", "xfs_growfs"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


KERNEL_SKIP = _why_no_kernel()
needs_kernel = pytest.mark.skipif(KERNEL_SKIP is not None, reason=KERNEL_SKIP or "")


def leftovers(root: str) -> list[str]:
    root = os.path.realpath(root)
    found = [f"mount {m.mount_point} ({m.fstype})" for m in privileged.mounts()
             if m.mount_point == root or m.mount_point.startswith(root + "/")]
    found += [f"loop {lo.device} -> {lo.backing_file}" for lo in privileged.list_loops()
              if lo.backing_file.startswith(root + "/")]
    return found


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A short temporary directory (mount paths stay readable) checked for leftovers afterwards."""
    d = str(tmp_path_factory.mktemp("dp"))
    yield d
    left = leftovers(d)
    # clean up so one failing test does not poison the next, then fail loudly
    for m in sorted((m for m in privileged.mounts() if m.mount_point.startswith(os.path.realpath(d) + "/")),
                    key=lambda m: -len(m.mount_point)):
        privileged.umount(m.mount_point, lazy=True)
    for lo in privileged.list_loops():
        if lo.backing_file.startswith(os.path.realpath(d) + "/"):
            privileged.detach_loop(lo.device)
    assert not left, f"test left behind: {left}"


@pytest.fixture
def engine(workdir: str) -> Iterator[object]:
    from csi_driver.engine import Engine

    eng = Engine.open(os.path.join(workdir, "state"), commit_interval=0.05)
    yield eng
    eng.close()


@pytest.fixture
def datapath(engine: object, workdir: str) -> Iterator[object]:
    from csi_driver.datapath import DataPath

    dp = DataPath(engine, os.path.join(workdir, "state"))
    dp.start()
    yield dp
    dp.stop(teardown=True)
