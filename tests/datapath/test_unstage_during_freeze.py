"""Unstage, unpublish and expand wait for a snapshot's freeze of the same volume to end (issue 23: NodeUnstageVolume
answered INTERNAL "umount: target is busy" while a CreateSnapshot held that filesystem frozen). Real ext4 on a loop
device over the FUSE export; the freeze is the data path's own quiesce hook, held open as a snapshot holds it."""

from __future__ import annotations

import os
import threading
import time

from csi_driver.datapath import privileged
from tests.datapath.conftest import needs_kernel

pytestmark = needs_kernel

MiB = 1024 * 1024
HOLD = 1.5  # seconds the snapshot keeps the filesystem frozen


def test_unstage_and_unpublish_wait_for_the_thaw(engine, datapath, workdir):
    v = engine.create_volume("v", 64 * MiB)
    staging, target = f"{workdir}/stage", f"{workdir}/pod"
    datapath.stage(v.id, staging, block=False, fs_type="ext4")
    datapath.publish(v.id, staging, target, block=False)
    with open(f"{target}/f", "wb") as f:
        f.write(b"x" * 100_000)
    frozen, thawed = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    order: list[str] = []

    def snapshot_instant() -> None:
        try:
            with datapath.quiesce([v.id]):
                frozen.set()
                time.sleep(HOLD)
                order.append("thaw")
        except BaseException as e:  # the thaw of a filesystem unmounted under it fails
            errors.append(e)
        thawed.set()

    t = threading.Thread(target=snapshot_instant)
    t.start()
    assert frozen.wait(30)
    t0 = time.monotonic()
    datapath.unpublish(v.id, target)  # waits for the thaw, then succeeds
    order.append("unpublished")
    datapath.unstage(v.id, staging)
    took = time.monotonic() - t0
    t.join(30)
    assert thawed.is_set()
    assert errors == [], errors
    assert order == ["thaw", "unpublished"], order  # nothing was torn down under the frozen filesystem
    assert took >= HOLD * 0.5, f"unstage did not wait for the freeze ({took:.2f} s)"
    assert not privileged.is_mountpoint(staging) and not os.path.exists(target)
    assert datapath.record(v.id) is None
