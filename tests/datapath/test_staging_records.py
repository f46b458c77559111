"""Issue 22, items 3 and 5: staging records on disk and in memory never diverge, and a stale record's loop
device never reaches a Pod.

Before: NodeUnpublish/NodeUnstage changed memory, then failed to save the record (a full state dir), and the
retry answered OK while staging.json still named the publish/stage; DataPath.publish bound whatever device the
record named, also when the kernel had given that number to another volume.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from csi_driver.datapath import DataPath, privileged
from csi_driver.engine import Engine, errors
from tests.datapath.conftest import needs_kernel
from tests.diskfull import fill_to_last_byte

pytestmark = needs_kernel

MiB = 1024 * 1024


def _on_disk(state: str) -> dict:
    with open(os.path.join(state, "staging.json")) as f:
        return {r["volume_id"]: r for r in json.load(f)["staged"]}


def test_publish_refuses_a_recorded_loop_device_that_backs_another_volume(engine, datapath, workdir):
    a = engine.create_volume("a", 8 * MiB)
    b = engine.create_volume("b", 8 * MiB)
    engine.write(b.id, 0, b"B" * 4096)
    datapath.stage(a.id, f"{workdir}/sa", block=True)
    rec_b = datapath.stage(b.id, f"{workdir}/sb", block=True)
    # a stale record: A's device number was freed and the kernel gave it to B
    datapath._records.items[a.id].loop_device = rec_b.loop_device
    datapath._records.save()
    with pytest.raises(errors.NotFound):  # B's device node is no path of A's, whatever the record says
        datapath.stats(a.id, rec_b.loop_device)
    target = f"{workdir}/pod-a"
    with pytest.raises(errors.InvalidState, match="backs"):
        datapath.publish(a.id, f"{workdir}/sa", target, block=True)
    assert not privileged.is_mountpoint(target)
    if os.path.exists(target):  # nothing of B's behind it
        st = os.stat(target)
        assert st.st_rdev != os.stat(rec_b.loop_device).st_rdev
    # stage repairs the record from sysfs: A's own device, and publish works again
    rec_a = datapath.stage(a.id, f"{workdir}/sa", block=True)
    assert rec_a.loop_device != rec_b.loop_device
    datapath.publish(a.id, f"{workdir}/sa", target, block=True)
    assert os.stat(target).st_rdev == os.stat(rec_a.loop_device).st_rdev
    datapath.unpublish(a.id, target)


def test_unpublish_and_unstage_whose_record_save_fails_keep_memory_as_on_disk(engine, datapath, workdir):
    state = os.path.join(workdir, "state")
    v = engine.create_volume("v", 8 * MiB)
    staging, target = f"{workdir}/st", f"{workdir}/pod"
    datapath.stage(v.id, staging, block=True)
    datapath.publish(v.id, staging, target, block=True)
    blocker = os.path.join(state, "staging.json.tmp")
    os.mkdir(blocker)  # the record cannot be replaced (as on a full state dir, without filling one)
    try:
        for _ in range(2):  # the retry fails the same way: it must not answer OK with the publish on disk
            with pytest.raises(OSError):
                datapath.unpublish(v.id, target)
            assert target in datapath.record(v.id).publishes
    finally:
        os.rmdir(blocker)
    datapath.unpublish(v.id, target)
    assert _on_disk(state)[v.id]["publishes"] == {}
    os.mkdir(blocker)
    try:
        for _ in range(2):
            with pytest.raises(OSError):
                datapath.unstage(v.id, staging)
            assert datapath.record(v.id) is not None
    finally:
        os.rmdir(blocker)
    datapath.unstage(v.id, staging)
    assert v.id not in _on_disk(state)


def test_unpublish_and_unstage_work_on_a_full_state_dir(workdir):
    tiny = os.path.join(workdir, "tiny")
    os.mkdir(tiny)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", tiny], check=True)
    try:
        state = os.path.join(tiny, "state")
        eng = Engine.open(state, commit_interval=0.05)
        dp = DataPath(eng, state)
        dp.start()
        try:
            v = eng.create_volume("v", 8 * MiB)
            staging, target = f"{workdir}/st", f"{workdir}/pod"
            dp.stage(v.id, staging, block=True)
            dp.publish(v.id, staging, target, block=True)
            fill_to_last_byte(tiny)
            dp.unpublish(v.id, target)
            dp.unstage(v.id, staging)
            assert _on_disk(state) == {}
        finally:
            dp.stop(teardown=True)
            eng.close()
    finally:
        subprocess.run(["umount", "-l", tiny], check=False)


def test_publish_whose_record_save_fails_leaves_nothing_at_the_target(engine, datapath, workdir):
    state = os.path.join(workdir, "state")
    v = engine.create_volume("v", 8 * MiB)
    staging, target = f"{workdir}/st", f"{workdir}/pods/p1/dev"
    datapath.stage(v.id, staging, block=True)
    blocker = os.path.join(state, "staging.json.tmp")
    os.mkdir(blocker)
    try:
        with pytest.raises(OSError):
            datapath.publish(v.id, staging, target, block=True)
        rec = datapath.record(v.id)
        assert target not in rec.publishes and target not in (rec.made or [])
        assert not privileged.is_mountpoint(target)
        assert not os.path.exists(target)  # the file publish made for the bind goes with it
    finally:
        os.rmdir(blocker)
    datapath.publish(v.id, staging, target, block=True)
    assert target in _on_disk(state)[v.id]["publishes"]
    datapath.unpublish(v.id, target)
    datapath.unstage(v.id, staging)
