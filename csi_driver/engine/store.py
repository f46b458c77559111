"""Durable metadata: volumes, mappings, groups and bitmaps in one SQLite database (WAL, synchronous=FULL).

Every change the engine makes reaches disk as ONE transaction (`Store.commit`), so a crash leaves either the
state before or the state after it, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, name TEXT NOT NULL, size INTEGER NOT NULL,
    grain INTEGER NOT NULL, attrs TEXT NOT NULL, created REAL NOT NULL, deleted INTEGER NOT NULL,
    file TEXT NOT NULL, upstream TEXT, offline TEXT NOT NULL, clean_rate INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS mappings (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, name TEXT NOT NULL, source TEXT NOT NULL, target TEXT NOT NULL,
    state TEXT NOT NULL, copy_rate INTEGER NOT NULL, clean_rate INTEGER NOT NULL, grain INTEGER NOT NULL,
    incremental INTEGER NOT NULL, autodelete INTEGER NOT NULL, group_id TEXT, start_time REAL NOT NULL,
    error TEXT NOT NULL, restore INTEGER NOT NULL, copied INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS groups (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, name TEXT NOT NULL,
    start_time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS bitmaps (key TEXT PRIMARY KEY, n INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS intents (file TEXT PRIMARY KEY, kind TEXT NOT NULL);
"""

#: intents: data files the engine may delete at open when no volume row names them. "create": committed before
#: the file is made, gone with the commit whose row names it (a crash between leaves the intent and the file);
#: "drop": recorded in the transaction that stops naming a file (deleted row, or a row moved to a new file)

VOLUME_COLS = ("id", "seq", "name", "size", "grain", "attrs", "created", "deleted", "file", "upstream",
               "offline", "clean_rate")
MAPPING_COLS = ("id", "seq", "name", "source", "target", "state", "copy_rate", "clean_rate", "grain",
                "incremental", "autodelete", "group_id", "start_time", "error", "restore", "copied")
GROUP_COLS = ("id", "seq", "name", "start_time")


@dataclass
class Changes:
    """Rows to upsert and keys to delete in one transaction."""

    volumes: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    mappings: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    groups: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    bitmaps: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    del_volumes: set[str] = field(default_factory=set)
    del_mappings: set[str] = field(default_factory=set)
    del_groups: set[str] = field(default_factory=set)
    del_bitmaps: set[str] = field(default_factory=set)
    #: data files about to be created (a durable create intent, committed before the file exists)
    intents: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return any((self.volumes, self.mappings, self.groups, self.bitmaps, self.del_volumes,
                    self.del_mappings, self.del_groups, self.del_bitmaps, self.intents))



def _private(path: str) -> None:
    """meta.db and its -wal/-shm readable by root only (0600), also ones an older version left 0644."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for p in (path, path + "-wal", path + "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(p, 0o600)


class Store:
    def __init__(self, path: str) -> None:
        self.path = path
        _private(path)  # before SQLite makes its -wal/-shm: they take the database file's mode
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        cur = self._db.execute("SELECT value FROM meta WHERE key='schema'")
        row = cur.fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise RuntimeError(f"state dir schema {row[0]} is not supported (want {SCHEMA_VERSION})")

    def load(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]],
                            dict[str, tuple[int, bytes]]]:
        def rows(table: str, cols: Iterable[str]) -> list[dict[str, Any]]:
            cols = list(cols)
            cur = self._db.execute(f"SELECT {','.join(cols)} FROM {table} ORDER BY seq")
            return [dict(zip(cols, r)) for r in cur.fetchall()]

        vols = rows("volumes", VOLUME_COLS)
        for v in vols:
            v["attrs"] = json.loads(v["attrs"])
        bitmaps = {k: (n, zlib.decompress(d)) for k, n, d in self._db.execute("SELECT key, n, data FROM bitmaps")}
        return vols, rows("mappings", MAPPING_COLS), rows("groups", GROUP_COLS), bitmaps

    def commit(self, ch: Changes) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if ch.intents:
                db.executemany("INSERT OR REPLACE INTO intents VALUES (?, 'create')", [(f,) for f in ch.intents])
            if ch.volumes:
                # before the rows change: a row moving to a new file (a restarted target) lets its old one go
                db.executemany("INSERT OR REPLACE INTO intents SELECT file, 'drop' FROM volumes "
                               "WHERE id=? AND file<>?", [(r[0], r[8]) for r in ch.volumes.values()])
            if ch.del_volumes:
                db.executemany("INSERT OR REPLACE INTO intents SELECT file, 'drop' FROM volumes WHERE id=?",
                               [(k,) for k in ch.del_volumes])
            for table, cols, upserts, dels in (
                ("volumes", VOLUME_COLS, ch.volumes, ch.del_volumes),
                ("mappings", MAPPING_COLS, ch.mappings, ch.del_mappings),
                ("groups", GROUP_COLS, ch.groups, ch.del_groups),
            ):
                if upserts:
                    marks = ",".join("?" * len(cols))
                    db.executemany(f"INSERT OR REPLACE INTO {table} VALUES ({marks})", upserts.values())
                if dels:
                    db.executemany(f"DELETE FROM {table} WHERE id=?", [(k,) for k in dels])
            if ch.volumes:
                db.executemany("DELETE FROM intents WHERE file=?", [(r[8],) for r in ch.volumes.values()])
            if ch.bitmaps:
                # bitmaps are mostly runs of 0x00 or 0xff: compressed they cost the WAL little
                db.executemany("INSERT OR REPLACE INTO bitmaps VALUES (?,?,?)",
                               [(k, n, zlib.compress(d, 1)) for k, (n, d) in ch.bitmaps.items()])
            if ch.del_bitmaps:
                db.executemany("DELETE FROM bitmaps WHERE key=?", [(k,) for k in ch.del_bitmaps])
            db.execute("COMMIT")
        except BaseException as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError) and "full" in str(e):
                raise OSError(errno.ENOSPC, f"metadata: {e}") from e
            raise

    def intents(self) -> dict[str, str]:
        """file -> kind of every recorded intent (see the intents table)."""
        return dict(self._db.execute("SELECT file, kind FROM intents").fetchall())

    def clear_intents(self, files: Iterable[str]) -> None:
        self._db.executemany("DELETE FROM intents WHERE file=?", [(f,) for f in files])

    def close(self) -> None:
        self._db.close()


def dump_attrs(attrs: dict[str, str]) -> str:
    return json.dumps(attrs, sort_keys=True)
