"""Engine benchmarks: every figure is a ratio against the physical reference measured in the same run.

    python -m bench.bench_engine [--size-mib 1024] [--dir /var/tmp] [--json out.json]

Prints a markdown table (the one in docs/engine.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import threading
import time

from csi_driver.engine import CopyItem, Engine

MiB = 1024 * 1024
GiB = 1024 * MiB
IO = MiB


TRIALS = 3


def _median_pair(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """The (reference, engine) pair with the median ratio: the machine may be busy, ratios in one trial hold."""
    return sorted(pairs, key=lambda p: p[1] / p[0])[len(pairs) // 2]


def _buf() -> bytes:
    return os.urandom(IO)


def raw_write(path: str, size: int, buf: bytes) -> float:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    t = time.perf_counter()
    for off in range(0, size, IO):
        os.pwrite(fd, buf, off)
    os.fdatasync(fd)
    dt = time.perf_counter() - t
    os.close(fd)
    return dt


def raw_overwrite(path: str, size: int, buf: bytes) -> float:
    return raw_write(path, size, buf)  # the file exists and is allocated: same as owned-grain writes


def raw_read(path: str, size: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    t = time.perf_counter()
    for off in range(0, size, IO):
        os.pread(fd, IO, off)
    dt = time.perf_counter() - t
    os.close(fd)
    return dt


def eng_write(eng: Engine, vid: str, size: int, buf: bytes) -> float:
    t = time.perf_counter()
    for off in range(0, size, IO):
        eng.write(vid, off, buf)
    eng.flush()
    return time.perf_counter() - t


def eng_read(eng: Engine, vid: str, size: int) -> float:
    t = time.perf_counter()
    for off in range(0, size, IO):
        eng.read(vid, off, IO)
    return time.perf_counter() - t


def drop_caches() -> None:
    # reads are compared warm-vs-warm; this only evens out what earlier steps left behind
    os.sync()


def run(base: str, size: int) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    buf = _buf()
    d = tempfile.mkdtemp(dir=base, prefix="fc-bench-")
    try:
        raw = os.path.join(d, "raw.img")
        eng = Engine.open(os.path.join(d, "state"))
        # -- snapshot start latency, small and huge volume
        small = eng.create_volume("small", 64 * MiB)
        huge = eng.create_volume("huge", 64 * GiB)
        eng.write(small.id, 0, buf)
        eng.write(huge.id, 0, buf)
        lat: dict[str, list[float]] = {"small": [], "huge": []}
        for i in range(40):
            for name, vid in (("small", small.id), ("huge", huge.id)):
                t = time.perf_counter()
                s, _ = eng.snapshot(vid, f"lat-{name}-{i}")
                lat[name].append(time.perf_counter() - t)
                eng.delete_volume(s.id)
        p50s, p50h = statistics.median(lat["small"]), statistics.median(lat["huge"])
        rows.append(("snapshot start p50 (64 MiB / 64 GiB volume)", f"{p50s * 1e3:.2f} ms / {p50h * 1e3:.2f} ms",
                     f"ratio {p50h / p50s:.2f}", "p50 ≤ 5 ms, ratio ≤ 1.2"))
        eng.delete_volume(small.id)
        eng.delete_volume(huge.id)

        # -- owned-grain writes vs raw pwrite (alternating trials, median of the ratios)
        raw_write(raw, size, buf)
        vol = eng.create_volume("vol", size)
        eng_write(eng, vol.id, size, buf)
        pairs = []
        for _ in range(TRIALS):
            pairs.append((raw_overwrite(raw, size, buf), eng_write(eng, vol.id, size, buf)))
        t_raw, t_eng = _median_pair(pairs)
        rows.append(("writes to owned grains (1 MiB, + flush)", f"{size / t_eng / MiB:.0f} MiB/s",
                     f"{t_raw / t_eng:.0%} of raw pwrite ({size / t_raw / MiB:.0f} MiB/s)", "≥ 90%"))

        # -- first-touch writes that copy-on-write, vs raw pwrite into a fresh file (both end with a flush)
        pairs = []
        for i in range(TRIALS):
            snap, _ = eng.snapshot(vol.id, f"snap{i}")
            t_cow = eng_write(eng, vol.id, size, _buf())
            os.unlink(raw)
            pairs.append((raw_write(raw, size, buf), t_cow))
            if i < TRIALS - 1:
                eng.delete_volume(snap.id)
        t_raw_fresh, t_cow = _median_pair(pairs)
        rows.append(("first-touch writes with copy-on-write", f"{size / t_cow / MiB:.0f} MiB/s",
                     f"{t_raw_fresh / t_cow:.0%} of raw pwrite ({size / t_raw_fresh / MiB:.0f} MiB/s)", "≥ 40%"))

        # -- reads of the target through indirection (its data sits in the source... and in itself)
        clone, _ = eng.clone(vol.id, "reader", copy_rate=0)  # owns nothing: every read goes upstream
        eng_read(eng, clone.id, size)
        raw_read(raw, size)
        t_rr, t_ind = _median_pair([(raw_read(raw, size), eng_read(eng, clone.id, size)) for _ in range(TRIALS)])
        rows.append(("target reads through indirection", f"{size / t_ind / MiB:.0f} MiB/s",
                     f"{t_rr / t_ind:.0%} of raw pread ({size / t_rr / MiB:.0f} MiB/s)", "≥ 90%"))
        eng.delete_volume(clone.id)
        eng.delete_volume(snap.id)

        # -- source write cost with 1 vs 256 snapshots (first-touch writes, the CoW case)
        span = min(size, 256 * MiB)
        trials: list[tuple[float, float]] = []
        for k in range(TRIALS):
            costs = {}
            for nsnap in (1, 256):
                src = eng.create_volume(f"src{nsnap}-{k}", span)
                eng_write(eng, src.id, span, buf)
                made = [eng.snapshot(src.id, f"m{nsnap}-{k}-{i}")[0].id for i in range(nsnap)]
                costs[nsnap] = eng_write(eng, src.id, span, _buf())  # every write copies-on-write
                for sid in made:
                    eng.delete_volume(sid)
                eng.delete_volume(src.id)
            trials.append((costs[1], costs[256]))
        c1, c256 = _median_pair(trials)
        rows.append(("source write cost, 256 snapshots vs 1", f"{span / c256 / MiB:.0f} vs "
                     f"{span / c1 / MiB:.0f} MiB/s", f"{c256 / c1:.2f}×", "≤ 1.2×"))

        # -- background copy at the top rate vs os.copy_file_range (both to disk, alternating trials)
        eng.write(vol.id, 0, buf)
        pairs = []
        for k in range(TRIALS):
            t = time.perf_counter()
            c, _ = eng.clone(vol.id, f"bg{k}", copy_rate=150)
            eng.wait_copies()
            eng.flush()
            t_bg = time.perf_counter() - t
            eng.delete_volume(c.id)
            dst = os.path.join(d, f"copy{k}.img")
            sfd, dfd = os.open(raw, os.O_RDONLY), os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
            t = time.perf_counter()
            off = 0
            while off < size:
                off += os.copy_file_range(sfd, dfd, size - off, off, off)
            os.fdatasync(dfd)
            pairs.append((time.perf_counter() - t, t_bg))
            os.close(sfd)
            os.close(dfd)
            os.unlink(dst)
        t_cfr, t_bg = _median_pair(pairs)
        rows.append(("background copy at rate 150", f"{size / t_bg / MiB:.0f} MiB/s",
                     f"{t_cfr / t_bg:.0%} of copy_file_range ({size / t_cfr / MiB:.0f} MiB/s)", "≥ 80%"))

        # -- consistency group of 16: start time and host-write hold
        members = [eng.create_volume(f"cg{i}", 64 * MiB).id for i in range(16)]
        for vid in members:
            eng.write(vid, 0, buf)
        worst = [0.0]
        stop = threading.Event()

        def writer() -> None:
            i = 0
            while not stop.is_set():
                t0 = time.perf_counter()
                eng.write(members[i % 16], (i % 32) * 65536, buf[:65536])
                worst[0] = max(worst[0], time.perf_counter() - t0)
                i += 1
                time.sleep(0.0005)

        starts, holds = [], []
        for k in range(10):
            th = threading.Thread(target=writer)
            th.start()
            time.sleep(0.02)
            worst[0] = 0.0
            t = time.perf_counter()
            eng.snapshot_group([CopyItem(v, f"cg{k}-{i}") for i, v in enumerate(members)],
                               group_name=f"cg{k}")
            starts.append(time.perf_counter() - t)
            holds.append(eng.last_start_hold)
            stop.set()
            th.join()
            stop.clear()
        rows.append(("consistency group of 16: start / host writes held", f"{statistics.median(starts) * 1e3:.1f} ms"
                     f" / {statistics.median(holds) * 1e3:.1f} ms", f"worst write latency {worst[0] * 1e3:.1f} ms",
                     "≤ 25 ms / ≤ 10 ms"))
        eng.close()

        # -- RSS with 1000 volumes and 1000 snapshots open
        eng = Engine.open(os.path.join(d, "many"))
        for i in range(1000):
            v = eng.create_volume(f"many{i}", 1 * GiB)
            eng.write(v.id, 0, buf[:4096])
            eng.snapshot(v.id, f"many-s{i}")
        eng.close()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        eng = Engine.open(os.path.join(d, "many"))
        for v in eng.list_volumes():
            eng.read(v.id, 0, 4096)  # opens every data file
        rss = _rss_mib()
        rows.append(("engine RSS, 1000 volumes + 1000 snapshots open", f"{rss:.0f} MiB (process)",
                     f"peak before reopen {rss_before / 1024:.0f} MiB", "≤ 150 MiB"))
        eng.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return rows


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR", "/var/tmp"))
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = run(a.dir, a.size_mib * MiB)
    print(f"| measure ({a.size_mib} MiB file, 1 MiB I/O) | engine | ratio / reference | target |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
