"""Start the node engine process when none answers (`serve --engine auto` on a node), and stop it again.

The engine is started detached: through a short-lived intermediate process, in its own session, re-parented
away from `serve`. So a signal to `serve` (Ctrl-C in a terminal, a crash) never reaches the engine directly,
and no zombie is left when the engine exits. Its output goes to <state-dir>/engine.log.

Who stops it: `serve` stops the engine it started itself when it shuts down (a local run leaves no process
and no FUSE mount behind) unless told to keep it (--keep-engine: restarting `serve` then never interrupts
volume I/O). An engine that `serve` found running, or one run by something else (the chart's engine
container, `serve --engine process`), is never stopped from here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from csi_driver.datapath.fuse_keeper import pid_alive as _alive  # one check for both detached processes
from csi_driver.remote import wire
from csi_driver.remote.client import RemoteBackend

log = logging.getLogger("csi_flashcopy.launcher")

START_TIMEOUT = 120.0  # engine recovery of a large state dir, FUSE mount, re-adoption
STOP_TIMEOUT = 30.0  # the engine drains calls (10 s grace), flushes and unmounts its export

# The intermediate: start the engine in a new session, print its pid, exit at once.
_SPAWN = (
    "import subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=sys.stderr, start_new_session=True)\n"
    "print(p.pid, flush=True)\n"
)


def engine_argv(state_dir: str, endpoint: str, extra_args: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "csi_driver", "engine", "--state-dir", state_dir, "--endpoint", endpoint,
            *(extra_args or [])]


def spawn_engine(state_dir: str, endpoint: str, extra_args: list[str] | None = None) -> int:
    """Start a detached `csi-flashcopy engine`; returns its pid (it may still fail, e.g. state dir busy)."""
    os.makedirs(state_dir, exist_ok=True)
    env = dict(os.environ)
    # the engine must import this same csi_driver, also when serve runs from a source tree
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_fd = os.open(os.path.join(state_dir, "engine.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(log_fd, 0o600)  # also one an older version made 0644
    with open(log_fd, "ab") as out:
        res = subprocess.run([sys.executable, "-c", _SPAWN, *engine_argv(state_dir, endpoint, extra_args)],
                             stdout=subprocess.PIPE, stderr=out, env=env, cwd="/", check=True, timeout=60)
    # the engine writes stdout and stderr to the log; the pipe we read is the intermediate's alone
    return int(res.stdout.split()[0])


@dataclass
class StartedEngine:
    """An engine process this `serve` started (so may stop)."""

    pid: int
    endpoint: str

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """SIGTERM, then wait for it to exit (SIGKILL after timeout). True when it exited within timeout."""
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(self.pid):
                return True
            time.sleep(0.05)
        log.warning("the node engine process did not stop in time: killing it", extra={"fields": {"pid": self.pid}})
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        return False


def ensure_engine(state_dir: str, endpoint: str, *, timeout: float = START_TIMEOUT,
                  extra_args: list[str] | None = None) -> tuple[RemoteBackend, StartedEngine | None]:
    """A RemoteBackend of the engine at endpoint, starting the engine first when none answers; the second
    value is the engine started here (None when one was running already)."""
    backend = RemoteBackend(endpoint)
    if backend.is_ready():
        return backend, None
    pid = spawn_engine(state_dir, endpoint, extra_args)
    log.info("started the node engine process", extra={"fields": {"pid": pid, "endpoint": endpoint,
                                                                   "log": os.path.join(state_dir, "engine.log")}})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if backend.is_ready():
            return backend, StartedEngine(pid, endpoint)
        if not _alive(pid) and not backend.is_ready():
            # it exited: a racing engine may have won the state dir, or it failed (see engine.log)
            if _wait_ready(backend, 5.0):
                return backend, None
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
