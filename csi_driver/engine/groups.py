"""Consistency groups: many mappings prepared and started at one instant (FlashCopy's consistency groups).

A group's members are the mappings naming it (`Map.group_id`); its state is its most active member's
(`model.GroupState.of`). Members may join or leave only while the group is idle, stopped or empty.
"""

from __future__ import annotations

from collections.abc import Sequence

from csi_driver.engine import errors
from csi_driver.engine.mappings import Mappings
from csi_driver.engine.model import CopyItem, GroupInfo, MappingInfo, VolumeInfo
from csi_driver.engine.state import Group, Quiesce


class Groups(Mappings):
    """The group part of the public API (every method takes the engine lock)."""

    def create_group(self, name: str) -> GroupInfo:
        with self._lock:
            self._check_open()
            self._check_name(name)
            if any(g.name == name for g in self._groups.values()):
                raise errors.AlreadyExists(f"a group named {name!r} exists")
            g = Group(self._new_id("grp"), next(self._seq), name)
            self._groups[g.id] = g
            self._dirty_group(g)
            self._commit()
            return self._ginfo(g)

    def get_group(self, group_id: str) -> GroupInfo:
        with self._lock:
            return self._ginfo(self._group(group_id))

    def list_groups(self) -> list[GroupInfo]:
        with self._lock:
            return [self._ginfo(g) for g in sorted(self._groups.values(), key=lambda g: g.seq)]

    def prepare_group(self, group_id: str) -> GroupInfo:
        with self._lock:
            g = self._group(group_id)
            self._prepare(self._members(g))
            return self._ginfo(g)

    def start_group(self, group_id: str, *, quiesce: Quiesce | None = None) -> GroupInfo:
        with self._lock:
            self._check_open()
            g = self._group(group_id)
            ms = self._members(g)
            if not ms:
                raise errors.InvalidState(f"group {group_id} has no mappings")
            for m in ms:
                self._check_startable(m)
        self._start(ms, quiesce, g)
        with self._lock:
            return self._ginfo(g)

    def stop_group(self, group_id: str, *, force: bool = False) -> GroupInfo:
        with self._lock:
            g = self._group(group_id)
            for m in self._members(g):
                self._stop(m, force)
            self._commit()
            self._work.notify_all()
            return self._ginfo(g)

    def delete_group(self, group_id: str) -> None:
        """Delete the group; its mappings become stand-alone (FlashCopy's group 0)."""
        with self._lock:
            g = self._group(group_id)
            for m in self._members(g):
                m.group_id = None
                self._dirty_map(m)
            self._groups.pop(g.id)
            self._ch.del_groups.add(g.id)
            self._commit()

    def snapshot_group(self, items: Sequence[CopyItem], *, group_name: str, copy_rate: int = 0,
                       quiesce: Quiesce | None = None) -> tuple[GroupInfo, list[tuple[VolumeInfo, MappingInfo]]]:
        """Snapshots of several volumes at one instant (a consistency group). All are made or none."""
        if not items:
            raise errors.InvalidArgument("a group snapshot needs at least one source volume")
        grp, pairs = self._copy_set(items, group_name, copy_rate, 0, autodelete=False, quiesce=quiesce)
        assert grp is not None
        return grp, pairs
