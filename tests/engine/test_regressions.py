"""Deterministic replays of failures the model machine (test_model_stateful.py) found."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.engine import Engine

G = 64 * 1024
ZERO = bytes(G)
ONE = b"\x01" + bytes(G - 1)


@pytest.fixture
def eng(tmp_path: Path) -> Iterator[Engine]:
    e = Engine.open(str(tmp_path), background=False)
    yield e
    e.close()


def _reads(eng: Engine, want: dict[str, bytes]) -> None:
    for vid, data in want.items():
        assert eng.read(vid, 0, len(data)) == data, f"volume {vid} differs"


def test_write_to_grain_taken_this_epoch_keeps_downstream_view(tmp_path: Path, eng: Engine) -> None:
    """The model machine's falsifying example: a node that received a grain by copy-on-write since the last
    commit (its bit undurable) was overwritten in place although the node below it still read that grain
    through it, so the clone below showed the write."""
    a = eng.create_volume("v1", 1, grain_size=G).id
    b = eng.create_volume("v2", 1, grain_size=G).id
    eng.restore(a, b, copy_rate=0)                       # A -> B
    s, _ = eng.snapshot(a, "v3", copy_rate=0)            # A -> S -> B
    c, _ = eng.clone(b, "v4", size=G, copy_rate=0)       # A -> S -> B -> C
    eng.write(s.id, 0, b"\x01")  # S's copy-on-write gives B its own (undurable) grain 0; C reads it through B
    eng.write(b, 0, b"\x01")     # B may not overwrite it in place: C must get its copy first
    want = {a: ZERO, b: ONE, s.id: ONE, c.id: ZERO}
    _reads(eng, want)
    eng.close()
    with Engine.open(str(tmp_path), background=False) as e2:
        _reads(e2, want)


@pytest.mark.parametrize("op", ["write", "partial_write", "discard"])
def test_snapshot_between_source_and_older_snapshot_keeps_older_view(tmp_path: Path, eng: Engine, op: str) -> None:
    """H -> T2 -> T1: a source write copies grain 0 into T2 (undurable bit); T1 reads it through T2. A host
    write (fast path, per-grain path) or discard of T2 must copy it into T1 first."""
    h = eng.create_volume("h", G, grain_size=G).id
    eng.write(h, 0, b"\x07" * G)
    t1, _ = eng.snapshot(h, "t1")
    t2, _ = eng.snapshot(h, "t2")
    eng.write(h, 0, b"\x09" * G)
    if op == "write":
        eng.write(t2.id, 0, b"\x05" * G)
        t2_want = b"\x05" * G
    elif op == "partial_write":
        eng.write(t2.id, 10, b"\x05")
        t2_want = b"\x07" * 10 + b"\x05" + b"\x07" * (G - 11)
    else:
        eng.discard(t2.id, 0, G)
        t2_want = ZERO
    want = {h: b"\x09" * G, t1.id: b"\x07" * G, t2.id: t2_want}
    _reads(eng, want)
    eng.close()
    with Engine.open(str(tmp_path), background=False) as e2:
        _reads(e2, want)
