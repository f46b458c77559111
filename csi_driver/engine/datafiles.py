"""Data files against the metadata at open: nothing is deleted, extended or recreated on a guess.

The metadata (store.py) is the only record of which file holds which volume. When it is missing or empty while
data files exist (meta.db moved away, truncated to 0 bytes, a wrong --state-dir on an old copy), every file
would look like an orphan: the open is refused instead (`MetadataMissing`), naming the files.

An orphan (a file no volume row names) is deleted only when a durable intent names it (store.py ``intents``:
a create committed before its file was made, a drop committed with the change that stopped naming it); any
other is moved to ``<state dir>/quarantine/`` and logged, for an operator to look at.

A volume whose file is missing or shorter than its size is not touched: it is reported broken (the caller
takes it offline in memory: I/O fails, its condition says why), never re-extended or recreated with zeros.
"""

from __future__ import annotations

import logging
import os
import stat

from csi_driver.engine import errors

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"
#: the offline reason of a volume whose data file is broken; only this prefix is cleared when it comes back
BROKEN = "data file "


class MetadataMissing(errors.InvalidState):
    """The metadata database is new or empty but data files exist: refusing to start (nothing is touched)."""


def data_files(data_dir: str) -> list[str]:
    """The regular files in the volumes directory, sorted."""
    out = []
    for name in sorted(os.listdir(data_dir)):
        try:
            if stat.S_ISREG(os.lstat(os.path.join(data_dir, name)).st_mode):
                out.append(name)
        except FileNotFoundError:
            continue
    return out


def check_db(db_path: str, data_dir: str) -> None:
    """Before SQLite opens (and would create) it: refuse a missing or empty database beside data files.

    An empty meta.db with a WAL beside it is left to SQLite: a young database may live in its WAL alone."""
    wal = db_path + "-wal"
    if os.path.exists(wal) and os.path.getsize(wal) > 0:
        return
    if not os.path.exists(db_path):
        _refuse(f"metadata {db_path} is missing", data_dir, data_files(data_dir))
    elif os.path.getsize(db_path) == 0:
        _refuse(f"metadata {db_path} is empty (0 bytes)", data_dir, data_files(data_dir))


def check_known(db_path: str, data_dir: str, nvols: int, intents: dict[str, str]) -> None:
    """After loading: a database that names no volume while files exist that no intent explains is not this
    state dir's metadata (a fresh one, or one emptied by hand)."""
    if nvols:
        return
    _refuse(f"metadata {db_path} names no volume", data_dir, [f for f in data_files(data_dir) if f not in intents])


def _refuse(why: str, data_dir: str, files: list[str]) -> None:
    if not files:
        return
    shown = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
    raise MetadataMissing(
        f"{why} but {data_dir} holds {len(files)} data file(s): {shown}; refusing to start (nothing was "
        "changed). Restore meta.db (and meta.db-wal) from where they went, or move the files away to start empty")


def sort_orphans(state_dir: str, data_dir: str, known: set[str], intents: dict[str, str]) -> list[str]:
    """Delete orphans an intent names, quarantine the others. Returns the intents that are done with."""
    done = [f for f in intents if f not in known]
    for name in data_files(data_dir):
        if name in known:
            continue
        path = os.path.join(data_dir, name)
        if name in intents:
            os.unlink(path)  # an interrupted create, or a file a committed change let go
            continue
        qdir = os.path.join(state_dir, QUARANTINE)
        os.makedirs(qdir, mode=0o700, exist_ok=True)
        dest = os.path.join(qdir, name)
        n = 1
        while os.path.exists(dest):
            dest, n = os.path.join(qdir, f"{name}.{n}"), n + 1
        os.rename(path, dest)
        log.warning("data file %s is named by no volume and no create intent: moved to %s (not deleted)",
                    name, dest)
    return done


def broken_reason(path: str, size: int) -> str:
    """Why a volume's data file cannot serve the volume ('' when it can)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return BROKEN + f"{os.path.basename(path)} is missing"
    if st.st_size < size:
        return BROKEN + f"{os.path.basename(path)} is truncated: {st.st_size} of {size} bytes"
    return ""
