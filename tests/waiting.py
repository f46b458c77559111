"""The one way tests wait for something to happen: poll a predicate until it holds, fail naming what was awaited.

A sleep that stands in for an event (a process exiting, a socket answering, a writer making progress) waits on
the event through `wait_for` instead, so a slow CI machine waits longer and a fast one does not wait at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], *, timeout: float = 30.0, what: str = "the condition",
             interval: float = 0.05, why: Callable[[], str] | None = None,
             ignore: tuple[type[BaseException], ...] = ()) -> T:
    """predicate()'s first truthy value; AssertionError after timeout seconds, naming `what`, the last value (or
    ignored exception) seen and `why()` (e.g. a server log). Exceptions in `ignore` count as "not yet"; any other
    propagates at once (a process that died is not worth waiting for)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as e:
            last = e
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            detail = f"\n{why()}" if why is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r}){detail}")
        time.sleep(interval)


def wait_process_exit(pid: int, *, timeout: float = 30.0, what: str = "") -> None:
    """Wait until pid is gone or a zombie (a zombie no longer runs; its parent reaps it)."""

    def gone() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    wait_for(gone, timeout=timeout, what=what or f"process {pid} to exit")
