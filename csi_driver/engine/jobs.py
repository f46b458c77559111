"""The engine side of the copier interface (copier.CopierHost): which copies and cleanings are due, and one
grain of each under the engine lock.

Out of space (the policy test_enospc.py proves): a background copy that cannot store a grain puts nothing at risk,
so it waits (the mapping stays copying with the error "background copy waiting for space", the clone stays online
and writable) and resumes when space comes back. Cleaning that cannot store a grain stops the nodes that need it.
"""

from __future__ import annotations

import logging

from csi_driver.engine import errors
from csi_driver.engine.copier import JOB_OVER, WAIT_FOR_SPACE, CleanJob, CopyJob
from csi_driver.engine.mappings import Mappings
from csi_driver.engine.model import DEFAULT_CLEAN_RATE, MappingState
from csi_driver.engine.state import Map, Vol

log = logging.getLogger(__name__)


class Jobs(Mappings):
    """Background work (implements copier.CopierHost; each public method takes the engine lock)."""

    def _copy_jobs(self) -> list[CopyJob]:
        jobs = []
        for m in self._maps.values():
            if m.state == MappingState.COPYING:
                t = self._vols.get(m.target)
                if t is not None and t.upstream is not None:
                    ready = t.bits is not None and t.bits.full()
                    if m.copy_rate > 0 or t.bits is None or ready:
                        jobs.append(CopyJob(key="m:" + m.id, grain=t.grain, rate=m.copy_rate, ready=ready,
                                            mapping=m, target=t))
        return jobs

    def _clean_jobs(self) -> list[CleanJob]:
        """Nodes to take out of their cascade after cleaning: the stopping mappings' targets, deleted nodes."""
        jobs: list[CleanJob] = []
        for m in self._maps.values():
            if m.state == MappingState.STOPPING:
                t = self._vols.get(m.target)
                if t is not None:
                    jobs.append(CleanJob(key="c:" + t.id, grain=t.grain, rate=m.clean_rate or DEFAULT_CLEAN_RATE,
                                         node=t, mapping=m))
        for v in self._vols.values():
            if v.deleted and v.downstream is not None and v.clean_rate > 0 \
                    and not any(m.source == v.id for m in self._maps.values()):
                jobs.append(CleanJob(key="c:" + v.id, grain=v.grain, rate=v.clean_rate, node=v, mapping=None))
        return jobs

    def _has_work(self) -> bool:
        return bool(self._copy_jobs() or self._clean_jobs())

    # ------------------------------------------------------------------ copier.CopierHost

    def background_jobs(self) -> tuple[list[CopyJob], list[CleanJob]] | None:
        with self._lock:
            if self._closed:
                return None
            return self._copy_jobs(), self._clean_jobs()

    def copy_next_grain(self, job: CopyJob, cursor: int) -> int:
        m, t = job.mapping, job.target
        assert t.bits is not None
        with self._lock:
            if m.state != MappingState.COPYING or t.upstream is None or self._maps.get(m.id) is not m:
                return JOB_OVER
            g = t.bits.first_clear(cursor)
            if g < 0 and cursor:
                g = t.bits.first_clear(0)
            if g < 0:
                self._copy_finished(m, t)
                return JOB_OVER
            src = self._source_of(t, g)
            try:
                self._copy_grain(src, t, g)
            except errors.NoSpace as e:
                # nothing is at risk (no write waits on this copy): wait for space instead of stopping the
                # mapping, which would take a clone the user already writes to offline
                why = f"background copy waiting for space: {e}"
                if m.error != why:
                    m.error = why
                    self._dirty_map(m)
                    log.warning("mapping %s: %s", m.id, why)
                return WAIT_FOR_SPACE
            if m.error:
                m.error = ""
                self._dirty_map(m)
            t.bits.set(g)
            self._bits_dirty["v:" + t.id] = (t.bits, t)
            return g + 1

    def clean_next_grain(self, job: CleanJob, copy: bool) -> bool:
        v, m = job.node, job.mapping
        with self._lock:
            d = v.downstream
            if self._vols.get(v.id) is not v:
                return True
            if d is None or d.bits is None:
                self._finish_clean(v, m)
                return True
            mine = v.bits.as_int() if (v.bits is not None and v.upstream is not None) \
                else (1 << v.ngrains) - 1
            need = mine & ~d.bits.as_int() & ((1 << d.ngrains) - 1)
            if not need:
                self._finish_clean(v, m)
                return True
            if not copy:
                return False
            g = (need & -need).bit_length() - 1
            try:
                self._copy_grain(v, d, g)
            except errors.NoSpace as e:
                self._stop_dependents(d, f"out of space while cleaning {v.id}: {e}")
                self._commit()
                return True
            d.bits.set(g)
            self._bits_dirty["v:" + d.id] = (d.bits, d)
            return False

    def finish_copy(self, job: CopyJob) -> None:
        m, t = job.mapping, job.target
        with self._lock:
            if self._maps.get(m.id) is m and t.upstream is not None:
                self._copy_finished(m, t)

    def background_commit(self, *, now: bool) -> None:
        if not now:
            self._periodic_commit()
            self._check_files()
            return
        with self._lock:
            self._commit()

    def wait_for_work(self, timeout: float) -> None:
        with self._lock:
            if not self._closed:
                self._work.wait(min(timeout, max(self._commit_interval, 0.005)))

    # ------------------------------------------------------------------ end of cleaning

    def _finish_clean(self, v: Vol, m: Map | None) -> None:
        self._commit()  # the downstream's new bits are durable before v stops backing them
        if m is not None:
            self._detach_stopped(m, v, "")
        else:
            d = v.downstream
            self._unlink(v)
            dm = self._incoming(d) if d is not None and d.upstream is None else None
            if d is not None and dm is not None and dm.state == MappingState.COPYING:
                self._complete(dm, d)  # cleaning a head into d left d owning everything
            self._reap()
        self._commit()
        self._work.notify_all()
