"""`make bench`: every benchmark in turn, each printing its own same-run ratios (see docs/*.md for the figures).

    python -m bench.run_all [--quick]

--quick runs each with small sizes (a smoke run, minutes instead of a quarter of an hour); the data path
benchmark needs root, /dev/fuse, loop devices and fio, and is skipped with the reason where they are missing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from csi_driver.datapath import datapath_unavailable

FULL = {
    "bench_engine": ["--size-mib", "1024"],
    "bench_csi": ["--snapshots", "200"],
    "bench_datapath": [],
    "bench_multinode": ["--snapshots", "100", "--groups", "20"],
    "bench_operations": ["--size-mib", "1024"],
    "bench_cbt": ["--sparse-gib", "64", "--full-mib", "1024"],
}
QUICK = {
    "bench_engine": ["--size-mib", "128"],
    "bench_csi": ["--snapshots", "20"],
    "bench_datapath": ["--size-mib", "256", "--trials", "1", "--rand-mib", "16"],
    "bench_multinode": ["--snapshots", "20", "--groups", "5"],
    "bench_operations": ["--size-mib", "64"],
    "bench_cbt": ["--sparse-gib", "4", "--full-mib", "64", "--ref-gib", "1", "--trials", "3"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    failed = []
    for name, extra in plan.items():
        if name in ("bench_datapath", "bench_multinode"):  # node engines mount FUSE exports
            why = datapath_unavailable()
            if why:
                print(f"== {name}: skipped ({why})", flush=True)
                continue
        print(f"== {name} {' '.join(extra)}", flush=True)
        if subprocess.call([sys.executable, "-m", f"bench.{name}", *extra]) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
