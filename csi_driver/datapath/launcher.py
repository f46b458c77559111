"""Start the node engine process when none answers (`serve --engine auto` on a node).

The engine is started detached: through a short-lived intermediate process, in its own session, re-parented
away from `serve`. So stopping, restarting or upgrading `serve` never signals the engine (I/O on staged
volumes goes on) and no zombie is left when the engine exits. Its output goes to <state-dir>/engine.log.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from csi_driver.datapath import wire
from csi_driver.datapath.client import RemoteBackend

log = logging.getLogger("csi_flashcopy.launcher")

START_TIMEOUT = 120.0  # engine recovery of a large state dir, FUSE mount, re-adoption

# The intermediate: start the engine in a new session, print its pid, exit at once.
_SPAWN = (
    "import subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=sys.stderr, start_new_session=True)\n"
    "print(p.pid, flush=True)\n"
)


def engine_argv(state_dir: str, endpoint: str) -> list[str]:
    return [sys.executable, "-m", "csi_driver", "engine", "--state-dir", state_dir, "--endpoint", endpoint]


def spawn_engine(state_dir: str, endpoint: str) -> int:
    """Start a detached `csi-flashcopy engine`; returns its pid (it may still fail, e.g. state dir busy)."""
    os.makedirs(state_dir, exist_ok=True)
    env = dict(os.environ)
    # the engine must import this same csi_driver, also when serve runs from a source tree
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(os.path.join(state_dir, "engine.log"), "ab") as out:
        res = subprocess.run([sys.executable, "-c", _SPAWN, *engine_argv(state_dir, endpoint)],
                             stdout=subprocess.PIPE, stderr=out, env=env, cwd="/", check=True, timeout=60)
    # the engine writes stdout and stderr to the log; the pipe we read is the intermediate's alone
    return int(res.stdout.split()[0])


def ensure_engine(state_dir: str, endpoint: str, *, timeout: float = START_TIMEOUT) -> RemoteBackend:
    """A RemoteBackend of the engine at endpoint, starting the engine first when none answers."""
    backend = RemoteBackend(endpoint)
    if backend.is_ready():
        return backend
    pid = spawn_engine(state_dir, endpoint)
    log.info("started the node engine process", extra={"fields": {"pid": pid, "endpoint": endpoint,
                                                                   "log": os.path.join(state_dir, "engine.log")}})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if backend.is_ready():
            return backend
        if not _alive(pid) and not backend.is_ready():
            # it exited: a racing engine may have won the state dir, or it failed (see engine.log)
            if _wait_ready(backend, 5.0):
                return backend
            backend.close()
            raise wire.EngineUnavailable(
                f"the node engine process (pid {pid}) exited before answering at {endpoint}; "
                f"see {os.path.join(state_dir, 'engine.log')}")
        time.sleep(0.1)
    backend.close()
    raise wire.EngineUnavailable(f"the node engine process did not answer at {endpoint} within {timeout:.0f}s")


def _wait_ready(backend: RemoteBackend, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if backend.is_ready():
            return True
        time.sleep(0.1)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive (cannot happen after re-parenting, but be exact)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def datapath_unavailable() -> str | None:
    """Why this host cannot run the kernel data path (FUSE export + loop devices), or None."""
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return f"mfusepy/libfuse3 unavailable: {e}"
    return None
