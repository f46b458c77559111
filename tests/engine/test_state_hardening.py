"""Issue 22 item 7: the `file` column of meta.db is a file name in volumes/, checked at open: a path that leaves
volumes/ (a tampered or corrupt database) refuses the open, and the file it names is never touched."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from csi_driver.engine import Engine, errors

MiB = 1 << 20


@pytest.mark.parametrize("bad", ["../../outside/x", "/etc/x-abs", "..", "sub/dir.img", "a\0b"])
def test_data_file_outside_volumes_is_refused_at_open(tmp_path: Path, bad: str) -> None:
    state = tmp_path / "state"
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "x"
    victim.write_bytes(b"not the engine's")
    e = Engine.open(str(state), background=False)
    vid = e.create_volume("v", 4 * MiB).id
    e.close()
    target = bad if bad != "../../outside/x" else os.path.relpath(victim, state / "volumes")
    with sqlite3.connect(state / "meta.db") as db:
        db.execute("UPDATE volumes SET file=?, deleted=1 WHERE id=?", (target, vid))  # deleted: would be unlinked
    with pytest.raises(errors.InvalidState, match="not a file name in volumes/"):
        Engine.open(str(state), background=False)
    assert victim.read_bytes() == b"not the engine's" and victim.stat().st_size == 16
