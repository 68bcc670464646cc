"""The machine's memory of files whose sha256 it has checked, so that consuming an unchanged
artifact again does not rehash it: $NANORUN_HOME/verified.sqlite, one row per file path.

Every artifact file is checked against its manifest's sha256 before it is used (a cache hit, an
input of a stage, chat, serve, export): same-size damage (a flipped 4 KiB block) passes any size
check. A row remembers the digest together with the file's (size, mtime_ns, ctime_ns, inode, dev);
a file whose stat still matches all of them has not been written since (ctime cannot be set back by
a user, unlike mtime), so its digest is reused. Two cautions:
- a file modified less than RACY_NS before it was hashed could change again within the same
  timestamp tick without its stat changing, so such a digest is not remembered (git's "racily
  clean" rule); the next check hashes it again.
- bit rot does not change the stat: `nanorun verify` rehashes everything (recheck=True).
The table is a cache: losing it costs a rehash, never a wrong answer. Failing to read or write it
(read-only home, a locked database) only logs at debug level. `nanorun gc` drops the rows of files
that no longer exist (forget_missing), so the table does not grow with every artifact ever read.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from artifacts.files import HASH_THREADS, sha256_file
from artifacts.store import nanorun_home

log = logging.getLogger("nanorun.store")

RACY_NS = 2_000_000_000
MISSING = "(missing)"
T = TypeVar("T")
SCHEMA = ("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
          "ctime_ns INTEGER, inode INTEGER, dev INTEGER, sha256 TEXT)")


def db_path() -> Path:
    return nanorun_home() / "verified.sqlite"


def _stamp(st: os.stat_result) -> tuple:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _use_table(what: str, work: Callable[[sqlite3.Connection], T], default: T) -> T:
    """work(the open table), closing it afterwards; `default` when the table cannot be opened, read
    or written, which only logs that `what` was skipped: the table is a cache."""
    try:
        path = db_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, timeout=5.0)
        try:
            con.execute(SCHEMA)
            return work(con)
        finally:
            con.close()
    except (sqlite3.Error, OSError) as e:
        log.debug("verified-file cache %s (%s)", what, e)
        return default


def _remembered(keys: list[str]) -> dict[str, tuple]:
    def read(con) -> dict[str, tuple]:
        out = {}
        for i in range(0, len(keys), 500):
            batch = keys[i:i + 500]
            rows = con.execute(f"SELECT * FROM files WHERE path IN ({','.join('?' * len(batch))})", batch)
            out.update((r[0], tuple(r[1:])) for r in rows)
        return out
    return _use_table("unreadable; hashing everything", read, {})


def _remember(rows: list[tuple]) -> None:
    def write(con) -> None:
        with con:  # one transaction
            con.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    if rows:
        _use_table("not updated", write, None)


def forget_missing(dry_run: bool = False) -> int:
    """Drop the rows of files that are gone (deleted artifacts, removed temp stores); how many."""
    def prune(con) -> int:
        gone = [(path,) for (path,) in con.execute("SELECT path FROM files") if not os.path.exists(path)]
        if not dry_run:
            with con:
                con.executemany("DELETE FROM files WHERE path = ?", gone)
        return len(gone)
    return _use_table("not pruned", prune, 0)


def digests(paths: list[Path], recheck: bool = False) -> tuple[dict[Path, str], int]:
    """({path: sha256 hex, or MISSING}, number of files actually hashed). Files whose stat matches a
    remembered check are not read again unless recheck=True."""
    keys = {p: str(Path(p).absolute()) for p in paths}
    known = {} if recheck else _remembered(list(keys.values()))
    out: dict[Path, str] = {}
    todo: list[tuple[Path, os.stat_result]] = []
    for p in paths:
        try:
            st = os.stat(p)
        except (FileNotFoundError, NotADirectoryError):
            out[p] = MISSING
            continue
        row = known.get(keys[p])
        if row is not None and row[:5] == _stamp(st):
            out[p] = row[5]
        else:
            todo.append((p, st))

    def one(item):
        p, before = item
        try:
            digest = sha256_file(p)[1]
            after = os.stat(p)
        except (FileNotFoundError, NotADirectoryError):
            return p, MISSING, None
        stable = _stamp(after) == _stamp(before) and time.time_ns() - after.st_mtime_ns > RACY_NS
        return p, digest, (keys[p], *_stamp(after), digest) if stable else None

    new = []
    if todo:
        with ThreadPoolExecutor(max(1, min(HASH_THREADS, len(todo)))) as pool:
            for p, digest, row in pool.map(one, sorted(todo, key=lambda t: -t[1].st_size)):
                out[p] = digest
                if row is not None:
                    new.append(row)
    _remember(new)
    return out, len(todo)
