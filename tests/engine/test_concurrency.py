"""Many threads writing while snapshots are taken, copies run and mappings are deleted: no deadlock, no lost write."""

from __future__ import annotations

import random
import struct
import threading
import time

from csi_driver.engine import CopyItem, Engine

GRAIN = 64 * 1024
GRAINS_PER_WRITER = 4


def stamp(writer: int, seq: int) -> bytes:
    # a grain-sized record that says who wrote it and when: snapshots can be checked for order
    return struct.pack("<II", writer, seq) * (GRAIN // 8)


def parse(grain: bytes) -> tuple[int, int] | None:
    if grain == bytes(GRAIN):
        return None
    w, s = struct.unpack_from("<II", grain)
    assert grain == struct.pack("<II", w, s) * (GRAIN // 8), "torn grain"
    return w, s


def test_writers_snapshots_copies_deletes(tmp_path) -> None:
    eng = Engine.open(str(tmp_path), commit_interval=0.01)
    vols = [eng.create_volume(f"v{i}", 8 * GRAINS_PER_WRITER * GRAIN, grain_size=GRAIN).id for i in range(3)]
    stop = threading.Event()
    errors: list[BaseException] = []
    last: dict[tuple[str, int], int] = {}  # (volume, grain) -> last seq written
    # 8 writers per volume, each owns its own grains of that volume (same volume, different grains)
    writers = [(vid, w) for vid in vols for w in range(8)]

    def writer(vid: str, w: int) -> None:
        rng = random.Random(w)
        seq = 0
        try:
            while not stop.is_set():
                seq += 1
                g = w * GRAINS_PER_WRITER + rng.randrange(GRAINS_PER_WRITER)
                eng.write(vid, g * GRAIN, stamp(w, seq))
                last[(vid, g)] = seq
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    # (source, target, writes completed before the call, writes completed after it)
    snaps: list[tuple[str, str, dict, dict]] = []

    def snapshotter() -> None:
        rng = random.Random(99)
        n = 0
        try:
            while not stop.is_set():
                n += 1
                vid = rng.choice(vols)
                kind = rng.random()
                lo = dict(last)
                if kind < 0.5:
                    t, _ = eng.snapshot(vid, f"s{n}")
                elif kind < 0.8:
                    t, _ = eng.clone(vid, f"c{n}", copy_rate=150)
                else:
                    eng.snapshot_group([CopyItem(v, f"g{n}-{i}") for i, v in enumerate(vols)],
                                       group_name=f"grp{n}")
                    continue
                snaps.append((vid, t.id, lo, dict(last)))
                if len(snaps) > 6:  # delete from the middle of cascades too
                    _, old, _, _ = snaps.pop(rng.randrange(len(snaps) - 1))
                    eng.delete_volume(old)
                time.sleep(0.005)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=a) for a in writers]
    threads.append(threading.Thread(target=snapshotter))
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "deadlock: a thread did not finish"
    assert not errors, errors
    # no lost write: every grain holds the last record its writer wrote
    for (vid, g), seq in last.items():
        rec = parse(eng.read(vid, g * GRAIN, GRAIN))
        assert rec is not None and rec[1] == seq, (vid, g, rec, seq)
    # every remaining snapshot and clone is a point in time inside its call: no torn grain, every write
    # finished before the call is in it, no write started after the call is
    assert eng.wait_copies(60)
    for vid, tid, lo, hi in snaps:
        for g in range(8 * GRAINS_PER_WRITER):
            rec = parse(eng.read(tid, g * GRAIN, GRAIN))
            seq = rec[1] if rec else 0
            assert lo.get((vid, g), 0) <= seq <= hi.get((vid, g), 0) + 1, (tid, g, seq)
    eng.close()
    eng = Engine.open(str(tmp_path))
    for (vid, g), seq in last.items():
        assert parse(eng.read(vid, g * GRAIN, GRAIN))[1] == seq
    eng.close()
