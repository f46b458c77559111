"""The operations in CSI terms, over any api.Backend: what each one checks before it touches data.

- restore(volume, snapshot): the snapshot must be a snapshot taken of this volume (attrs csi.sourceVolume), the
  volume a CSI volume; the Backend refuses while it is staged. Every other snapshot of the volume is kept.
- refresh(clone, source): the clone must be a CSI volume, the source a snapshot or volume no larger than it;
  refused while staged; only grains changed on either side are copied (the count is returned).
- set_rates(volume, copyRate/cleanRate): the volume's running mappings change at once.

Errors are engine or CSI error classes (csi_driver.status maps them to gRPC codes); `explain` turns one into the
one-line message operators see.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from csi_driver.api import Backend, CopyStatus, Report, Volume
from csi_driver.csi import objects as o
from csi_driver.csi.errors import failed_precondition, invalid
from csi_driver.csi.params import parse_mutable_params
from csi_driver.engine.model import DEFAULT_COPY_RATE
from csi_driver.status import status_for


@dataclass(frozen=True)
class Refreshed:
    volume_id: str
    source_id: str
    mapping: CopyStatus
    grains_to_copy: int
    grain_size: int

    @property
    def bytes_to_copy(self) -> int:
        return self.grains_to_copy * self.grain_size


def explain(exc: BaseException) -> str:
    """`CODE: message` for an error of an operation."""
    st = status_for(exc)
    return f"{st.code.name}: {st.message}"


def _volume(backend: Backend, volume_id: str, what: str) -> Volume:
    v = backend.get_volume(volume_id)
    if not o.is_volume(v):
        raise invalid(what, f"{volume_id} is a snapshot, not a volume")
    return v


def restore(backend: Backend, volume_id: str, snapshot_id: str, *, copy_rate: int = DEFAULT_COPY_RATE
            ) -> CopyStatus:
    """Reverse FlashCopy of snapshot_id onto volume_id, in place."""
    _volume(backend, volume_id, "volume")
    snap = backend.get_volume(snapshot_id)
    if not o.is_snapshot(snap):
        raise invalid("snapshot", f"{snapshot_id} is not a snapshot")
    taken_of = snap.attrs.get(o.SOURCE_VOLUME, "")
    if taken_of != volume_id:
        raise failed_precondition(f"snapshot {snapshot_id} was taken of volume {taken_of or '(unknown)'}, not of "
                                  f"{volume_id}: a restore in place puts a volume back to one of its own snapshots")
    if snap.condition:
        raise failed_precondition(f"snapshot {snapshot_id} is not usable: {snap.condition}")
    return backend.restore_volume(volume_id, snapshot_id, copy_rate=copy_rate)


def refresh(backend: Backend, volume_id: str, source_id: str, *, copy_rate: int = DEFAULT_COPY_RATE) -> Refreshed:
    """Bring the clone volume_id to source_id's data, copying only what changed."""
    v = _volume(backend, volume_id, "clone")
    src = backend.get_volume(source_id)
    if src.condition:
        raise failed_precondition(f"{source_id} is not usable: {src.condition}")
    if src.size > v.size:
        raise failed_precondition(f"{source_id} ({src.size} bytes) is larger than the clone {volume_id} "
                                  f"({v.size} bytes): expand the clone first")
    mapping, grains = backend.refresh_volume(volume_id, source_id, copy_rate=copy_rate)
    return Refreshed(volume_id, source_id, mapping, grains, v.grain_size)


def set_rates(backend: Backend, volume_id: str, params: Mapping[str, str], field: str = "parameters"
              ) -> list[CopyStatus]:
    """Apply copyRate/cleanRate (the only mutable parameters) to the volume's running mappings."""
    changes = parse_mutable_params(params, field)
    backend.get_volume(volume_id)  # NotFound before anything changes
    if not changes:
        return []
    return backend.modify_copies(volume_id, copy_rate=changes.copy_rate, clean_rate=changes.clean_rate)


def copy_into(report: Report, volume_id: str) -> CopyStatus | None:
    """The mapping that copies into volume_id now (the one started last), None once it is independent."""
    found = [m for m in report.mappings if m.target_id == volume_id]
    return max(found, key=lambda m: m.start_time) if found else None


def copy_done(report: Report, volume_id: str) -> bool:
    """True once volume_id no longer depends on its source (copied, or its mapping gone)."""
    m = copy_into(report, volume_id)
    return m is None or m.state == "idle_or_copied"
