"""Node data path benchmark: the full path vs a physical reference, measured in the same run.

    python -m bench.bench_datapath [--size-mib 2048] [--rand-mib 64] [--trials 3] [--dir /var/tmp]
                                   [--quick] [--busy | --both] [--json out.json]

--quick: a smoke run (256 MiB device, 16 MiB random runs, 1 trial; explicit options win). --busy: only the busy
variant, os.cpu_count() CPU burner processes (busy loops at normal priority) keeping every core busy through
every measure, both sides; --both: the idle rows, then the busy rows; default: idle only. The table header says
which ran. The burners are killed at the end like every other resource (also on an error or SIGTERM), and end by
themselves if the bench dies.

Needs root, /dev/fuse and loop devices (and the compiled FUSE loop for the fast path). The two devices
compared, same size, same filesystem:

- full path: an engine volume staged by DataPath as a raw block device, i.e. engine data file <- engine
  <- FUSE export file <- loop device with direct I/O (`losetup --direct-io=on`);
- reference: a plain file on the same filesystem <- loop device with direct I/O.

Both are driven with the same fio jobs (direct I/O on the device; fio is a Debian package, see
.ci/setup-system.sh), or with a small built-in O_DIRECT loop when fio is missing. Every write figure includes
the device flush that makes it durable (the engine buffers in its data files' page cache; the reference writes
through). Trials alternate which side runs first; the trial with the median ratio is reported.

Sequential writes are measured twice: into freshly allocated space (a new volume / a new sparse file: every
block is allocated by the host filesystem on first write) and into already-written space (the same volume /
file again, the steady state of a volume in use). Reads are measured warm (whatever the page cache holds after
writing: the engine's data files are buffered, the reference bypasses the cache) and cold (the engine's data
file evicted first with POSIX_FADV_DONTNEED).

Every fio row also reports µs CPU per I/O: the user+system CPU seconds of the bench process itself
(getrusage(RUSAGE_SELF): the engine and the FUSE server threads; fio and the burners are children and are not
counted), sampled just before fio starts and after the flush that follows it, divided by the I/Os fio completed
(total_ios). The reference's column is the sanity check: the kernel does its work, so it is ~0 (the bench's own
overhead of starting fio, plus any engine background work overlapping the job).

Targets (ratio to the reference): random 4 KiB read QD16 >= 60 %, random 4 KiB write QD16 (+ flush) >= 40 %,
sequential 1 MiB read (warm and cold) >= 80 %, sequential 1 MiB write into already-written space >= 80 % (fresh
space is reported); the "met" column marks each row.

The freeze window (time from the first FIFREEZE to the last thaw, measured inside DataPath's quiesce hook)
is taken for one mounted ext4 volume and for a 3-volume group snapshot, each filesystem holding 32 MiB of dirty
page cache; the reference is freezing and thawing ext4 on the reference loop devices with the same load.

Every mount, loop device and the FUSE mount are removed at the end, also on failure or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import glob
import json
import mmap
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from csi_driver.datapath import privileged
from csi_driver.engine.model import CopyItem

MiB = 1 << 20
SEQ_BS = MiB
RAND_BS = 4096
SEQ_QD = 4  # what a filesystem's writeback or a readahead stream keeps in flight
RAND_QD = 16
DIRTY = 32 * MiB  # dirty page cache per filesystem when freezing
FREEZE_VOL = 512 * MiB
FREEZE_ROUNDS = 5


# ---------------------------------------------------------------------------------------------- I/O drivers


@dataclasses.dataclass
class Run:
    """One measured I/O run: bytes moved, I/Os issued, and seconds (I/O time + the flush after writes)."""

    nbytes: int
    ios: int
    seconds: float
    #: user+system CPU seconds of this process (engine + FUSE threads) across the run and its flush; None when
    #: the driver itself runs in this process (PyDirect) and cannot be told apart from the engine
    cpu: float | None = None

    @property
    def mib_s(self) -> float:
        return self.nbytes / self.seconds / MiB

    @property
    def iops(self) -> float:
        return self.ios / self.seconds

    @property
    def cpu_us_per_io(self) -> float | None:
        return None if self.cpu is None or not self.ios else self.cpu / self.ios * 1e6


def self_cpu() -> float:
    """User+system CPU seconds of this process, all its threads; children (fio, the burners) are not in it.

    getrusage(RUSAGE_SELF) rather than os.times(): the same fields at microsecond resolution instead of clock ticks
    (10 ms would be 39 µs per I/O on a 256-request run)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def flush_device(dev: str) -> float:
    """fsync the device (REQ_FLUSH down the loop device: for the full path it reaches engine.flush)."""
    t = time.perf_counter()
    fd = os.open(dev, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


class Fio:
    name = "fio"

    def run(self, dev: str, rw: str, bs: int, qd: int, size: int, io_bytes: int) -> Run:
        argv = ["fio", "--name=bench", f"--filename={dev}", f"--rw={rw}", f"--bs={bs}", f"--size={size}",
                f"--io_size={io_bytes}", "--direct=1", "--ioengine=libaio", f"--iodepth={qd}",
                "--randrepeat=1", "--norandommap", "--group_reporting", "--output-format=json"]
        cpu0 = self_cpu()
        out = privileged.run(argv, timeout=600).stdout
        seconds = 0.0
        if "write" in rw:
            seconds += flush_device(dev)
        cpu = self_cpu() - cpu0
        job = json.loads(out[out.index("{"):])["jobs"][0]
        side = job["write"] if "write" in rw else job["read"]
        if job.get("error"):
            raise RuntimeError(f"fio {rw} on {dev}: error {job['error']}")
        seconds += side["runtime"] / 1000.0
        ios = side.get("total_ios") or side["io_bytes"] // bs
        return Run(side["io_bytes"], ios, seconds, cpu)


class PyDirect:
    """Fallback without fio: one O_DIRECT request at a time (queue depth 1, so ratios only, not fio's)."""

    name = "built-in O_DIRECT loop (queue depth 1)"

    def run(self, dev: str, rw: str, bs: int, qd: int, size: int, io_bytes: int) -> Run:
        write = "write" in rw
        buf = mmap.mmap(-1, bs)  # page aligned, as O_DIRECT wants
        buf.write(os.urandom(bs))
        fd = os.open(dev, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
        rng = random.Random(1)
        n = io_bytes // bs
        try:
            t = time.perf_counter()
            for i in range(n):
                off = rng.randrange(size // bs) * bs if rw.startswith("rand") else (i * bs) % size
                if write:
                    os.pwritev(fd, [buf], off)
                else:
                    os.preadv(fd, [buf], off)
            if write:
                os.fsync(fd)
            return Run(n * bs, n, time.perf_counter() - t)
        finally:
            os.close(fd)


def driver() -> Fio | PyDirect:
    return Fio() if shutil.which("fio") else PyDirect()


# ---------------------------------------------------------------------------------------------- resources


class Resources:
    """Everything the bench sets up under its work dir, torn down in reverse order whatever happens."""

    def __init__(self, workdir: str):
        self.workdir = os.path.realpath(workdir)
        self.undo: list[Callable[[], None]] = []

    def add(self, fn: Callable[[], None]) -> None:
        self.undo.append(fn)

    def close(self) -> None:
        for fn in reversed(self.undo):
            try:
                fn()
            except Exception as e:  # keep going: the sweep below catches what this step missed
                print(f"cleanup step failed: {e}", file=sys.stderr)
        self.undo.clear()
        self.sweep()

    def sweep(self) -> None:
        """Last resort: unmount anything under the work dir, detach loops backed by files under it."""
        root = self.workdir
        for m in sorted((m for m in privileged.mounts() if m.mount_point.startswith(root + "/")),
                        key=lambda m: -len(m.mount_point)):
            if not m.fstype.startswith("fuse"):
                with contextlib.suppress(Exception):
                    privileged.umount(m.mount_point, lazy=True)
        for lo in privileged.list_loops():
            if lo.backing_file.startswith(root + "/"):
                with contextlib.suppress(Exception):
                    privileged.detach_loop(lo.device)
        for m in privileged.mounts():
            if m.mount_point.startswith(root + "/"):
                with contextlib.suppress(Exception):
                    privileged.umount(m.mount_point, lazy=True)


class RefDevice:
    """The physical reference: a sparse file on the same filesystem behind a loop device with direct I/O."""

    def __init__(self, res: Resources, path: str, size: int):
        self.path = path
        with open(path, "wb") as f:
            f.truncate(size)
        self.dev = privileged.attach_loop(path, direct_io=True)
        self.mount_point = ""
        res.add(self.close)

    def mount_ext4(self, mount_point: str) -> None:
        privileged.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", self.dev])
        os.makedirs(mount_point, exist_ok=True)
        privileged.mount(self.dev, mount_point, fstype="ext4")
        self.mount_point = mount_point

    def close(self) -> None:
        if self.mount_point:
            privileged.umount(self.mount_point)
            self.mount_point = ""
        if self.dev:
            privileged.detach_loop(self.dev)
            self.dev = ""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class FullPath:
    """The engine and its DataPath in this process (the FUSE loop runs on its own threads)."""

    def __init__(self, res: Resources, state_dir: str):
        from csi_driver.datapath import DataPath
        from csi_driver.engine import Engine

        self.engine = Engine.open(state_dir)
        res.add(self.engine.close)
        self.dp = DataPath(self.engine, state_dir)
        self.dp.start()
        res.add(lambda: self.dp.stop(teardown=True))
        self.state_dir = state_dir

    def stage(self, name: str, size: int, staging: str, *, block: bool) -> tuple[str, str]:
        vol = self.engine.create_volume(name, size)
        rec = self.dp.stage(vol.id, staging, block=block, fs_type="" if block else "ext4")
        return vol.id, rec.loop_device

    def drop(self, vid: str, staging: str) -> None:
        self.dp.unstage(vid, staging)
        self.engine.delete_volume(vid)

    def evict(self, vid: str) -> None:
        """Drop the volume's data file from the page cache (it is clean after the flush)."""
        for path in glob.glob(os.path.join(self.state_dir, "volumes", f"{vid}.*")):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def evict_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM becomes SystemExit so the cleanup in `finally` blocks runs."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


#: a burner: a busy loop at normal priority that also ends by itself when the bench dies (its parent changes),
#: in case the bench is killed by a signal no cleanup can catch
BURN = "import os\np = os.getppid()\nwhile os.getppid() == p:\n    for _ in range(1000000):\n        pass\n"


class Burners:
    """os.cpu_count() busy-loop processes keeping every core busy; killed by close() (a Resources undo step)."""

    def __init__(self, res: Resources, n: int):
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started = time.monotonic()
        res.add(self.close)
        for _ in range(n):
            self.procs.append(subprocess.Popen([sys.executable, "-c", BURN], stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)  # let them get going before the first job
        dead = [p.pid for p in self.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"CPU burners {dead} exited at once")

    def cpu_seconds(self) -> float:
        """CPU seconds the burners used so far (utime + stime from /proc)."""
        total = 0
        for p in self.procs:
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{p.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in self.procs:
            p.wait()
        self.procs.clear()


# ---------------------------------------------------------------------------------------------- measures


Pair = tuple[Run, Run]  # (reference, full path)


def median_pair(pairs: list[Pair], *, higher_is_better: Callable[[Run], float]) -> Pair:
    """The (reference, full) pair whose ratio is the median: on a busy machine ratios hold within a trial."""
    return sorted(pairs, key=lambda p: higher_is_better(p[1]) / higher_is_better(p[0]))[len(pairs) // 2]


def alternate(i: int, ref: Callable[[], Run], full: Callable[[], Run]) -> Pair:
    if i % 2 == 0:
        r = ref()
        return r, full()
    f = full()
    return ref(), f


def check_dio(devs: list[str], notes: list[str]) -> None:
    """Both sides must really run with direct I/O on the loop device, or the comparison is off."""
    dio = {lo.device: lo.direct_io for lo in privileged.list_loops()}
    for d in devs:
        if not dio.get(d):
            notes.append(f"WARNING: {d} runs without direct I/O (the kernel refused it); figures are not comparable")


def io_measures(base: str, res: Resources, fp: FullPath, size: int, trials: int, io: Fio | PyDirect,
                rand_bytes: int, notes: list[str], prefix: str = "") -> dict[str, list[Pair]]:
    out: dict[str, list[Pair]] = {k: [] for k in (
        "write_fresh", "write_written", "read_warm", "read_cold", "randread", "randwrite")}
    for i in range(trials):
        ref = RefDevice(res, os.path.join(base, f"ref{i}.img"), size)
        staging = os.path.join(base, "stage", f"blk{i}")
        vid, dev = fp.stage(f"{prefix}blk{i}", size, staging, block=True)
        check_dio([ref.dev, dev], notes)

        def seq(d: str, rw: str) -> Callable[[], Run]:
            return lambda: io.run(d, rw, SEQ_BS, SEQ_QD, size, size)

        def rnd(d: str, rw: str) -> Callable[[], Run]:
            return lambda: io.run(d, rw, RAND_BS, RAND_QD, size, rand_bytes)

        out["write_fresh"].append(alternate(i, seq(ref.dev, "write"), seq(dev, "write")))
        out["write_written"].append(alternate(i, seq(ref.dev, "write"), seq(dev, "write")))
        out["read_warm"].append(alternate(i, seq(ref.dev, "read"), seq(dev, "read")))

        def cold(d: str, evict: Callable[[], None]) -> Callable[[], Run]:
            def go() -> Run:
                evict()
                return io.run(d, "read", SEQ_BS, SEQ_QD, size, size)
            return go

        out["read_cold"].append(alternate(i, cold(ref.dev, functools.partial(evict_file, ref.path)),
                                          cold(dev, functools.partial(fp.evict, vid))))
        out["randread"].append(alternate(i, rnd(ref.dev, "randread"), rnd(dev, "randread")))
        out["randwrite"].append(alternate(i, rnd(ref.dev, "randwrite"), rnd(dev, "randwrite")))
        fp.drop(vid, staging)
        ref.close()
        res.undo.remove(ref.close)
    return out


def dirty(mount_point: str, tag: str) -> None:
    """Leave DIRTY bytes of buffered writes in the filesystem's page cache (no fsync: the freeze flushes)."""
    chunk = os.urandom(MiB)
    with open(os.path.join(mount_point, f"dirty-{tag}"), "wb") as f:
        for _ in range(DIRTY // MiB):
            f.write(chunk)


def freeze_measures(base: str, res: Resources, fp: FullPath, prefix: str = "") -> dict[str, list[tuple[float, float]]]:
    """(reference freeze+thaw, full-path freeze window in the quiesce hook) per round, single and group.

    prefix: for the engine's names (volumes, snapshots, groups: a group outlives its deleted snapshots), unique
    per call on one engine."""
    refs = []
    for k in range(3):
        r = RefDevice(res, os.path.join(base, f"fref{k}.img"), FREEZE_VOL)
        r.mount_ext4(os.path.join(base, "mnt", f"ref{k}"))
        refs.append(r)
    vols = []
    for k in range(3):
        staging = os.path.join(base, "stage", f"fs{k}")
        vid, _dev = fp.stage(f"{prefix}fs{k}", FREEZE_VOL, staging, block=False)
        vols.append((vid, staging))
    out: dict[str, list[tuple[float, float]]] = {"single": [], "group": [], "single_hold": [], "group_hold": []}
    eng, dp = fp.engine, fp.dp
    for rnd in range(FREEZE_ROUNDS):
        for kind, n in (("single", 1), ("group", 3)):
            def ref_side(n: int = n, tag: str = f"{prefix}{kind}{rnd}") -> float:
                for r in refs[:n]:
                    dirty(r.mount_point, tag)
                t = time.monotonic()
                with privileged.frozen([r.mount_point for r in refs[:n]]):
                    pass
                return time.monotonic() - t

            def full_side(n: int = n, tag: str = f"{prefix}{kind}{rnd}", kind: str = kind) -> float:
                for _vid, staging in vols[:n]:
                    dirty(staging, tag)
                if n == 1:
                    snap, _ = eng.snapshot(vols[0][0], f"s-{tag}", quiesce=dp.quiesce)
                    made = [snap.id]
                else:
                    _g, pairs = eng.snapshot_group([CopyItem(vid, f"g-{tag}-{j}")
                                                    for j, (vid, _s) in enumerate(vols[:n])],
                                                   group_name=f"g-{tag}", quiesce=dp.quiesce)
                    made = [v.id for v, _m in pairs]
                window = dp.last_freeze_window
                out[f"{kind}_hold"].append((0.0, eng.last_start_hold))
                for sid in made:
                    eng.delete_volume(sid)
                return window

            if rnd % 2 == 0:
                a = ref_side()
                out[kind].append((a, full_side()))
            else:
                b = full_side()
                out[kind].append((ref_side(), b))
    for vid, staging in vols:
        fp.drop(vid, staging)
    for r in refs:
        r.close()
        res.undo.remove(r.close)
    return out


# ---------------------------------------------------------------------------------------------- report


COLUMNS = ("measure", "load", "full path", "reference (loop dio on a plain file)", "ratio",
           "µs CPU per I/O, full path", "µs CPU per I/O, reference", "target", "met")


def cpu_col(r: Run) -> str:
    us = r.cpu_us_per_io
    return "n/a" if us is None else f"{us:.1f} µs" if us >= 10 else f"{us:.2f} µs"


def met(ratio: float, target: float | None) -> str:
    return "–" if target is None else ("yes" if ratio >= target else "**MISS**")


def target_col(target: float | None) -> str:
    return "reported" if target is None else f"≥ {target:.0%}"


def variant_rows(work: str, res: Resources, fp: FullPath, io: Fio | PyDirect, size: int, trials: int,
                 rand_bytes: int, load: str, notes: list[str], prefix: str) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    m = io_measures(work, res, fp, size, trials, io, rand_bytes, notes, prefix)

    def bw(key: str, label: str, target: float | None) -> None:
        ref, full = median_pair(m[key], higher_is_better=lambda r: r.mib_s)
        ratio = full.mib_s / ref.mib_s
        rows.append((label, load, f"{full.mib_s:.0f} MiB/s", f"{ref.mib_s:.0f} MiB/s", f"{ratio:.0%}",
                     cpu_col(full), cpu_col(ref), target_col(target), met(ratio, target)))

    def iops(key: str, label: str, target: float | None) -> None:
        ref, full = median_pair(m[key], higher_is_better=lambda r: r.iops)
        ratio = full.iops / ref.iops
        rows.append((label, load, f"{full.iops:.0f} IOPS", f"{ref.iops:.0f} IOPS", f"{ratio:.0%}",
                     cpu_col(full), cpu_col(ref), target_col(target), met(ratio, target)))

    bw("write_written", f"seq write 1 MiB QD{SEQ_QD}, already-written space (+ flush)", 0.80)
    bw("write_fresh", f"seq write 1 MiB QD{SEQ_QD}, freshly allocated space (+ flush)", None)
    bw("read_warm", f"seq read 1 MiB QD{SEQ_QD}, warm (after writing)", 0.80)
    bw("read_cold", f"seq read 1 MiB QD{SEQ_QD}, cold (engine file evicted)", 0.80)
    iops("randread", f"random read 4 KiB QD{RAND_QD}", 0.60)
    iops("randwrite", f"random write 4 KiB QD{RAND_QD} (+ flush)", 0.40)

    fz = freeze_measures(work, res, fp, prefix)
    for kind, label in (("single", "freeze window, 1 mounted ext4"),
                        ("group", "freeze window, 3-volume group snapshot")):
        full_ms = [f * 1e3 for _r, f in fz[kind]]
        ref_ms = [r * 1e3 for r, _f in fz[kind]]
        hold = statistics.median(h for _z, h in fz[f"{kind}_hold"]) * 1e3
        rows.append((label, load, f"p50 {statistics.median(full_ms):.0f} ms, max {max(full_ms):.0f} ms "
                                  f"(engine start {hold:.1f} ms)",
                     f"p50 {statistics.median(ref_ms):.0f} ms, max {max(ref_ms):.0f} ms",
                     f"{statistics.median(full_ms) / statistics.median(ref_ms):.1f}×", "–", "–",
                     "bounded (10 s watchdog)", "yes" if max(full_ms) < 10_000 else "**MISS**"))
    return rows


def run(base_dir: str, size: int, trials: int, rand_bytes: int, loads: tuple[str, ...]
        ) -> tuple[list[tuple[str, ...]], str, list[str]]:
    """loads: "idle" and/or "busy" (os.cpu_count() burners running through every measure, both sides)."""
    io = driver()
    work = tempfile.mkdtemp(dir=base_dir, prefix="fc-dp-bench-")
    res = Resources(work)
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    try:
        with sigterm_raises():
            fp = FullPath(res, os.path.join(work, "state"))
            for k, load in enumerate(loads):
                vwork = os.path.join(work, f"v{k}")
                os.makedirs(vwork)
                if load == "busy":
                    n = os.cpu_count() or 1
                    burners = Burners(res, n)
                    vrows = variant_rows(vwork, res, fp, io, size, trials, rand_bytes, f"busy ({n} burners)",
                                         notes, f"v{k}-")
                    used, wall = burners.cpu_seconds(), time.monotonic() - burners.started
                    burners.close()
                    res.undo.remove(burners.close)
                    notes.append(f"busy: {n} burners used {used:.0f} CPU-s in {wall:.0f} s "
                                 f"({used / wall:.1f} of {n} cores)")
                else:
                    vrows = variant_rows(vwork, res, fp, io, size, trials, rand_bytes, "idle", notes, f"v{k}-")
                rows.extend(vrows)
    finally:
        res.close()
        shutil.rmtree(work, ignore_errors=True)
    return rows, io.name, sorted(set(notes))


QUICK = {"size_mib": 256, "trials": 1, "rand_mib": 16}
DEFAULTS = {"size_mib": 2048, "trials": 3, "rand_mib": 64}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, help="device size = bytes per sequential run (default 2048)")
    ap.add_argument("--rand-mib", type=int, help="bytes per random 4 KiB run (default 64)")
    ap.add_argument("--trials", type=int, help="default 3")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: defaults become {QUICK} (explicit options still win)")
    load = ap.add_mutually_exclusive_group()
    load.add_argument("--busy", action="store_true",
                      help="only the busy variant: os.cpu_count() CPU burners keep every core busy")
    load.add_argument("--both", action="store_true", help="the idle rows, then the busy rows")
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR", "/var/tmp"))
    ap.add_argument("--json")
    a = ap.parse_args()
    for k, v in (QUICK if a.quick else DEFAULTS).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    loads = ("idle", "busy") if a.both else ("busy",) if a.busy else ("idle",)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        sys.exit("bench_datapath needs root and /dev/fuse (loop devices, FUSE, mount)")
    t = time.monotonic()
    rows, tool, notes = run(a.dir, a.size_mib * MiB, a.trials, a.rand_mib * MiB, loads)
    ncpu = os.cpu_count() or 1
    ran = " and ".join("idle" if x == "idle" else f"busy ({ncpu} CPU burners)" for x in loads)
    header = (f"{COLUMNS[0]} ({a.size_mib} MiB device, {tool}, median of {a.trials}; ran: {ran})",
              *COLUMNS[1:])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\nµs CPU per I/O: user+system CPU seconds of the bench process (engine + FUSE server threads; fio and "
          "the burners are children, not counted) from just before fio starts to after the flush, divided by "
          "the I/Os fio completed. On the reference side the kernel does the work, so it shows the bench's own "
          "overhead (starting fio, parsing its output) plus any engine background work overlapping the job.")
    for n in notes:
        print(f"\n{n}")
    print(f"\n({time.monotonic() - t:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"header": header, "ran": list(loads), "rows": rows, "notes": notes}, f, indent=1)


if __name__ == "__main__":
    main()
