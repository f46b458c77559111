"""ClusterBackend routes the changed-block calls by id: both snapshots on one node, else no tracking."""

from __future__ import annotations

from typing import Any

import pytest

from csi_driver.api import ExtentPage
from csi_driver.engine import errors
from csi_driver.remote.cluster import ClusterBackend


class _Node:
    def __init__(self, key: str, calls: list[tuple[str, ...]]) -> None:
        self.key, self.calls = key, calls

    def get_volume(self, vid: str) -> object:
        self.calls.append((self.key, "get_volume", vid))
        return object()

    def allocated_extents(self, vid: str, *, start: int, limit: int) -> ExtentPage:
        self.calls.append((self.key, "allocated", vid))
        return ExtentPage(size=1, extents=())

    def delta_extents(self, base: str, target: str, *, start: int, limit: int) -> ExtentPage:
        self.calls.append((self.key, "delta", base, target))
        return ExtentPage(size=1, extents=())


def _cluster() -> tuple[Any, list[tuple[str, ...]]]:
    calls: list[tuple[str, ...]] = []
    c: Any = ClusterBackend.__new__(ClusterBackend)  # no directory, no TLS: the routing alone
    c._on = lambda key, fn: fn(_Node(key, calls))
    return c, calls


def test_routed_to_the_node_the_ids_name() -> None:
    c, calls = _cluster()
    c.allocated_extents("n1.snap-1", start=0, limit=10)
    c.delta_extents("n2.snap-1", "n2.snap-2", start=0, limit=10)
    assert ("n1", "allocated", "n1.snap-1") in calls
    assert ("n2", "delta", "n2.snap-1", "n2.snap-2") in calls


def test_different_nodes_cannot_track_and_unplaced_ids_are_unknown() -> None:
    c, calls = _cluster()
    with pytest.raises(errors.InvalidState, match="tracking not possible"):
        c.delta_extents("n1.snap-1", "n2.snap-2", start=0, limit=10)
    with pytest.raises(errors.NotFound):
        c.delta_extents("snap-1", "n2.snap-2", start=0, limit=10)
    with pytest.raises(errors.NotFound):
        c.allocated_extents("snap-1", start=0, limit=10)
    assert not [x for x in calls if x[1] != "get_volume"]
