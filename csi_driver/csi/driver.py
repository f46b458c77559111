"""What every servicer shares: settings, the Backend (once open) and the per-key try-locks."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from csi_driver.api import StorageBackend
from csi_driver.csi.errors import unavailable
from csi_driver.csi.locks import KeyedTryLock
from csi_driver.csi.settings import Settings


class BackendSlot:
    """Holds the Backend once it is open. Until then (and while shutting down) RPCs get UNAVAILABLE and
    Probe answers ready=false, so the gRPC socket can be up before a slow engine recovery finishes."""

    def __init__(self, backend: StorageBackend | None = None) -> None:
        self._mu = threading.Lock()
        self._backend = backend
        self._closing = False

    def set(self, backend: StorageBackend) -> None:
        with self._mu:
            self._backend = backend

    def get(self) -> StorageBackend:
        with self._mu:
            backend, closing = self._backend, self._closing
        if backend is None:
            raise unavailable("the engine is not open yet")
        if closing:
            raise unavailable("the driver is shutting down")
        return backend

    def ready(self) -> bool:
        with self._mu:
            backend, closing = self._backend, self._closing
        return backend is not None and not closing and backend.is_ready()

    def close(self) -> None:
        with self._mu:
            backend, self._closing = self._backend, True
        if backend is not None:
            backend.close()


@dataclass
class Driver:
    settings: Settings
    slot: BackendSlot
    locks: KeyedTryLock = field(default_factory=KeyedTryLock)

    @property
    def backend(self) -> StorageBackend:
        return self.slot.get()
