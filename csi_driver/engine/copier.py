"""Background copy and cleaning, paced by FlashCopy's rate table with one token bucket per job.

The copier drives the engine only through `CopierHost`, a small interface `engine.Engine` implements
(jobs.py): it asks for the due jobs, moves one grain at a time (each call takes the engine lock for that grain
only, so host I/O waits at most one grain copy), finishes copies, commits and waits. It touches no engine
internals; a job's `mapping`/`target`/`node` fields are the engine's handles, passed back untouched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from csi_driver.engine.model import rate_to_bytes_per_second

if TYPE_CHECKING:
    from csi_driver.engine.state import Map, Vol

log = logging.getLogger(__name__)

BURST_SECONDS = 0.05  # a bucket holds at most this much of its rate (and at least one grain)
IDLE_WAIT = 0.2
#: copy_next_grain: the job is over (copy complete, or the mapping no longer copies)
JOB_OVER = -1
#: copy_next_grain: the grain could not be stored (no space); the job waits, nothing was copied
WAIT_FOR_SPACE = -2
_UNLIMITED = 1 << 62


@dataclass(frozen=True, slots=True, eq=False)
class CopyJob:
    """A mapping whose target needs background copy."""

    key: str  #: stable while the job lasts: its pacing bucket
    grain: int  #: bytes one copied grain moves
    rate: int  #: the mapping's copy rate (FlashCopy's 0-150)
    ready: bool  #: the target already owns every grain: only finishing is left
    mapping: Map
    target: Vol


@dataclass(frozen=True, slots=True, eq=False)
class CleanJob:
    """A node to clean into its downstream neighbour and then take out of its cascade."""

    key: str
    grain: int
    rate: int  #: the clean rate (FlashCopy's 0-150)
    node: Vol
    mapping: Map | None  #: the stopping mapping whose target node is; None for a deleted volume


class CopierHost(Protocol):
    """What the copier may call (implemented by engine.Engine, see jobs.py). Each call takes the lock itself."""

    def background_jobs(self) -> tuple[list[CopyJob], list[CleanJob]] | None:
        """The due copy and clean jobs; None once the engine is closed."""

    def copy_next_grain(self, job: CopyJob, cursor: int) -> int:
        """Copy the target's first missing grain at or after cursor (wrapping around): the next cursor, or
        JOB_OVER (completing the copy if nothing is missing), or WAIT_FOR_SPACE."""

    def clean_next_grain(self, job: CleanJob, copy: bool) -> bool:
        """True when the job is over (finished: node unlinked; or stopped for lack of space). Else copies one
        grain the downstream lacks if `copy`, and returns False."""

    def finish_copy(self, job: CopyJob) -> None:
        """Complete a ready copy job (split, autodelete, commit, wake waiters) if it is still current."""

    def background_commit(self, *, now: bool) -> None:
        """Commit now, or (now=False) when the commit interval has passed (and take the metadata reserve
        back once space returned)."""

    def wait_for_work(self, timeout: float) -> None:
        """Sleep until notified of new work or timeout, never past the next periodic commit."""


class _Bucket:
    __slots__ = ("tokens", "last")

    def __init__(self) -> None:
        self.tokens = 0.0
        self.last = time.monotonic()

    def refill(self, rate: int, grain: int, now: float) -> float:
        cap = max(float(grain), rate * BURST_SECONDS)
        self.tokens = min(cap, self.tokens + rate * (now - self.last))
        self.last = now
        return self.tokens


def copy_step(host: CopierHost, job: CopyJob, cursor: int, budget: int) -> tuple[int, int]:
    """Copy up to `budget` bytes of grains the target lacks, from `cursor`. Returns (bytes, next cursor), the
    cursor -1 when the job is over."""
    done = 0
    while done < budget:
        nxt = host.copy_next_grain(job, cursor)
        if nxt == JOB_OVER:
            return done, -1
        if nxt == WAIT_FOR_SPACE:
            return done, cursor
        cursor = nxt
        done += job.grain
    return done, cursor


def clean_step(host: CopierHost, job: CleanJob, budget: int) -> tuple[int, bool]:
    """Clean up to `budget` bytes. Returns (bytes, whether the job is over)."""
    done = 0
    while True:
        if host.clean_next_grain(job, done < budget):
            return done, True
        if done >= budget:
            return done, False
        done += job.grain


def run_copier(host: CopierHost) -> None:
    """The copier thread: rounds of paced work until the engine closes."""
    buckets: dict[str, _Bucket] = {}
    cursors: dict[str, int] = {}
    while True:
        try:
            if not _round(host, buckets, cursors):
                return
        except Exception:  # keep copying other jobs; the failed step is retried next round
            log.exception("background copy step failed")
            time.sleep(IDLE_WAIT)


def _round(host: CopierHost, buckets: dict[str, _Bucket], cursors: dict[str, int]) -> bool:
    jobs = host.background_jobs()
    if jobs is None:
        return False
    copy_jobs, clean_jobs = jobs
    now = time.monotonic()
    wait = IDLE_WAIT
    worked = False
    live: set[str] = set()
    for job in copy_jobs:
        key = job.key
        live.add(key)
        if job.ready:
            host.finish_copy(job)
            continue
        rate = rate_to_bytes_per_second(job.rate)
        if rate == 0:
            continue
        b = buckets.setdefault(key, _Bucket())
        tokens = b.refill(rate, job.grain, now)
        if tokens < job.grain:
            wait = min(wait, (job.grain - tokens) / rate)
            continue
        done, cur = copy_step(host, job, cursors.get(key, 0), int(tokens))
        b.tokens -= done
        cursors[key] = max(cur, 0)
        worked = worked or done > 0
    for cjob in clean_jobs:
        key = cjob.key
        live.add(key)
        rate = rate_to_bytes_per_second(cjob.rate)
        b = buckets.setdefault(key, _Bucket())
        tokens = b.refill(rate, cjob.grain, now)
        if tokens < cjob.grain:
            wait = min(wait, (cjob.grain - tokens) / rate)
            continue
        done, _finished = clean_step(host, cjob, int(tokens))
        b.tokens -= done
        worked = True
    for key in list(buckets):
        if key not in live:
            del buckets[key]
            cursors.pop(key, None)
    host.background_commit(now=False)
    if not worked:
        host.wait_for_work(wait)
    return True


def pump(host: CopierHost, budget: int | None = None) -> int:
    """Run background copy and cleaning synchronously, ignoring pacing (rate 0 still means no copy).

    Copies at most `budget` bytes per job when given, else until no work is left. Returns bytes copied.
    Used by engines opened with background=False (deterministic tests and tools).
    """
    total = 0
    limit = budget if budget is not None else _UNLIMITED
    while True:
        jobs = host.background_jobs()
        if jobs is None:
            return total
        copy_jobs, clean_jobs = jobs
        moved = 0
        for job in copy_jobs:
            if job.ready:
                host.finish_copy(job)
                moved += 1
                continue
            if job.rate == 0:
                continue
            done, cursor = copy_step(host, job, 0, limit)
            moved += done or (cursor < 0)  # a copy that could not move (no space) is no progress
            total += done
        for cjob in clean_jobs:
            done, finished = clean_step(host, cjob, limit)
            moved += done or finished
            total += done
        host.background_commit(now=True)
        if budget is not None or not moved:
            return total
