"""Background copy and cleaning, paced by FlashCopy's rate table with one token bucket per job.

Each step takes the engine lock for one grain only, so host I/O waits at most one grain copy.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from csi_driver.engine.model import rate_to_bytes_per_second

if TYPE_CHECKING:
    from csi_driver.engine.engine import Engine

log = logging.getLogger(__name__)

BURST_SECONDS = 0.05  # a bucket holds at most this much of its rate (and at least one grain)
IDLE_WAIT = 0.2


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


def run_copier(eng: Engine) -> None:
    buckets: dict[str, _Bucket] = {}
    cursors: dict[str, int] = {}
    while True:
        try:
            if not _round(eng, buckets, cursors):
                return
        except Exception:  # keep copying other jobs; the failed step is retried next round
            log.exception("background copy step failed")
            time.sleep(IDLE_WAIT)


def _round(eng: Engine, buckets: dict[str, _Bucket], cursors: dict[str, int]) -> bool:
    with eng._lock:
        if eng._closed:
            return False
        copy_jobs = eng._copy_jobs()
        clean_jobs = eng._clean_jobs()
    now = time.monotonic()
    wait = IDLE_WAIT
    worked = False
    live: set[str] = set()
    for m, t in copy_jobs:
        key = "m:" + m.id
        live.add(key)
        if t.bits is not None and t.bits.full():
            with eng._lock:
                if eng._maps.get(m.id) is m and t.upstream is not None:
                    eng._complete(m, t)
                    eng._commit()
                    eng._work.notify_all()
            continue
        rate = rate_to_bytes_per_second(m.copy_rate)
        if rate == 0:
            continue
        b = buckets.setdefault(key, _Bucket())
        tokens = b.refill(rate, t.grain, now)
        if tokens < t.grain:
            wait = min(wait, (t.grain - tokens) / rate)
            continue
        done, cur = eng._copy_step(m, t, cursors.get(key, 0), int(tokens))
        b.tokens -= done
        cursors[key] = max(cur, 0)
        worked = worked or done > 0
    for v, crate, m in clean_jobs:
        key = "c:" + v.id
        live.add(key)
        rate = rate_to_bytes_per_second(crate)
        b = buckets.setdefault(key, _Bucket())
        tokens = b.refill(rate, v.grain, now)
        if tokens < v.grain:
            wait = min(wait, (v.grain - tokens) / rate)
            continue
        done, _finished = eng._clean_step(v, m, int(tokens))
        b.tokens -= done
        worked = True
    for key in list(buckets):
        if key not in live:
            del buckets[key]
            cursors.pop(key, None)
    eng._periodic_commit()
    if not worked:
        with eng._lock:
            if not eng._closed:
                eng._work.wait(min(wait, max(eng._commit_interval, 0.005)))
    return True


def pump(eng: Engine, budget: int | None = None) -> int:
    """Run background copy and cleaning synchronously, ignoring pacing (rate 0 still means no copy).

    Copies at most `budget` bytes per job when given, else until no work is left. Returns bytes copied.
    Used by engines opened with background=False (deterministic tests and tools).
    """
    total = 0
    while True:
        with eng._lock:
            copy_jobs = eng._copy_jobs()
            clean_jobs = eng._clean_jobs()
        moved = 0
        for m, t in copy_jobs:
            if t.bits is not None and t.bits.full():
                with eng._lock:
                    if eng._maps.get(m.id) is m and t.upstream is not None:
                        eng._complete(m, t)
                        eng._commit()
                moved += 1
                continue
            if m.copy_rate == 0:
                continue
            done, cursor = eng._copy_step(m, t, 0, budget if budget is not None else 1 << 62)
            moved += done or (cursor < 0)  # a copy that could not move (no space) is no progress
            total += done
        for v, _rate, m in clean_jobs:
            done, finished = eng._clean_step(v, m, budget if budget is not None else 1 << 62)
            moved += done or finished
            total += done
        with eng._lock:
            eng._commit()
        if budget is not None or not moved:
            return total
