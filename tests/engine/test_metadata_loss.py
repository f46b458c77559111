"""Issue 22, item 2: a missing or emptied meta.db, unknown files and broken data files never cost data.

Before: an engine opened over a state dir whose meta.db was moved away or truncated started empty and deleted
every file under volumes/ as an "orphan of an interrupted create"; a missing data file was recreated with zeros
and a truncated one re-extended with zeros, silently.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from csi_driver.engine import Engine, errors
from csi_driver.engine.datafiles import QUARANTINE, MetadataMissing
from csi_driver.engine.store import Changes, Store

MiB = 1024 * 1024


def _state_with_volumes(root: Path) -> dict[str, str]:
    """Two volumes with data, closed cleanly. Returns file name -> sha256."""
    with Engine.open(str(root), background=False) as eng:
        for name in ("a", "b"):
            v = eng.create_volume(name, 4 * MiB)
            eng.write(v.id, 0, name.encode() * 4096)
        eng.flush()
    return _files(root)


def _files(root: Path) -> dict[str, str]:
    d = root / "volumes"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("how", ["moved", "truncated", "emptied"])
def test_open_refuses_missing_or_empty_metadata_and_keeps_every_file(tmp_path: Path, how: str) -> None:
    before = _state_with_volumes(tmp_path)
    assert len(before) == 2
    db = tmp_path / "meta.db"
    if how == "moved":
        for p in tmp_path.glob("meta.db*"):
            p.rename(tmp_path / ("saved-" + p.name))
    elif how == "truncated":
        os.truncate(db, 0)
    else:  # a database that names no volume (a fresh one put in its place, or rows deleted by hand)
        con = sqlite3.connect(db)
        con.execute("DELETE FROM volumes")
        con.commit()
        con.close()
    for _ in range(2):  # and again: the refused open must not have made the next one look legitimate
        with pytest.raises(MetadataMissing) as e:
            Engine.open(str(tmp_path), background=False)
        for name in before:
            assert name in str(e.value)
        assert _files(tmp_path) == before
    assert not (tmp_path / QUARANTINE).exists()


def test_orphan_named_by_a_create_intent_is_deleted_others_are_quarantined(tmp_path: Path) -> None:
    _state_with_volumes(tmp_path)
    store = Store(str(tmp_path / "meta.db"))
    store.commit(Changes(intents={"vol-interrupted.0000.img"}))  # a create that died before its commit
    store.close()
    (tmp_path / "volumes" / "vol-interrupted.0000.img").write_bytes(b"")
    (tmp_path / "volumes" / "stranger.img").write_bytes(b"precious" * 1000)
    with Engine.open(str(tmp_path), background=False) as eng:
        assert [v.name for v in eng.list_volumes()] == ["a", "b"]
    assert not (tmp_path / "volumes" / "vol-interrupted.0000.img").exists()
    assert not (tmp_path / "volumes" / "stranger.img").exists()
    assert (tmp_path / QUARANTINE / "stranger.img").read_bytes() == b"precious" * 1000


def test_create_records_an_intent_before_the_file_and_clears_it_with_the_commit(tmp_path: Path) -> None:
    with Engine.open(str(tmp_path), background=False) as eng:
        v = eng.create_volume("v", MiB)
        snap, _ = eng.snapshot(v.id, "s")
        assert eng._store.intents() == {}
        eng.delete_volume(snap.id)
        eng.delete_volume(v.id)
        assert not list((tmp_path / "volumes").iterdir())


def test_deleted_or_truncated_data_file_at_open_is_an_offline_volume_not_zeros(tmp_path: Path) -> None:
    with Engine.open(str(tmp_path), background=False) as eng:
        gone = eng.create_volume("gone", 4 * MiB)
        cut = eng.create_volume("cut", 4 * MiB)
        fine = eng.create_volume("fine", 4 * MiB)
        for v in (gone, cut, fine):
            eng.write(v.id, 0, b"x" * MiB)
        files = {v.id: eng._vols[v.id].file for v in (gone, cut, fine)}
    vols = tmp_path / "volumes"
    os.unlink(vols / files[gone.id])
    os.truncate(vols / files[cut.id], MiB // 2)
    with Engine.open(str(tmp_path), background=False) as eng:
        assert not (vols / files[gone.id]).exists()  # not recreated
        assert os.path.getsize(vols / files[cut.id]) == MiB // 2  # not re-extended
        by_name = {v.name: v for v in eng.list_volumes()}
        assert by_name["gone"].status == "offline" and "missing" in by_name["gone"].error
        assert by_name["cut"].status == "offline" and "truncated" in by_name["cut"].error
        assert by_name["fine"].status == "online"
        for vid in (gone.id, cut.id):
            with pytest.raises(errors.VolumeOffline):
                eng.read(vid, 0, 4096)
            with pytest.raises(errors.VolumeOffline):
                eng.write(vid, 0, b"y" * 4096)
        assert eng.read(fine.id, 0, MiB) == b"x" * MiB
        eng.delete_volume(gone.id)  # a broken volume can still be deleted
    with Engine.open(str(tmp_path), background=False) as eng:
        assert {v.name for v in eng.list_volumes()} == {"cut", "fine"}


def test_data_file_cut_or_deleted_under_a_running_engine_fails_io(tmp_path: Path) -> None:
    eng = Engine.open(str(tmp_path), background=True)
    try:
        cut = eng.create_volume("cut", 4 * MiB)
        gone = eng.create_volume("gone", 4 * MiB)
        for v in (cut, gone):
            eng.write(v.id, 0, b"x" * 4 * MiB)
        eng.flush()
        vols = tmp_path / "volumes"
        os.truncate(vols / eng._vols[cut.id].file, MiB)
        os.unlink(vols / eng._vols[gone.id].file)
        with pytest.raises(OSError):
            eng.read(cut.id, 2 * MiB, 4096)  # never zeros for data that was there
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(eng.get_volume(v.id).status == "online" for v in (cut, gone)):
            time.sleep(0.2)
        assert "truncated" in eng.get_volume(cut.id).error
        assert "deleted" in eng.get_volume(gone.id).error
        with pytest.raises(errors.VolumeOffline):
            eng.write(cut.id, 3 * MiB, b"y" * 4096)
    finally:
        eng.close()


def test_engine_process_with_an_emptied_meta_db_exits_nonzero_and_keeps_every_file(tmp_path: Path) -> None:
    before = _state_with_volumes(tmp_path)
    os.truncate(tmp_path / "meta.db", 0)
    proc = subprocess.run(
        [sys.executable, "-m", "csi_driver.cli", "engine", "--state-dir", str(tmp_path),
         "--endpoint", f"unix://{tmp_path}/engine.sock", "--fuse-keeper", "off"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0, proc.stderr
    assert "refusing to start" in proc.stderr
    assert not (tmp_path / "engine.sock").exists()  # never ready
    assert _files(tmp_path) == before
