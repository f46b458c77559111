"""A group start split into phases across engines (engine.groups.GroupStart, invariant I7), in-process.

Two engines stand in for two nodes; a coordinator drives prepare -> start -> release. Checked: host writes to
a prepared source wait (they are neither in the copy nor lost), a write acknowledged before prepare is in the
copy, abort leaves no target, mapping or group, the watchdog aborts a prepared start nobody finishes, and a
start after the watchdog fired is refused.
"""

from __future__ import annotations

import threading
import time

import pytest

from csi_driver.engine import CopyItem, Engine, errors

MiB = 1 << 20


@pytest.fixture
def engines(tmp_path):
    es = [Engine.open(str(tmp_path / f"node{i}")) for i in range(2)]
    yield es
    for e in es:
        e.close()


def _source(e: Engine, name: str) -> str:
    v = e.create_volume(name, 4 * MiB, grain_size=64 * 1024)
    e.write(v.id, 0, b"A" * 4096)
    return v.id


def test_prepared_sources_hold_writes_until_release(engines) -> None:
    a, b = engines
    sa, sb = _source(a, "a"), _source(b, "b")
    starts = [e.begin_group_start([CopyItem(s, f"copy-{s}", volume_id=f"copy-{s}")], group_name="g1")
              for e, s in ((a, sa), (b, sb))]
    done = threading.Event()

    def late_write() -> None:
        a.write(sa, 0, b"B" * 4096)  # issued after prepare: must not be acknowledged before the release
        done.set()

    t = threading.Thread(target=late_write)
    t.start()
    assert not done.wait(0.3), "a write to a prepared source was acknowledged before the release"
    pairs = [gs.start() for gs in starts]
    assert not done.is_set()
    holds = [gs.release() for gs in starts]
    t.join(5)
    assert done.is_set() and all(h >= 0.3 for h in holds)
    (copy_a, _), = pairs[0]
    assert a.read(copy_a.id, 0, 4096) == b"A" * 4096  # the instant: before the held write
    assert a.read(sa, 0, 4096) == b"B" * 4096  # and the held write was not lost
    assert b.read(pairs[1][0][0].id, 0, 4096) == b"A" * 4096


def test_abort_after_start_leaves_nothing(engines) -> None:
    a, b = engines
    sa, sb = _source(a, "a"), _source(b, "b")
    before = [(len(e.list_volumes()), len(e.list_mappings()), len(e.list_groups())) for e in engines]
    ga = a.begin_group_start([CopyItem(sa, "ca", volume_id="ca")], group_name="g2")
    gb = b.begin_group_start([CopyItem(sb, "cb", volume_id="cb")], group_name="g2")
    ga.start()  # a started, then b "fails": the coordinator aborts both
    ga.release(abort=True)
    gb.release(abort=True)
    after = [(len(e.list_volumes()), len(e.list_mappings()), len(e.list_groups())) for e in engines]
    assert after == before
    a.write(sa, 0, b"C" * 10)  # no write is held any more
    with pytest.raises(errors.NotFound):
        a.get_volume("ca")


def test_watchdog_aborts_a_prepared_start(engines) -> None:
    a, _ = engines
    sa = _source(a, "a")
    gs = a.begin_group_start([CopyItem(sa, "ca", volume_id="ca")], group_name="g3", watchdog=0.3)
    t0 = time.monotonic()
    a.write(sa, 4096, b"x")  # waits for the watchdog's release
    assert 0.2 < time.monotonic() - t0 < 5
    assert gs.phase == "aborted"
    with pytest.raises(errors.InvalidState):
        gs.start()
    with pytest.raises(errors.NotFound):
        a.get_volume("ca")


def test_prepare_failure_holds_nothing(engines) -> None:
    a, _ = engines
    sa = _source(a, "a")
    with pytest.raises(errors.NotFound):
        a.begin_group_start([CopyItem(sa, "ca"), CopyItem("no-such-volume", "cb")], group_name="g4")
    a.write(sa, 0, b"y")  # not held
    assert [v.name for v in a.list_volumes()] == ["a"] and not a.list_groups()
