"""The one command runner (privileged/runner.py) on real subprocesses, without root: no shell, LC_ALL=C, stdin
input, ok codes, typed errors with stderr, and a timeout that kills the command with everything it forked."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import grpc
import pytest

from csi_driver.datapath import privileged
from csi_driver.datapath.privileged import runner as runner_mod
from csi_driver.engine import errors
from csi_driver.status import status_for
from tests.waiting import wait_for, wait_process_exit


def _alive(pid: int) -> bool:
    """Running (a zombie no longer runs)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ok_codes_are_accepted_and_others_raise() -> None:
    argv = [sys.executable, "-c", "import sys; print('out'); sys.exit(3)"]
    res = privileged.run(argv, ok_codes=(0, 3))
    assert (res.returncode, res.stdout, res.args) == (3, "out\n", argv)
    with pytest.raises(privileged.CommandError) as ei:
        privileged.run(argv)  # default ok_codes: (0,)
    assert type(ei.value) is privileged.CommandError
    assert ei.value.returncode == 3 and ei.value.stdout == "out\n" and ei.value.argv == argv


def test_failure_carries_stderr_and_is_internal() -> None:
    with pytest.raises(privileged.CommandError) as ei:
        privileged.run([sys.executable, "-c", "import sys; sys.stderr.write('it broke: disk on fire'); sys.exit(4)"])
    e = ei.value
    assert type(e) is privileged.CommandError and e.returncode == 4
    assert e.stderr == "it broke: disk on fire" and "it broke: disk on fire" in str(e) and "exit code 4" in str(e)
    assert status_for(e).code == grpc.StatusCode.INTERNAL


def test_no_shell_and_c_locale() -> None:
    # a shell would expand $HOME and run the second command; the runner passes argv through untouched
    res = privileged.run(["printf", "%s", "$HOME; echo injected"])
    assert res.stdout == "$HOME; echo injected"
    env = privileged.run([sys.executable, "-c", "import os; print(os.environ['LC_ALL'], os.environ['LANG'])"])
    assert env.stdout.split() == ["C", "C"]


def test_stdin_input_and_no_stdin_by_default() -> None:
    assert privileged.run(["cat"], input=b"hello\0world").stdout == "hello\0world"
    # without input, stdin is /dev/null: cat ends at once instead of waiting on the caller's terminal
    assert privileged.run(["cat"], timeout=10).stdout == ""


def test_own_process_group() -> None:
    res = privileged.run([sys.executable, "-c", "import os; print(os.getpgid(0), os.getsid(0), os.getpid())"])
    pgid, sid, pid = map(int, res.stdout.split())
    assert pgid == pid == sid and pgid != os.getpgid(0)


def test_missing_executable_is_command_not_found() -> None:
    with pytest.raises(privileged.CommandNotFound) as ei:
        privileged.run(["/nonexistent/tool-that-is-not-there", "x"])
    assert isinstance(ei.value, privileged.CommandError) and ei.value.returncode is None
    assert "not installed" in str(ei.value)
    assert status_for(ei.value).code == grpc.StatusCode.FAILED_PRECONDITION


def test_timeout_kills_the_command_and_what_it_forked() -> None:
    # sh forks a background sleep (a grandchild of ours), and a subshell that forks another and exits at once (an
    # orphaned great-grandchild, reparented away from sh): all in the command's process group. They print their
    # pids; the runner keeps what was written before the kill.
    script = "sleep 60 & echo $!; (sleep 60 & echo $!); echo $$; sleep 60"
    t0 = time.monotonic()
    with pytest.raises(privileged.CommandTimeout) as ei:
        privileged.run(["sh", "-c", script], timeout=2.0)
    elapsed = time.monotonic() - t0
    e = ei.value
    assert elapsed < 2.0 + runner_mod.KILL_DRAIN_SECONDS, elapsed  # did not wait for the sleeps
    assert isinstance(e, errors.Timeout) and isinstance(e, privileged.CommandError)
    assert "timed out after 2.0s" in str(e) and e.returncode is None
    assert status_for(e).code == grpc.StatusCode.DEADLINE_EXCEEDED
    pids = [int(p) for p in e.stdout.split()]
    assert len(pids) == 3, e.stdout
    for pid in pids:
        wait_process_exit(pid, timeout=10, what=f"process {pid} of the timed-out command to be killed")
        assert not _alive(pid)


def test_timeout_is_bounded_when_a_helper_escaped_the_group(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # a helper in a new session is out of reach of the group kill and holds stdout open: the runner must not
    # wait for it past KILL_DRAIN_SECONDS
    monkeypatch.setattr(runner_mod, "KILL_DRAIN_SECONDS", 0.5)
    pidfile = tmp_path / "escaped.pid"
    script = f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 30' & sleep 30"
    t0 = time.monotonic()
    try:
        with pytest.raises(privileged.CommandTimeout):
            privileged.run(["sh", "-c", script], timeout=1.0)
        assert time.monotonic() - t0 < 10
    finally:
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=10,
                           what="the escaped helper's pid"))
        os.kill(pid, signal.SIGKILL)  # ours: started by this test
        wait_process_exit(pid, timeout=10)


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], *, timeout: float = privileged.DEFAULT_TIMEOUT,
                 ok_codes: Collection[int] = (0,), input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        return runner_mod.check(argv, 0, "", "", ok_codes)


def test_run_uses_the_injected_runner_or_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _Recorder()
    privileged.run(["/nonexistent/would-fail"], runner=fake)  # never executed
    assert fake.calls == [["/nonexistent/would-fail"]]
    # runner=None means the module's default, looked up at call time
    default = _Recorder()
    monkeypatch.setattr(runner_mod, "DEFAULT_RUNNER", default)
    privileged.run(["/nonexistent/also"])
    assert default.calls == [["/nonexistent/also"]]
    assert isinstance(privileged.RUN, privileged.SubprocessRunner)
    assert importlib.import_module("csi_driver.datapath.privileged.runner") is runner_mod


def test_check_turns_an_exit_status_into_the_runner_errors() -> None:
    assert runner_mod.check(["x"], 2, "o", "e", (0, 2)).returncode == 2
    with pytest.raises(privileged.CommandError) as ei:
        runner_mod.check(["x", "y"], 5, "o", "bad thing")
    assert type(ei.value) is privileged.CommandError and ei.value.argv == ["x", "y"] and "bad thing" in str(ei.value)
