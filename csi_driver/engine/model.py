"""Plain records the engine hands out: snapshots of its state, safe to keep after the call returns."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
GRAIN_SIZES = (64 * KiB, 256 * KiB)
DEFAULT_GRAIN = 256 * KiB
DEFAULT_COPY_RATE = 50
DEFAULT_CLEAN_RATE = 50


class MappingState(enum.StrEnum):
    """FlashCopy mapping states (design/flashcopy.md section 3)."""

    IDLE_OR_COPIED = "idle_or_copied"
    PREPARING = "preparing"
    PREPARED = "prepared"
    COPYING = "copying"
    STOPPING = "stopping"
    STOPPED = "stopped"


class GroupState(enum.StrEnum):
    """A consistency group's state: its most active member's (FlashCopy's group states), "empty" without any."""

    EMPTY = "empty"
    IDLE_OR_COPIED = "idle_or_copied"
    PREPARING = "preparing"
    PREPARED = "prepared"
    COPYING = "copying"
    STOPPING = "stopping"
    STOPPED = "stopped"

    @classmethod
    def of(cls, member_states: Iterable[MappingState]) -> GroupState:
        """The group state of mappings in these states."""
        states = set(member_states)
        if not states:
            return cls.EMPTY
        for s in (MappingState.STOPPING, MappingState.COPYING, MappingState.PREPARING, MappingState.PREPARED,
                  MappingState.STOPPED):
            if s in states:
                return cls(s.value)
        return cls.IDLE_OR_COPIED


# -- the grammar every layer checks against (ids become file names; rates and grains are FlashCopy's)

#: object ids: what CSI carries as volume/snapshot ids and what the engine uses in file names
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
MAX_ID = 128
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
#: engine object names (the CSI layer stores longer names under a derived engine name)
MAX_NAME = 256
RATE_MIN, RATE_MAX = 0, 150
#: the largest volume: off_t's range rounded down to 1 MiB, so rounding up to any grain cannot overflow it
MAX_VOLUME_SIZE = (2**63 - 1) // MiB * MiB
#: how a grain size may be spelled in StorageClass parameters
GRAIN_SPELLINGS: dict[str, int] = {
    spelling: size for size in GRAIN_SIZES for spelling in (f"{size // KiB}Ki", f"{size // KiB}KiB", str(size))
}


def valid_id(value: str) -> bool:
    """True when value matches ID_PATTERN (checked without a regex: this runs on every engine lookup)."""
    return 0 < len(value) <= MAX_ID and value.isascii() and value[0].isalnum() and set(value) <= _ID_CHARS


def has_control_chars(value: str) -> bool:
    """ASCII control characters (C0 and DEL), refused in names, paths and mount flags."""
    return any(ord(c) < 0x20 or c == "\x7f" for c in value)


#: host paths the node data path mounts, unmounts and deletes at (CSI staging/target/volume paths)
PATH_MAX = 4096


def path_problem(value: str) -> str | None:
    """Why value is not a host path the node data path may act at, or None. The data path runs as root and
    mounts, unmounts and deletes at these paths, so whoever asks (the CSI layer, the engine API) gets the same
    answer: absolute, no '..' component, no control characters, and not the root directory in any spelling
    ('/', '//', '/./'; POSIX leaves a leading '//' implementation-defined, so it is refused outright)."""
    if not value:
        return "required"
    if len(value.encode()) > PATH_MAX:
        return f"longer than {PATH_MAX} bytes"
    if has_control_chars(value):
        return "contains control characters"
    if not value.startswith("/"):
        return f"must be an absolute path, got {value[:200]!r}"
    if ".." in value.split("/"):
        return "must not contain '..'"
    if value.startswith("//"):
        return "must not start with '//'"
    if all(part in ("", ".") for part in value.split("/")):
        return "must not be the root directory"
    return None


def valid_mount_flag(flag: str) -> bool:
    """A mount option as a CSI capability or the engine API carries it: non-empty, no control characters."""
    return bool(flag) and not has_control_chars(flag)


def valid_rate(rate: object) -> bool:
    """A FlashCopy copy or clean rate: an integer 0-150 (bools are not rates)."""
    return isinstance(rate, int) and not isinstance(rate, bool) and RATE_MIN <= rate <= RATE_MAX


def rate_to_bytes_per_second(rate: int) -> int:
    """FlashCopy copy/clean-rate table: 0 = none, 1-10 = 128 KiB/s, each band of 10 doubles, 150 = 2 GiB/s."""
    if not valid_rate(rate):
        raise ValueError(f"rate {rate} outside {RATE_MIN}-{RATE_MAX}")
    if rate == 0:
        return 0
    band = (rate + 9) // 10  # ceil(rate / 10)
    return 128 * KiB * (1 << (band - 1))


@dataclass(frozen=True)
class CopyItem:
    """One member of a consistency-group copy (Engine.snapshot_group): a new target of source_id."""

    source_id: str
    name: str
    attrs: dict[str, str] | None = None
    volume_id: str | None = None


@dataclass(frozen=True)
class VolumeInfo:
    id: str
    name: str
    size: int
    grain_size: int
    attrs: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    #: bytes the data file actually occupies on disk (thin volumes use less than size)
    allocated_bytes: int = 0
    #: "online", or "offline" when its incoming mapping stopped before the copy completed
    status: str = "online"
    #: why the volume is offline / degraded, empty when healthy
    error: str = ""
    #: id of the mapping whose target this volume is, if any
    source_mapping_id: str | None = None
    #: True once deleted by the user while others still read through it
    deleted: bool = False
    #: volumes below this one in its cascade that still read some of its grains (a hidden node stays for them)
    dependents: tuple[str, ...] = ()


@dataclass(frozen=True)
class MappingInfo:
    id: str
    name: str
    source_id: str
    target_id: str
    state: MappingState
    copy_rate: int
    clean_rate: int
    grain_size: int
    #: percentage of the target's grains the target owns (100 = independent of the source)
    progress: float
    incremental: bool
    autodelete: bool
    group_id: str | None
    #: wall-clock time of the last start (the point-in-time instant), 0 if never started
    start_time: float
    #: why the mapping stopped when it was not asked to (e.g. out of space), else ""
    error: str = ""
    #: True when this is a restore (the target was a source of other mappings when started)
    restore: bool = False
    #: bytes the background copy still has to move (grains the target does not own yet), while copying
    bytes_to_copy: int = 0
    #: bytes a stopping mapping still has to clean into the next node of its cascade
    bytes_to_clean: int = 0


@dataclass(frozen=True)
class GroupInfo:
    id: str
    name: str
    state: GroupState
    mapping_ids: tuple[str, ...]
    start_time: float = 0.0
