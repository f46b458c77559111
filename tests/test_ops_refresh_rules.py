"""Issue 22 item 6 at the actions level: a refresh brings only a clone to its own source's data, never across
volume modes; a restore never across volume modes. Real CSI objects made through the in-process driver (real
gRPC, real engine), the checks called as the reconciler and the CLI call them."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from csi_driver.csi import objects as o
from csi_driver.ops import actions
from csi_driver.proto_gen import csi_pb2
from tests.csi.conftest import MiB, block_cap, mount_cap
from tests.csi.test_csi_inprocess import InProc, inproc  # noqa: F401 (fixture)


def _volume(ip: InProc, name: str, cap: csi_pb2.VolumeCapability, source: str = "") -> str:
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=4 * MiB))
    if source.startswith("snap-") or ".snap-" in source:
        req.volume_content_source.snapshot.snapshot_id = source
    elif source:
        req.volume_content_source.volume.volume_id = source
    return ip.controller.CreateVolume(req).volume.volume_id


def _snap(ip: InProc, name: str, vid: str) -> str:
    return ip.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=vid)
                                        ).snapshot.snapshot_id


def _refused(fn: Callable[[], object], words: str) -> None:
    with pytest.raises(Exception) as e:
        fn()
    assert actions.explain(e.value).startswith("FAILED_PRECONDITION") and words in actions.explain(e.value)


def test_refresh_only_a_clone_to_its_own_source(inproc: InProc) -> None:  # noqa: F811
    b = inproc.driver.backend
    prod = _volume(inproc, "prod", mount_cap())
    clone = _volume(inproc, "clone", mount_cap(), _snap(inproc, "s1", prod))
    database = _volume(inproc, "database", mount_cap())  # an unrelated, unused volume
    other = _volume(inproc, "other", mount_cap())
    inproc.engine.write(database, 0, b"precious" * 512)
    s2 = _snap(inproc, "s2", prod)
    # the clone records what it was cloned from, and its mode
    assert b.get_volume(clone).attrs[o.ORIGIN] == prod and b.get_volume(clone).attrs[o.MODE] == "filesystem"
    assert actions.refresh(b, clone, s2).volume_id == clone
    # a volume that is no clone of prod cannot be overwritten with prod's snapshot
    _refused(lambda: actions.refresh(b, database, s2), "not a clone")
    assert inproc.engine.read(database, 0, 8) == b"precious"
    # nor can the clone be brought to another volume's data, a snapshot or the volume itself
    _refused(lambda: actions.refresh(b, clone, _snap(inproc, "s-other", other)), f"clone of {prod}")
    _refused(lambda: actions.refresh(b, clone, other), f"clone of {prod}")
    # its own source, as a volume, is fine
    assert actions.refresh(b, clone, prod).volume_id == clone


def test_refresh_never_crosses_volume_modes(inproc: InProc) -> None:  # noqa: F811
    b = inproc.driver.backend
    raw = _volume(inproc, "raw", block_cap())
    s1 = _snap(inproc, "raw-s1", raw)
    # Kubernetes may allow a mode change at CreateVolume (an annotated VolumeSnapshotContent); a refresh must not
    # then pour the block volume's later bytes (a crafted ext4) into the filesystem the node mounts
    fs_clone = _volume(inproc, "fs-clone", mount_cap(), s1)
    blk_clone = _volume(inproc, "blk-clone", block_cap(), s1)
    s2 = _snap(inproc, "raw-s2", raw)
    assert b.get_volume(s2).attrs[o.MODE] == "block"
    _refused(lambda: actions.refresh(b, fs_clone, s2), "never changes a volume's mode")
    assert actions.refresh(b, blk_clone, s2).volume_id == blk_clone


def test_objects_made_before_origin_and_mode_were_recorded(inproc: InProc) -> None:  # noqa: F811
    """Clones made by an older driver carry only csi.source: the origin comes from the content source, or once
    that snapshot is deleted from the mapping into the clone; the caller's modes (PVC volumeMode) stand in."""
    b = inproc.driver.backend
    prod = _volume(inproc, "old-prod", mount_cap())
    s1 = _snap(inproc, "old-s1", prod)
    legacy = {o.KIND: o.KIND_VOLUME, o.NAME: "legacy", o.PARAMS: "{}", o.SOURCE: f"snapshot:{s1}"}
    clone = b.clone(s1, o.engine_name(o.KIND_VOLUME, "legacy"), size=4 * MiB, copy_rate=0, clean_rate=0,
                    attrs=legacy).id
    s2 = _snap(inproc, "old-s2", prod)
    assert actions.origin(b, b.get_volume(clone)) == prod
    assert actions.refresh(b, clone, s2).volume_id == clone
    inproc.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=s1))
    assert actions.origin(b, b.get_volume(clone)) == prod  # through the mapping, now from s2
    s3 = _snap(inproc, "old-s3", prod)
    _refused(lambda: actions.refresh(b, clone, s3, volume_mode="block"), "never changes a volume's mode")
    assert actions.refresh(b, clone, s3, volume_mode="filesystem").volume_id == clone


def test_restore_never_crosses_volume_modes(inproc: InProc) -> None:  # noqa: F811
    b = inproc.driver.backend
    old = b.create_volume(o.engine_name(o.KIND_VOLUME, "old"), 4 * MiB, grain_size=256 * 1024,
                          attrs={o.KIND: o.KIND_VOLUME, o.NAME: "old", o.PARAMS: "{}"}).id
    snap = _snap(inproc, "old-snap", old)
    _refused(lambda: actions.restore(b, old, snap, volume_mode="filesystem", snapshot_mode="block"),
             "never changes a volume's mode")
    assert actions.restore(b, old, snap, volume_mode="filesystem", snapshot_mode="filesystem").target_id == old


def test_a_stored_bad_selector_fails_the_refresh_instead_of_retrying() -> None:
    """A VolumeRefresh stored before the CRD checked its selector: the reconciler fails it (Refused ends the
    object Failed) instead of asking the API server again every poll; no API call is made for it."""
    from kubernetes import client

    from csi_driver.api import Report
    from csi_driver.ops.reconciler import Operations, Refused

    api = client.ApiClient(client.Configuration(host="http://127.0.0.1:9"))  # nothing listens: no call made
    ops = Operations(None, api, "ns", "flashcopy.csi.dev", elect=False)  # type: ignore[arg-type]
    for selector in ("team=qa=x", "", "a b"):
        obj = {"metadata": {"namespace": "ns", "uid": "u", "name": "r"}, "spec": {"selector": selector}}
        with pytest.raises(Refused, match="selector"):
            ops._refresh(obj, Report())
