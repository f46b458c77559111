"""The operations in CSI terms, over any api.Backend: what each one checks before it touches data.

- restore(volume, snapshot): the snapshot must be a snapshot taken of this volume (attrs csi.sourceVolume), the
  volume a CSI volume, their volume modes the same; the Backend refuses while it is staged. Every other snapshot
  of the volume is kept.
- refresh(clone, source): the clone must be a CSI volume made as a clone of V (a snapshot of V or V itself,
  attrs csi.origin), the source a snapshot of that same V or V itself, no larger than the clone, of the same
  volume mode (block / filesystem); refused while staged; only grains changed on either side are copied (the
  count is returned). So whoever may ask for a refresh cannot overwrite an unrelated volume with any snapshot,
  nor put block bytes (a crafted filesystem image) into a filesystem volume the node then mounts.
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
from csi_driver.engine import errors
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


def _recorded(backend: Backend, object_id: str) -> Mapping[str, str]:
    """attrs of a volume or snapshot, also of one deleted while copies still read through it (hidden)."""
    try:
        return backend.get_volume(object_id).attrs
    except errors.NotFound:
        return next((v.attrs for v in backend.report().volumes if v.id == object_id), {})


def origin(backend: Backend, v: Volume) -> str:
    """The volume whose data v is a point-in-time copy of ("" = none recorded: not a copy).

    A snapshot: the volume it was taken of. A clone: attrs csi.origin, or for a clone made before that was
    recorded, what its content source (a snapshot of V, or V) or its incoming mapping's source says."""
    if o.is_snapshot(v):
        return v.attrs.get(o.SOURCE_VOLUME, "")
    if v.attrs.get(o.ORIGIN):
        return v.attrs[o.ORIGIN]
    src = o.ContentSource.decode(v.attrs.get(o.SOURCE, ""))
    if src is None:
        return ""
    if src.kind == o.Kind.VOLUME:
        return src.id
    found = _recorded(backend, src.id).get(o.SOURCE_VOLUME, "")
    if found:
        return found
    # the first snapshot is gone (a refresh deletes snapshots no clone is made from): the mapping into the
    # clone runs from the snapshot the last refresh brought it to, of the same volume
    for m in backend.report().mappings:
        if m.target_id == v.id:
            return _recorded(backend, m.source_id).get(o.SOURCE_VOLUME, "")
    return ""


def _mode(backend: Backend, v: Volume, hint: str) -> str:
    """block / filesystem as recorded at creation (a snapshot: its source's), else hint ("" = unknown)."""
    mode = v.attrs.get(o.MODE, "")
    taken_of = v.attrs.get(o.SOURCE_VOLUME, "") if o.is_snapshot(v) else ""
    if not mode and taken_of:
        mode = _recorded(backend, taken_of).get(o.MODE, "")
    return mode or hint


def check_modes(backend: Backend, target: Volume, source: Volume, *, target_mode: str = "",
                source_mode: str = "") -> None:
    """Refuse copying a block volume's bytes into a filesystem volume or back: the node would fsck and mount
    whatever the block side wrote (a crafted filesystem image) in the host kernel. Kubernetes refuses this
    conversion at CreateVolume; a refresh or restore must not bypass it. Modes recorded in attrs win; the
    hints (the PVC's volumeMode, a VolumeSnapshotContent's sourceVolumeMode) stand in for objects made before
    modes were recorded."""
    want, have = _mode(backend, target, target_mode), _mode(backend, source, source_mode)
    if want and have and want != have:
        raise failed_precondition(f"{source.id} holds {have} data and {target.id} is a {want} volume: a "
                                  f"refresh or restore never changes a volume's mode")


def restore(backend: Backend, volume_id: str, snapshot_id: str, *, copy_rate: int = DEFAULT_COPY_RATE,
            volume_mode: str = "", snapshot_mode: str = "") -> CopyStatus:
    """Reverse FlashCopy of snapshot_id onto volume_id, in place."""
    v = _volume(backend, volume_id, "volume")
    snap = backend.get_volume(snapshot_id)
    if not o.is_snapshot(snap):
        raise invalid("snapshot", f"{snapshot_id} is not a snapshot")
    taken_of = snap.attrs.get(o.SOURCE_VOLUME, "")
    if taken_of != volume_id:
        raise failed_precondition(f"snapshot {snapshot_id} was taken of volume {taken_of or '(unknown)'}, not of "
                                  f"{volume_id}: a restore in place puts a volume back to one of its own snapshots")
    check_modes(backend, v, snap, target_mode=volume_mode, source_mode=snapshot_mode)
    if snap.condition:
        raise failed_precondition(f"snapshot {snapshot_id} is not usable: {snap.condition}")
    return backend.restore_volume(volume_id, snapshot_id, copy_rate=copy_rate)


def refresh(backend: Backend, volume_id: str, source_id: str, *, copy_rate: int = DEFAULT_COPY_RATE,
            volume_mode: str = "", source_mode: str = "") -> Refreshed:
    """Bring the clone volume_id to source_id's data, copying only what changed.

    volume_mode/source_mode: what the caller knows of the modes (Kubernetes objects), used only where the
    engine's attrs record none."""
    v = _volume(backend, volume_id, "clone")
    src = backend.get_volume(source_id)
    if not (o.is_snapshot(src) or o.is_volume(src)):
        raise invalid("source", f"{source_id} is neither a snapshot nor a volume")
    of = origin(backend, v)
    if not of:
        raise failed_precondition(f"{volume_id} is not a clone (no content source recorded): a refresh brings a "
                                  f"clone to a newer point in time of the volume it was cloned from")
    src_of = src.attrs.get(o.SOURCE_VOLUME, "") if o.is_snapshot(src) else src.id
    if src_of != of:
        what = f"a snapshot of {src_of or '(unknown)'}" if o.is_snapshot(src) else "another volume"
        raise failed_precondition(f"{volume_id} is a clone of {of}, and {source_id} is {what}: a refresh brings "
                                  f"a clone only to its own source's data")
    check_modes(backend, v, src, target_mode=volume_mode, source_mode=source_mode)
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
