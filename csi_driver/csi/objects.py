"""How CSI objects live in the engine: names, ids and attrs conventions, and the CSI records built from them.

The engine is the only state. Each engine volume made by this layer carries attrs saying what it is to CSI,
so a restarted driver (or another one on the same state dir) sees exactly what the previous one made.
"""

from __future__ import annotations

import enum
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from csi_driver.api import Volume, placed_id
from csi_driver.csi.errors import aborted, invalid
from csi_driver.csi.settings import Settings
from csi_driver.csi.validation import is_valid_id, require_id
from csi_driver.proto_gen import csi_pb2

# attrs keys
KIND = "csi.kind"  # "volume" | "snapshot"
NAME = "csi.name"  # the CSI name the object was created with
PARAMS = "csi.params"  # canonical JSON of the effective parameters
SOURCE = "csi.source"  # content source of a volume: "snapshot:<id>" | "volume:<id>" | ""
SOURCE_VOLUME = "csi.sourceVolume"  # the volume a snapshot was taken of
GROUP = "csi.group"  # group snapshot id of a group member snapshot
GROUP_NAME = "csi.groupName"  # CSI name of that group snapshot
GROUP_SIZE = "csi.groupSize"  # how many members the group snapshot has (a listing missing some is incomplete)
NODE = "csi.node"  # node holding the volume (topology)
#: the volume whose data a clone (or a snapshot) is a copy of: a clone of a snapshot of V, or of V itself,
#: records V; a refresh may bring the clone only to V's data (ops.actions.refresh)
ORIGIN = "csi.origin"
#: how the volume was asked for: "block" | "filesystem" ("" = capabilities of both kinds, or made before
#: this was recorded); a snapshot records its source's. A refresh or restore never changes it
MODE = "csi.mode"
MODE_BLOCK, MODE_FILESYSTEM = "block", "filesystem"

class Kind(enum.StrEnum):
    """What an engine volume is to CSI (attrs[KIND])."""

    VOLUME = "volume"
    SNAPSHOT = "snapshot"


KIND_VOLUME = Kind.VOLUME
KIND_SNAPSHOT = Kind.SNAPSHOT


@dataclass(frozen=True)
class ContentSource:
    """A volume's content source: a snapshot or a volume, kept in attrs[SOURCE] as "<kind>:<id>"."""

    kind: Kind
    id: str

    def encode(self) -> str:
        return f"{self.kind}:{self.id}"

    @classmethod
    def decode(cls, text: str) -> ContentSource | None:
        kind, _, ident = text.partition(":")
        return cls(Kind(kind), ident) if kind in Kind.__members__.values() and ident else None

    @classmethod
    def from_csi(cls, msg: csi_pb2.VolumeContentSource, field: str = "volume_content_source") -> ContentSource:
        """The request's content source, its id checked (INVALID_ARGUMENT otherwise)."""
        which = msg.WhichOneof("type")
        if which == "snapshot":
            return cls(Kind.SNAPSHOT, require_id(msg.snapshot.snapshot_id, f"{field}.snapshot.snapshot_id"))
        if which == "volume":
            return cls(Kind.VOLUME, require_id(msg.volume.volume_id, f"{field}.volume.volume_id"))
        raise invalid(field, "snapshot or volume required")

    def to_csi(self) -> csi_pb2.VolumeContentSource:
        if self.kind == Kind.SNAPSHOT:
            return csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=self.id))
        return csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=self.id))


def mode_of(caps: Iterable[csi_pb2.VolumeCapability]) -> str:
    """The volume mode the capabilities ask for, "" when they mix block and mount."""
    kinds = {MODE_BLOCK if c.WhichOneof("access_type") == "block" else MODE_FILESYSTEM for c in caps}
    return kinds.pop() if len(kinds) == 1 else ""


def engine_name(kind: Kind, name: str) -> str:
    """Engine names are unique across volumes and snapshots; CSI names are unique per kind only."""
    return f"csi-{kind}:{name}"


def member_name(group_id: str, source_id: str) -> str:
    return f"csi-group:{group_id}:{source_id}"


def new_volume_id(node: str) -> str:
    """Ids name the node holding the object (api.placed_id): a multi-node backend routes by them."""
    return placed_id(node, f"vol-{secrets.token_hex(8)}")


def new_snapshot_id(node: str) -> str:
    return placed_id(node, f"snap-{secrets.token_hex(8)}")


def new_group_id() -> str:
    return f"group-{secrets.token_hex(8)}"


def is_volume(v: Volume) -> bool:
    return v.attrs.get(KIND) == KIND_VOLUME


def is_snapshot(v: Volume) -> bool:
    return v.attrs.get(KIND) == KIND_SNAPSHOT


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def volume_context(v: Volume) -> dict[str, str]:
    try:
        params = json.loads(v.attrs.get(PARAMS, "{}"))
    except ValueError:
        params = {}
    return {str(k): str(val) for k, val in params.items()} if isinstance(params, dict) else {}


def csi_volume(v: Volume, settings: Settings) -> csi_pb2.Volume:
    node = v.attrs.get(NODE) or settings.node_id
    out = csi_pb2.Volume(
        capacity_bytes=v.size,
        volume_id=v.id,
        volume_context=volume_context(v),
        accessible_topology=[csi_pb2.Topology(segments={settings.topology_key: node})],
    )
    src = ContentSource.decode(v.attrs.get(SOURCE, ""))
    if src is not None:
        out.content_source.CopyFrom(src.to_csi())
    return out


def csi_snapshot(v: Volume) -> csi_pb2.Snapshot:
    return csi_pb2.Snapshot(
        size_bytes=v.size,
        snapshot_id=v.id,
        source_volume_id=v.attrs.get(SOURCE_VOLUME, ""),
        creation_time=timestamp(v.created_at),
        # a started mapping reads correctly at once; one whose copy stopped (out of space, forced) or whose
        # source broke has lost data it would read through: not usable
        ready_to_use=not v.condition,
        group_snapshot_id=v.attrs.get(GROUP, ""),
    )


def condition(v: Volume) -> csi_pb2.VolumeCondition:
    if v.condition:
        return csi_pb2.VolumeCondition(abnormal=True, message=v.condition)
    return csi_pb2.VolumeCondition(abnormal=False, message="healthy")


# -- paging: keyset tokens, so deleting the last entry of a page does not invalidate the token


def _key(v: Volume) -> tuple[float, str]:
    return (v.created_at, v.id)


def page_token(v: Volume) -> str:
    return f"{v.created_at!r}~{v.id}"


def parse_token(token: str) -> tuple[float, str]:
    ts, sep, ident = token.partition("~")
    try:
        value = float(ts)
    except ValueError:
        value = float("nan")
    if not sep or value != value or not is_valid_id(ident):
        raise aborted(f"starting_token {token[:64]!r} was not issued by this driver")
    return value, ident


def paginate(items: Iterable[Volume], max_entries: int, starting_token: str) -> tuple[list[Volume], str]:
    ordered = sorted(items, key=_key)
    if starting_token:
        after = parse_token(starting_token)
        ordered = [v for v in ordered if _key(v) > after]
    if max_entries and len(ordered) > max_entries:
        chosen = ordered[:max_entries]
        return chosen, page_token(chosen[-1])
    return ordered, ""


def attrs_with(base: Mapping[str, str], **extra: str) -> dict[str, str]:
    out = dict(base)
    out.update(extra)
    return out
