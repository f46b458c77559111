"""Issue 22 item 7, the node engine process: undecodable requests answer INVALID_ARGUMENT (as on the CSI
socket), and every state file the engine and its launcher make is root's only (0600 in a 0700 state dir)."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import grpc
import pytest

from csi_driver.engine import errors
from csi_driver.remote import wire
from tests.datapath.conftest import needs_kernel
from tests.datapath.test_engine_process import EngineProc, engine_proc  # noqa: F401 (fixture)
from tests.waiting import wait_for

pytestmark = [needs_kernel]
C = grpc.StatusCode
MiB = 1 << 20
GARBAGE = b"\xff\xff\xff\xff\x0f garbage \x00\x01"


@pytest.mark.parametrize("method", ["CreateVolume", "Ping", "NodeStage", "GetVolume"])
def test_undecodable_request_is_invalid_argument(engine_proc: EngineProc, method: str) -> None:  # noqa: F811
    engine_proc.start()
    with grpc.insecure_channel(engine_proc.endpoint) as ch:
        call = ch.unary_unary(f"/flashcopy.engine.v1.Engine/{method}")  # raw bytes in, raw bytes out
        with pytest.raises(grpc.RpcError) as e:
            call(GARBAGE, timeout=10)
    err = e.value
    assert err.code() == C.INVALID_ARGUMENT, err  # type: ignore[attr-defined]
    assert f"cannot decode {method} request" in err.details()  # type: ignore[attr-defined]
    # the client raises the engine's own class, as for any engine error
    assert isinstance(wire.decode(err, engine_proc.endpoint), errors.InvalidArgument)  # type: ignore[arg-type]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_state_files_are_root_only(engine_proc: EngineProc) -> None:  # noqa: F811
    from csi_driver.remote.client import RemoteBackend

    engine_proc.state.mkdir(parents=True)
    os.chmod(engine_proc.state, 0o755)  # as an older version left it
    (engine_proc.state / "meta.db").touch(0o644)
    engine_proc.start()
    b = RemoteBackend(engine_proc.endpoint)
    try:
        v = b.create_volume("perm", 4 * MiB, grain_size=64 * 1024, attrs={})
        stage = Path(engine_proc.root) / "stage"
        b.node_stage(v.id, str(stage), block=False, fs_type="ext4", mount_flags=[])
        b.node_unstage(v.id, str(stage))
    finally:
        b.close()
    state = engine_proc.state
    assert _mode(state) == 0o700
    files = [state / n for n in ("meta.db", "meta.db-wal", "meta.db-shm", "staging.json")]
    files += list(state.glob("*.nodes.json")) + list(state.glob("**/*.nodes.json"))
    assert any(f.name.endswith(".nodes.json") for f in files), sorted(os.listdir(state))
    modes = {f.name: oct(_mode(f)) for f in files if f.exists()}
    assert {"meta.db", "staging.json"} <= set(modes) and set(modes.values()) == {"0o600"}, modes


def test_launcher_engine_log_is_root_only(tmp_path: Path) -> None:
    """serve --engine auto starts the engine with its output in <state>/engine.log."""
    from csi_driver.remote.client import RemoteBackend
    from csi_driver.remote.launcher import spawn_engine

    state = tmp_path / "state"
    state.mkdir()
    (state / "engine.log").touch(0o644)
    endpoint = f"unix://{state}/engine.sock"
    pid = spawn_engine(str(state), endpoint)
    try:
        b = RemoteBackend(endpoint)
        try:
            wait_for(b.is_ready, timeout=60, what="the spawned engine")
        finally:
            b.close()
        assert _mode(state / "engine.log") == 0o600 and _mode(state) == 0o700
    finally:
        os.kill(pid, signal.SIGTERM)  # the engine this test started, by its pid
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), timeout=60, what="engine exit")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
