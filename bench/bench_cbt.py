"""Changed-block tracking (issue 12): Delta and Allocated from the bitmaps vs reading both snapshots to compare.

    python -m bench.bench_cbt [--sparse-gib 64] [--changed-mib 1] [--full-mib 1024] [--ref-gib 8] [--dir DIR]

Two cases, on the engine (the CSI stream adds only paging and message encoding on top):
- a thin volume of --sparse-gib GiB with 64 MiB written, snapshot, --changed-mib MiB written (in 256 KiB
  pieces spread over the volume), snapshot;
- a --full-mib MiB volume written in full, snapshot, rewritten in full, snapshot.
For each: delta_extents and allocated_extents time (median of trials), time per GiB of changed data, and the
reference the CSI reference driver uses: read both snapshots block by block and compare (1 MiB reads), over at
most --ref-gib GiB of each and scaled linearly (reading 2 x 64 GiB of holes takes minutes). --full-mib must be
a multiple of 4.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

from csi_driver.engine import Engine

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 1 << 20


def _median(fn: Callable[[], object], trials: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(trials):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _compare(eng: Engine, a: str, b: str, size: int) -> int:
    """The reference: read both views in 1 MiB pieces, count the differing bytes' pieces."""
    differ = 0
    for off in range(0, size, CHUNK):
        n = min(CHUNK, size - off)
        if eng.read(a, off, n) != eng.read(b, off, n):
            differ += 1
    return differ


def _case(eng: Engine, label: str, size: int, before: list[tuple[int, bytes]], after: list[tuple[int, bytes]],
          trials: int, ref_limit: int) -> None:
    v = eng.create_volume(label, size).id
    for off, data in before:
        eng.write(v, off, data)
    s1, _ = eng.snapshot(v, f"{label}-s1")
    for off, data in after:
        eng.write(v, off, data)
    s2, _ = eng.snapshot(v, f"{label}-s2")
    changed = sum(len(d) for _, d in after)
    t_delta, ext = _median(lambda: eng.delta_extents(s1.id, s2.id), trials)
    t_alloc, alloc = _median(lambda: eng.allocated_extents(s2.id), trials)
    reported = sum(n for _, n in ext)  # type: ignore[union-attr]
    ref_size = min(size, ref_limit)
    t0 = time.perf_counter()
    _compare(eng, s1.id, s2.id, ref_size)
    t_ref = (time.perf_counter() - t0) * size / ref_size  # scaled when only the first ref_limit bytes are read
    scaled = f", measured over the first {ref_size / GiB:g} GiB and scaled" if ref_size < size else ""
    per_gib = t_delta / (changed / GiB)
    print(f"{label}: volume {size / GiB:g} GiB, changed {changed / MiB:g} MiB, delta reports "
          f"{reported / MiB:g} MiB in {len(ext)} extents")  # type: ignore[arg-type]
    print(f"  delta      {t_delta * 1000:9.2f} ms  ({per_gib * 1000:.1f} ms per GiB changed)")
    print(f"  allocated  {t_alloc * 1000:9.2f} ms  ({len(alloc)} extents)")  # type: ignore[arg-type]
    print(f"  reference  {t_ref * 1000:9.2f} ms  read both snapshots and compare "
          f"({size / GiB * 2 / t_ref:.2f} GiB/s{scaled}): delta is {t_ref / t_delta:.0f}x faster")
    eng.delete_volume(s2.id)
    eng.delete_volume(s1.id)
    eng.delete_volume(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_cbt", description=__doc__.splitlines()[0])
    p.add_argument("--sparse-gib", type=int, default=64)
    p.add_argument("--changed-mib", type=int, default=1)
    p.add_argument("--full-mib", type=int, default=1024)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--ref-gib", type=int, default=8,
                   help="the reference reads at most this much of each snapshot and scales its time linearly")
    p.add_argument("--dir", default=None, help="where the state dir goes (default: a temporary directory)")
    args = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="bench-cbt-", dir=args.dir)
    try:
        eng = Engine.open(os.path.join(root, "state"), background=False)
        try:
            size = args.sparse_gib * GiB
            piece = 256 * 1024
            n = max(1, args.changed_mib * MiB // piece)
            before = [(i * (size // 64), os.urandom(MiB)) for i in range(64)]
            after = [(i * (size // n) + 8 * MiB, os.urandom(piece)) for i in range(n)]
            _case(eng, "sparse", size, before, after, args.trials, args.ref_gib * GiB)
            full = args.full_mib * MiB
            block = bytes(range(256)) * (4 * MiB // 256)
            rewrite = bytes(reversed(range(256))) * (4 * MiB // 256)
            _case(eng, "rewritten", full, [(o, block) for o in range(0, full, 4 * MiB)],
                  [(o, rewrite) for o in range(0, full, 4 * MiB)], args.trials, args.ref_gib * GiB)
        finally:
            eng.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
