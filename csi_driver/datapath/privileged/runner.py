"""The one command runner. Every host command of the node data path goes through a Runner.

`SubprocessRunner` runs argv with no shell and LC_ALL=C, in its own process group (a timeout kills the command
and every helper it forked), bounds the time, and raises typed errors (errors.py) with stderr in the message.
Verbs take `runner=` so tests can inject a fake one; None means the real runner.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from typing import Protocol

from csi_driver.datapath.privileged.errors import CommandError, CommandNotFound, CommandTimeout, DeviceBusy

log = logging.getLogger("csi_driver.datapath.privileged")

DEFAULT_TIMEOUT = 60.0
#: what util-linux tools print for EBUSY. mount(8)/umount(8) exit 32 and losetup(8) exits 1 for every kind of
#: failure, so the exit status cannot tell "busy" apart: the strerror text is the only signal these tools give.
BUSY_MESSAGES = (os.strerror(errno.EBUSY).lower(), "target is busy")

Result = subprocess.CompletedProcess


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, ok_codes: Sequence[int] = (0,),
                 input: bytes | None = None) -> Result[str]:
        """Run argv; raise CommandError (or a subclass) unless its exit status is in ok_codes."""


def classify(argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> CommandError:
    """The error for a failed command: DeviceBusy when the tool reports EBUSY, else CommandError."""
    low = stderr.lower()
    cls = DeviceBusy if any(m in low for m in BUSY_MESSAGES) else CommandError
    return cls(argv, returncode, stdout, stderr)


class SubprocessRunner:
    """The real runner (see the module doc)."""

    def __call__(self, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, ok_codes: Sequence[int] = (0,),
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
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise CommandTimeout(argv, None, out.decode(errors="replace"), err.decode(errors="replace"),
                                 f"timed out after {timeout}s") from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        sout, serr = out.decode(errors="replace"), err.decode(errors="replace")
        if proc.returncode not in ok_codes:
            raise classify(argv, proc.returncode, sout, serr)
        return subprocess.CompletedProcess(list(argv), proc.returncode, sout, serr)


RUN: Runner = SubprocessRunner()


def run(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, ok_codes: Sequence[int] = (0,),
        input: bytes | None = None, runner: Runner | None = None) -> Result[str]:
    """Run argv with `runner` (default: the real one)."""
    return (runner or RUN)(argv, timeout=timeout, ok_codes=ok_codes, input=input)
