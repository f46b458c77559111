"""Operations benchmarks (issue 11): full clone, incremental refresh, restore in place, against plain file copies.

    python -m bench.bench_operations [--size-mib 1024] [--trials 5] [--dir /var/tmp] [--json out.json]

One source volume of --size-mib, grain 256 KiB, fully written with non-zero data, and a plain file holding the
same bytes. Every engine figure is set against a physical reference measured in the same run on the same
filesystem (both sides end with fdatasync): `cp --reflink=never` and a plain read+write copy for the full copies,
a read+write of only the changed grains for the refresh (the physical lower bound). Each row is the trial whose
ratio is the median of --trials; ratios are engine time / reference time (below 1: the engine is faster).
Prints a markdown table (the one in docs/bench-operations.md) and one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

from csi_driver.engine import Engine

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
GRAIN = 256 * KiB
IO = MiB
RATE = 150
POOL = 16  # distinct random 1 MiB buffers the fill cycles through (non-zero, not compressible)

Row = tuple[str, str, str, str]


def _median_pair(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """The (reference, engine) pair with the median ratio: the machine may be busy, ratios in one trial hold."""
    return sorted(pairs, key=lambda p: p[1] / p[0])[len(pairs) // 2]


def _gibs(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / GiB:.2f} GiB/s"


def _t(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


# -------------------------------------------------------------- physical references (plain files)

def fill_file(path: str, size: int, pool: list[bytes]) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for i, off in enumerate(range(0, size, IO)):
            os.pwrite(fd, pool[i % len(pool)], off)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def cp_copy(src: str, dst: str) -> float:
    """`cp --reflink=never` of the whole file, then fdatasync of the copy."""
    t = time.perf_counter()
    subprocess.run(["cp", "--reflink=never", src, dst], check=True)
    fd = os.open(dst, os.O_RDWR)
    os.fdatasync(fd)
    dt = time.perf_counter() - t
    os.close(fd)
    os.unlink(dst)
    return dt


def rw_copy(src: str, dst: str, size: int) -> float:
    """A plain read+write copy, 1 MiB at a time, then fdatasync."""
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    t = time.perf_counter()
    for off in range(0, size, IO):
        os.pwrite(dfd, os.pread(sfd, IO, off), off)
    os.fdatasync(dfd)
    dt = time.perf_counter() - t
    os.close(sfd)
    os.close(dfd)
    os.unlink(dst)
    return dt


def rw_copy_grains(src: str, dst: str, grains: list[int]) -> float:
    """Read+write of only these grains into an existing copy, then fdatasync: what a refresh must move at least."""
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)
    t = time.perf_counter()
    for g in sorted(grains):
        os.pwrite(dfd, os.pread(sfd, GRAIN, g * GRAIN), g * GRAIN)
    os.fdatasync(dfd)
    dt = time.perf_counter() - t
    os.close(sfd)
    os.close(dfd)
    return dt


# -------------------------------------------------------------- engine helpers

def eng_fill(eng: Engine, vid: str, size: int, pool: list[bytes]) -> None:
    for i, off in enumerate(range(0, size, IO)):
        eng.write(vid, off, pool[i % len(pool)])
    eng.flush()


def write_grains(eng: Engine, vid: str, grains: list[int], salt: int) -> None:
    """Overwrite whole grains with new non-zero data (a different pattern each call)."""
    for g in grains:
        eng.write(vid, g * GRAIN, _grain_data(g, salt))
    eng.flush()


def _grain_data(g: int, salt: int) -> bytes:
    head = f"grain {g} salt {salt} ".encode()
    return (head * (GRAIN // len(head) + 1))[:GRAIN]


def digest(eng: Engine, vid: str, size: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    for off in range(0, size, 8 * IO):
        h.update(eng.read(vid, off, min(8 * IO, size - off)))
    return h.hexdigest()


def until_independent(eng: Engine, start: Callable[[], Any]) -> tuple[float, float, Any]:
    """(time of the start call, time until no background copy is left and the target is flushed, its result)."""
    os.sync()  # even out what earlier steps left dirty
    t = time.perf_counter()
    out = start()
    t_start = time.perf_counter() - t
    eng.wait_copies()
    eng.flush()
    return t_start, time.perf_counter() - t, out


# -------------------------------------------------------------- the run

def run(base: str, size: int, trials: int, seed: int) -> tuple[list[Row], dict[str, Any]]:
    rng = random.Random(seed)
    pool = [os.urandom(IO) for _ in range(POOL)]
    ngrains = size // GRAIN
    rows: list[Row] = []
    fig: dict[str, Any] = {"size_mib": size // MiB, "grain_kib": GRAIN // KiB, "copy_rate": RATE, "trials": trials}
    d = tempfile.mkdtemp(dir=base, prefix="fc-bench-ops-")
    try:
        raw = os.path.join(d, "raw.img")
        fill_file(raw, size, pool)
        eng = Engine.open(os.path.join(d, "state"))  # background=True: the copier paces at the rate table
        src = eng.create_volume("src", size, grain_size=GRAIN)
        eng_fill(eng, src.id, size, pool)
        src_digest = digest(eng, src.id, size)

        # -- 1. full clone: background copy at rate 150 until independent, vs cp and a read+write copy
        clone_pairs_cp: list[tuple[float, float]] = []
        clone_pairs_rw: list[tuple[float, float]] = []
        clone_times = []
        for k in range(trials):
            _, t_clone, (c, _m) = until_independent(
                eng, functools.partial(eng.clone, src.id, f"full{k}", copy_rate=RATE, incremental=True))
            eng.delete_volume(c.id)
            os.sync()
            t_cp = cp_copy(raw, os.path.join(d, "cp.img"))
            os.sync()
            t_rw = rw_copy(raw, os.path.join(d, "rw.img"), size)
            clone_pairs_cp.append((t_cp, t_clone))
            clone_pairs_rw.append((t_rw, t_clone))
            clone_times.append(t_clone)
        r_cp, e_cp = _median_pair(clone_pairs_cp)
        r_rw, e_rw = _median_pair(clone_pairs_rw)
        t_full = statistics.median(clone_times)
        rows.append(("full clone, background copy at rate 150 until independent",
                     f"{_t(e_cp)} ({_gibs(size, e_cp)})", f"cp --reflink=never {_t(r_cp)} ({_gibs(size, r_cp)})",
                     f"{e_cp / r_cp:.2f}×"))
        rows.append(("", f"{_t(e_rw)} ({_gibs(size, e_rw)})", f"read+write copy {_t(r_rw)} ({_gibs(size, r_rw)})",
                     f"{e_rw / r_rw:.2f}×"))
        fig["clone"] = {"engine_s": t_full, "median_trial_cp": {"engine_s": e_cp, "cp_s": r_cp},
                        "median_trial_rw": {"engine_s": e_rw, "read_write_s": r_rw},
                        "ratio_cp": e_cp / r_cp, "ratio_rw": e_rw / r_rw}

        # -- 2. incremental refresh of an independent incremental clone after k% of the source's grains changed
        clone, _ = eng.clone(src.id, "dev", copy_rate=RATE, incremental=True)
        eng.wait_copies()
        eng.flush()
        ref = os.path.join(d, "ref.img")  # the plain-file clone the lower bound refreshes
        shutil.copyfile(raw, ref)
        fig["refresh"] = {}
        salt = 0
        for pct in (1, 10):
            nchg = max(1, ngrains * pct // 100)
            per: list[dict[str, Any]] = []
            for _ in range(trials):
                salt += 1
                changed = rng.sample(range(ngrains), nchg)
                on_clone = rng.randrange(ngrains)
                write_grains(eng, src.id, changed, salt)
                write_grains(eng, clone.id, [on_clone], salt)
                expected = len(set(changed) | {on_clone})
                t_inst, t_indep, (_m, dropped) = until_independent(
                    eng, lambda: eng.refresh(clone.id, src.id, copy_rate=RATE))
                equal = digest(eng, clone.id, size) == digest(eng, src.id, size)
                os.sync()
                t_lb = rw_copy_grains(raw, ref, sorted(set(changed) | {on_clone}))
                per.append({"changed": expected, "reported": dropped, "data_equal": equal, "instant_s": t_inst,
                            "independent_s": t_indep, "lower_bound_s": t_lb})
            mid = sorted(per, key=lambda p: p["independent_s"] / p["lower_bound_s"])[len(per) // 2]
            counts = sorted({(p["reported"], p["changed"]) for p in per})
            all_equal = all(p["data_equal"] for p in per)
            inst = statistics.median(p["instant_s"] for p in per)
            rows.append((f"refresh after {pct}% of source grains changed + 1 clone grain: grains reported / changed",
                         ", ".join(f"{r} / {c}" for r, c in counts),
                         "data equal to source after: " + ("yes" if all_equal else "NO"),
                         "match" if all(p["reported"] == p["changed"] for p in per) else "MISMATCH"))
            rows.append((f"refresh ({pct}%): refresh() call, the instant (p50)", _t(inst), "", ""))
            rows.append((f"refresh ({pct}%): until independent again vs full re-clone",
                         _t(mid["independent_s"]), f"full clone from 1. {_t(t_full)}",
                         f"{mid['independent_s'] / t_full:.3f}×"))
            rows.append((f"refresh ({pct}%): until independent again vs copy of only the changed bytes",
                         _t(mid["independent_s"]),
                         f"read+write of {mid['changed']} grains ({mid['changed'] * GRAIN / MiB:.1f} MiB) "
                         f"{_t(mid['lower_bound_s'])}",
                         f"{mid['independent_s'] / mid['lower_bound_s']:.2f}×"))
            fig["refresh"][f"{pct}%"] = {"trials": per, "median_trial": mid, "instant_p50_s": inst,
                                          "ratio_full_clone": mid["independent_s"] / t_full,
                                          "ratio_lower_bound": mid["independent_s"] / mid["lower_bound_s"]}
        eng.delete_volume(clone.id)
        os.unlink(ref)

        # -- 3. restore in place (reverse FlashCopy) of the source from a snapshot, after 10% of grains changed.
        # Each trial: a new snapshot, 10% of the grains written, restore (the snapshot is below the volume in
        # its cascade: FlashCopy's reverse mapping); then 10% written again and a second restore from the same
        # snapshot (the volume left that cascade when the first restore completed). The snapshot goes after.
        eng_fill(eng, src.id, size, pool)  # back to the fill's data (src_digest) where the refreshes wrote
        nchg = max(1, ngrains // 10)
        rst: dict[str, list[dict[str, Any]]] = {"first": [], "again": []}
        restored_ok = True
        for i in range(max(trials, 5)):
            snap, _ = eng.snapshot(src.id, f"golden{i}")
            for kind in ("first", "again"):
                salt += 1
                write_grains(eng, src.id, rng.sample(range(ngrains), nchg), salt)
                t_inst, t_back, m = until_independent(
                    eng, functools.partial(eng.restore, snap.id, src.id, copy_rate=RATE))
                restored_ok = restored_ok and digest(eng, src.id, size) == src_digest
                os.sync()
                t_rw = rw_copy(raw, os.path.join(d, "rw.img"), size)
                rst[kind].append({"instant_s": t_inst, "copy_back_s": t_back, "bytes_to_copy": m.bytes_to_copy,
                                  "reverse": m.restore, "reference_s": t_rw})
            eng.delete_volume(snap.id)
        fig["restore"] = {"data_equal": restored_ok}
        for kind, label in (("first", "restore"), ("again", "restore again from the same snapshot")):
            per = rst[kind]
            inst = statistics.median(p["instant_s"] for p in per)
            mid = sorted(per, key=lambda p: p["copy_back_s"] / p["reference_s"])[len(per) // 2]
            rows.append((f"{label}: restore() call, the instant (p50 of {len(per)})", _t(inst),
                         "data equal to the snapshot after: " + ("yes" if restored_ok else "NO"), ""))
            rows.append((f"{label}: copy back at rate 150 after 10% changed, until independent",
                         f"{_t(mid['copy_back_s'])} ({_gibs(size, mid['copy_back_s'])}), "
                         f"{mid['bytes_to_copy'] / MiB:.0f} MiB copied",
                         f"read+write copy of the whole file {_t(mid['reference_s'])} "
                         f"({_gibs(size, mid['reference_s'])})",
                         f"{mid['copy_back_s'] / mid['reference_s']:.2f}×"))
            fig["restore"][kind] = {"trials": per, "instant_p50_s": inst, "median_trial": mid,
                                    "ratio_whole_copy": mid["copy_back_s"] / mid["reference_s"]}
        eng.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return rows, fig


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--trials", type=int, default=5, help="trials per ratio (the restore instant: at least 5)")
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR", "/var/tmp"))
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--json", help="also write the raw figures here")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows, fig = run(a.dir, a.size_mib * MiB, max(1, a.trials), a.seed)
    fig["wall_s"] = time.perf_counter() - t0
    print(f"| measure ({a.size_mib} MiB volume, 256 KiB grains, copy rate {RATE}) | engine | reference | "
          "ratio (engine / reference time) |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(json.dumps(fig, separators=(",", ":")))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(fig, f, indent=1)


if __name__ == "__main__":
    main()
