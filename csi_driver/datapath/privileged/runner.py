"""The one command runner. Every host command of the node data path goes through a Runner.

`SubprocessRunner` runs argv with no shell and LC_ALL=C, in its own process group (a timeout kills the command
and every helper it forked), bounds the time, feeds `input` to stdin, and raises CommandError (stderr in the
message) unless the exit status is in ok_codes; CommandTimeout and CommandNotFound for the two cases that are not
an exit status. It does not interpret failures: each verb classifies its tool's exit status (errors.py).

Verbs take `runner=`: None means DEFAULT_RUNNER. A fake runner (tests) implements the same call and may use
`check()` to turn an exit status into the same errors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Collection, Sequence
from typing import Protocol

from csi_driver.datapath.privileged.errors import (
    CommandError,
    CommandNotFound,
    CommandTimeout,
    DeviceBusy,
    reports_ebusy,
)

log = logging.getLogger("csi_driver.datapath.privileged")

DEFAULT_TIMEOUT = 60.0
#: after a timeout kill, how long to wait for the pipes to close (a helper that left the process group may hold
#: them open); then they are closed and the output so far is dropped
KILL_DRAIN_SECONDS = 5.0

Result = subprocess.CompletedProcess


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, ok_codes: Collection[int] = (0,),
                 input: bytes | None = None) -> Result[str]:
        """Run argv; return its result, or raise CommandError (a subclass for timeout / not installed)
        unless its exit status is in ok_codes."""
        ...


def check(argv: Sequence[str], returncode: int, stdout: str, stderr: str, ok_codes: Collection[int] = (0,)
          ) -> Result[str]:
    """The result of a finished command, or CommandError if returncode is not in ok_codes."""
    if returncode not in ok_codes:
        raise CommandError(argv, returncode, stdout, stderr)
    return subprocess.CompletedProcess(list(argv), returncode, stdout, stderr)


class SubprocessRunner:
    """The real runner (see the module doc)."""

    def __call__(self, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, ok_codes: Collection[int] = (0,),
                 input: bytes | None = None) -> Result[str]:
        env = dict(os.environ, LC_ALL="C", LANG="C")
        log.debug("run %s", argv)
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # own process group, so a timeout kills helpers it forked too
            )
        except FileNotFoundError as e:
            raise CommandNotFound(argv, None, "", str(e), "not installed") from e
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            sout, serr = _drain(proc)
            raise CommandTimeout(argv, None, sout, serr, f"timed out after {timeout}s") from None
        except BaseException:
            _kill_group(proc)
            _drain(proc)
            raise
        return check(argv, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"), ok_codes)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _drain(proc: subprocess.Popen[bytes]) -> tuple[str, str]:
    """Reap a killed command and collect what it wrote, bounded even if something outside its group holds the
    pipes."""
    try:
        out, err = proc.communicate(timeout=KILL_DRAIN_SECONDS)
    except subprocess.TimeoutExpired:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        proc.wait()
        return "", ""
    return out.decode(errors="replace"), err.decode(errors="replace")


DEFAULT_RUNNER: Runner = SubprocessRunner()
RUN = DEFAULT_RUNNER  # the name this module exported first


def run(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, ok_codes: Collection[int] = (0,),
        input: bytes | None = None, runner: Runner | None = None) -> Result[str]:
    """Run argv with `runner` (None: DEFAULT_RUNNER)."""
    return (runner if runner is not None else DEFAULT_RUNNER)(argv, timeout=timeout, ok_codes=ok_codes, input=input)


def run_busy_from_stderr(argv: Sequence[str], *, timeout: float, ok_codes: Collection[int] = (0,),
                         runner: Runner | None = None) -> Result[str]:
    """run(), raising DeviceBusy when the tool reports EBUSY in its message.

    For tools whose exit status cannot say "busy" (losetup(8) exits 1 for every failure; mkfs.*, e2fsck,
    resize2fs, xfs_growfs exit 1, or 8 for any operational error): the stderr fallback, strerror(EBUSY) under
    LC_ALL=C (errors.reports_ebusy).
    """
    try:
        return run(argv, timeout=timeout, ok_codes=ok_codes, runner=runner)
    except CommandError as e:
        if type(e) is CommandError and reports_ebusy(e):
            raise e.as_(DeviceBusy) from e
        raise
