"""Issue 22, item 3, the process: a node engine on a full state dir still logs, starts, frees space and stops
cleanly (before: engine.log lost the startup lines, and SIGTERM left the FUSE mount and its keeper behind)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.datapath.conftest import leftovers, needs_kernel
from tests.datapath.test_engine_process import EngineProc
from tests.diskfull import fill_to_last_byte
from tests.waiting import wait_for

pytestmark = needs_kernel

MiB = 1 << 20


def _keepers(state: Path) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"fuse-keeper" in argv and any(str(state).encode() in a for a in argv):
            out.append(int(pid))
    return out


@pytest.mark.root
def test_engine_on_a_full_state_dir_logs_starts_frees_and_stops_clean(workdir: str) -> None:
    from csi_driver.remote.client import RemoteBackend

    tiny = Path(workdir) / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(tiny)], check=True)
    e = EngineProc(tiny)
    try:
        e.start()
        b = RemoteBackend(e.endpoint)
        try:
            v = b.create_volume("v", 8 * MiB, grain_size=64 * 1024, attrs={})
            stg = f"{workdir}/stg"
            b.node_stage(v.id, stg, block=True, fs_type="")  # the export is mounted, a keeper holds it
            b.node_unstage(v.id, stg)
        finally:
            b.close()
        assert _keepers(e.state), "no FUSE keeper to check"
        log = tiny / "engine.log"
        with open(log, "ab") as f:  # no slack left in the log's last page either
            f.write(b"-" * (-log.stat().st_size % 4096 - 1) + b"\n" if log.stat().st_size % 4096 else b"")
        fill_to_last_byte(tiny)
        e.stop()  # its exit code may say the final flush failed: what it leaves behind is what matters
        wait_for(lambda: not _keepers(e.state), timeout=20, what="the FUSE keeper to go")
        assert [x for x in leftovers(str(tiny)) if "(tmpfs)" not in x] == []  # the export is unmounted
        # a restart on the still full state dir: it starts, logs so, and space can be freed through it
        before = e.log().count("engine serving")
        e.start()
        assert e.log().count("engine serving") == before + 1, e.log()[-2000:]
        b = RemoteBackend(e.endpoint)
        try:
            b.delete_volume(v.id)
        finally:
            b.close()
        assert e.stop() == 0, e.log()[-3000:]
        wait_for(lambda: not _keepers(e.state), timeout=20, what="the FUSE keeper to go")
    finally:
        e.stop()
        subprocess.run(["umount", "-l", str(tiny)], check=False)
