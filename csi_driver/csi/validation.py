"""Request validation, done before any lock is taken or any state is touched.

Every failure is INVALID_ARGUMENT naming the field. Ids must match the engine's id grammar, so an id is never
used as (part of) a path without having been checked here first.
"""

from __future__ import annotations

from collections.abc import Sequence

from csi_driver.csi.errors import invalid, out_of_range
from csi_driver.csi.settings import Settings
from csi_driver.engine.model import ID_PATTERN, MAX_VOLUME_SIZE, has_control_chars, valid_id
from csi_driver.proto_gen import csi_pb2

MAX_NAME_BYTES = 128  # the CSI spec's string size limit
MODE = csi_pb2.VolumeCapability.AccessMode.Mode
is_valid_id = valid_id  # the engine's id grammar: an id checked here is safe to use in a file name


def require_id(value: str, field: str) -> str:
    if not value:
        raise invalid(field, "required")
    if not valid_id(value):
        raise invalid(field, f"malformed id {value[:140]!r} (expected {ID_PATTERN})")
    return value


def require_name(value: str, field: str = "name") -> str:
    if not value:
        raise invalid(field, "required")
    if len(value.encode()) > MAX_NAME_BYTES:
        raise invalid(field, f"longer than {MAX_NAME_BYTES} bytes")
    if has_control_chars(value):
        raise invalid(field, "contains control characters")
    return value


def capacity_range(cr: csi_pb2.CapacityRange, field: str = "capacity_range") -> tuple[int, int]:
    """(required_bytes, limit_bytes); 0 means unset."""
    required, limit = cr.required_bytes, cr.limit_bytes
    if required < 0:
        raise invalid(f"{field}.required_bytes", "must not be negative")
    if limit < 0:
        raise invalid(f"{field}.limit_bytes", "must not be negative")
    if limit and required > limit:
        raise invalid(field, f"required_bytes {required} exceeds limit_bytes {limit}")
    if required > MAX_VOLUME_SIZE:  # a well-formed size no volume can have (CSI: OUT_OF_RANGE)
        raise out_of_range(f"{field}.required_bytes {required} is more than the largest volume "
                           f"({MAX_VOLUME_SIZE} bytes)")
    return required, limit


def check_capability_shape(cap: csi_pb2.VolumeCapability, field: str) -> None:
    """Structural problems: always INVALID_ARGUMENT."""
    if cap.WhichOneof("access_type") is None:
        raise invalid(f"{field}.access_type", "block or mount required")
    if not cap.HasField("access_mode") or cap.access_mode.mode == MODE.UNKNOWN:
        raise invalid(f"{field}.access_mode", "required")


def unsupported_reason(cap: csi_pb2.VolumeCapability, settings: Settings) -> str | None:
    """Why this driver cannot provide a well-formed capability, or None when it can."""
    mode = MODE.Name(cap.access_mode.mode) if cap.access_mode.mode in MODE.values() else str(cap.access_mode.mode)
    if mode not in settings.access_modes:
        return f"access mode {mode} is not supported (node-local volumes: {', '.join(settings.access_modes)})"
    if cap.WhichOneof("access_type") == "mount" and cap.mount.fs_type not in settings.fs_types:
        supported = ", ".join(t for t in settings.fs_types if t)
        return f"fs_type {cap.mount.fs_type!r} is not supported ({supported})"
    return None


def require_capabilities(
    caps: Sequence[csi_pb2.VolumeCapability], settings: Settings, field: str = "volume_capabilities"
) -> None:
    if not caps:
        raise invalid(field, "required")
    for i, cap in enumerate(caps):
        check_capability_shape(cap, f"{field}[{i}]")
        why = unsupported_reason(cap, settings)
        if why:
            raise invalid(f"{field}[{i}]", why)


def max_entries(value: int) -> int:
    if value < 0:
        raise invalid("max_entries", "must not be negative")
    return value
