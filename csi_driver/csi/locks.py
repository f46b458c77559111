"""Per-key try-locks: a second operation on a name or id already in flight fails fast with ABORTED.

Blocking would park gRPC worker threads behind a slow operation while the sidecars keep retrying; ABORTED
tells them to back off and retry, which is exactly the CSI contract for "operation pending".
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from csi_driver.csi.errors import aborted


class KeyedTryLock:
    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._busy: set[str] = set()

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        """Take every key or none; raise ABORTED naming the first busy one."""
        wanted = list(dict.fromkeys(k for k in keys if k))
        with self._mu:
            for key in wanted:
                if key in self._busy:
                    raise aborted(f"an operation on {key} is already in progress")
            self._busy.update(wanted)
        try:
            yield
        finally:
            with self._mu:
                self._busy.difference_update(wanted)

    def busy(self) -> set[str]:
        with self._mu:
            return set(self._busy)
