"""StorageClass / VolumeSnapshotClass / VolumeGroupSnapshotClass parameters, and VolumeAttributesClass
mutable parameters.

Parsed into effective values (defaults filled in), which is also what idempotency compares: a retry that
spells a default out explicitly is the same request. Keys under csi.storage.k8s.io/ are added by the
sidecars (e.g. --extra-create-metadata's pvc/name) and are ignored. Mutable parameters (CreateVolume's and
ControllerModifyVolume's `mutable_parameters`) are the rates only, parsed by the same rules; a StorageClass key
that cannot change after creation (grainSize) is refused there as immutable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from csi_driver.csi.errors import invalid
from csi_driver.engine.model import (
    DEFAULT_CLEAN_RATE,
    DEFAULT_COPY_RATE,
    DEFAULT_GRAIN,
    GRAIN_SPELLINGS,
    RATE_MAX,
    RATE_MIN,
    valid_rate,
)

SIDECAR_PREFIX = "csi.storage.k8s.io/"


@dataclass(frozen=True)
class VolumeParams:
    grain_size: int = DEFAULT_GRAIN
    copy_rate: int = DEFAULT_COPY_RATE  # how fast a clone/restored volume becomes independent of its source
    clean_rate: int = DEFAULT_CLEAN_RATE

    def canonical(self) -> str:
        return json.dumps(
            {"grainSize": self.grain_size, "copyRate": self.copy_rate, "cleanRate": self.clean_rate},
            sort_keys=True,
        )

    def context(self) -> dict[str, str]:
        """volume_context handed to the node at stage/publish time (informational)."""
        return {"grainSize": str(self.grain_size), "copyRate": str(self.copy_rate),
                "cleanRate": str(self.clean_rate)}


@dataclass(frozen=True)
class SnapshotParams:
    copy_rate: int = 0  # 0 = no-copy snapshot; > 0 = full independent copy in the background

    def canonical(self) -> str:
        return json.dumps({"copyRate": self.copy_rate}, sort_keys=True)


@dataclass(frozen=True)
class MutableParams:
    """Rates of a volume's running mappings (None = leave as it is)."""

    copy_rate: int | None = None
    clean_rate: int | None = None

    def __bool__(self) -> bool:
        return self.copy_rate is not None or self.clean_rate is not None


VOLUME_KEYS = ("grainSize", "copyRate", "cleanRate")
MUTABLE_KEYS = ("copyRate", "cleanRate")


def _own(params: Mapping[str, str], field: str, allowed: tuple[str, ...],
         immutable: tuple[str, ...] = ()) -> dict[str, str]:
    own = {k: v for k, v in params.items() if not k.startswith(SIDECAR_PREFIX)}
    for key in sorted(own):  # the same request always names the same key
        if key in immutable:
            raise invalid(f"{field}[{key}]", f"immutable: set at creation in the StorageClass parameters "
                                             f"(mutable: {', '.join(allowed)})")
        if key not in allowed:
            raise invalid(f"{field}[{key}]", f"unknown parameter (supported: {', '.join(allowed)})")
    return own


def _rate(field: str, key: str, value: str) -> int:
    # ASCII digits only: int() would also take spaces, a sign, "_" and any Unicode digit ("\uff15\uff10")
    if not (value.isascii() and value.isdigit()) or len(value) > 3:
        raise invalid(f"{field}[{key}]", f"must be an integer {RATE_MIN}-{RATE_MAX}, got {value[:40]!r}")
    rate = int(value, 10)
    if not valid_rate(rate):
        raise invalid(f"{field}[{key}]", f"must be {RATE_MIN}-{RATE_MAX}, got {rate}")
    return rate


def parse_volume_params(params: Mapping[str, str], field: str = "parameters") -> VolumeParams:
    own = _own(params, field, VOLUME_KEYS)
    grain = DEFAULT_GRAIN
    if "grainSize" in own:
        grain_text = own["grainSize"].strip()
        if grain_text not in GRAIN_SPELLINGS:
            raise invalid(f"{field}[grainSize]", f"must be 64Ki or 256Ki, got {own['grainSize']!r}")
        grain = GRAIN_SPELLINGS[grain_text]
    copy_rate = _rate(field, "copyRate", own["copyRate"]) if "copyRate" in own else DEFAULT_COPY_RATE
    clean_rate = _rate(field, "cleanRate", own["cleanRate"]) if "cleanRate" in own else DEFAULT_CLEAN_RATE
    return VolumeParams(grain_size=grain, copy_rate=copy_rate, clean_rate=clean_rate)


def parse_snapshot_params(params: Mapping[str, str], field: str = "parameters") -> SnapshotParams:
    own = _own(params, field, ("copyRate",))
    copy_rate = _rate(field, "copyRate", own["copyRate"]) if "copyRate" in own else 0
    return SnapshotParams(copy_rate=copy_rate)


def parse_mutable_params(params: Mapping[str, str], field: str = "mutable_parameters") -> MutableParams:
    """copyRate / cleanRate of a VolumeAttributesClass: every key is checked before anything may change."""
    own = _own(params, field, MUTABLE_KEYS, immutable=tuple(k for k in VOLUME_KEYS if k not in MUTABLE_KEYS))
    return MutableParams(
        copy_rate=_rate(field, "copyRate", own["copyRate"]) if "copyRate" in own else None,
        clean_rate=_rate(field, "cleanRate", own["cleanRate"]) if "cleanRate" in own else None,
    )
