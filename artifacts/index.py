"""The run index: a DuckDB file ($NANORUN_HOME/index.duckdb, one per machine) listing every committed
artifact of every store used here (rows carry the store URL), with configs, metrics, provenance and
lineage, for `nanorun ls` and the leaderboard. The manifests in the stores are the truth; this is a
cache of them, rebuilt from a store's manifests when missing (`nanorun index --rebuild`). Stores
keep it current on commit, push and delete through RunIndex, which artifacts/__init__.py registers
with artifacts/store.py (the store does not import this module).

DuckDB lets one process write at a time (a file lock; readers are locked out meanwhile too), so
every access opens, works for milliseconds and closes. Updates go through a journal first: a commit
writes one small JSON file under $NANORUN_HOME/.index-journal/ and then tries (briefly) to apply
the journal; if the database is busy the entry simply waits for the next writer or reader. A
training run therefore never blocks on someone browsing the index, and nothing is lost.

    from artifacts.index import RunIndex
    idx = RunIndex()
    idx.ensure(store)                        # rebuild from the store's manifests if never indexed
    rows = idx.artifacts(store=store.url, stage="core_eval")
    rows = idx.query("SELECT ref, metrics->>'core' AS core FROM artifacts WHERE stage = ? "
                     "ORDER BY core DESC", ["core_eval"])
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar

from artifacts.errors import StoreError
from artifacts.files import write_atomic
from artifacts.manifest import ArtifactRef, Manifest
from artifacts.store import nanorun_home

log = logging.getLogger("nanorun.index")
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    store VARCHAR, ref VARCHAR, stage VARCHAR, label VARCHAR, fingerprint VARCHAR,
    code_version VARCHAR, committed_at TIMESTAMP, total_bytes BIGINT, n_files INTEGER,
    identity JSON, runtime JSON, metrics JSON, provenance JSON,
    PRIMARY KEY (store, ref));
CREATE TABLE IF NOT EXISTS lineage (
    store VARCHAR, ref VARCHAR, input_name VARCHAR, input_ref VARCHAR,
    PRIMARY KEY (store, ref, input_name));
CREATE TABLE IF NOT EXISTS stores (store VARCHAR PRIMARY KEY, rebuilt_at TIMESTAMP);
"""
JSON_COLUMNS = ("identity", "runtime", "metrics", "provenance")


# What DuckDB says of a file it cannot use as a database (garbage, truncated, a failed block
# checksum, another storage version), as opposed to one another process holds locked.
_CORRUPT_SIGNS = ("not a valid duckdb database", "corrupt database", "could not read enough bytes",
                  "does not match stored checksum", "version number", "serializ")
_BUSY_SIGNS = ("could not set lock", "conflicting lock")


class IndexBusyError(StoreError):
    """The index stayed locked by another process for longer than we were willing to wait."""


def _finite(v: Any) -> Any:
    # JSON has no NaN/Infinity; a diverged run's NaN loss is recorded as null.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _json(v: Any) -> str:
    return json.dumps(_finite(v), default=str, sort_keys=True)


def _timestamp(text: str | None) -> dt.datetime | None:
    if not text or not isinstance(text, str):
        return None
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if t.tzinfo is not None:
        t = t.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return t


class RunIndex:
    write_wait = 2.0  # seconds a commit waits for the database lock before leaving it to the journal

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path else nanorun_home() / "index.duckdb"
        self.journal = self.path.parent / ".index-journal"

    # ---- connections --------------------------------------------------------------------------
    def _connect(self, write: bool, wait: float):
        import duckdb

        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait
        delay = 0.01
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=not write)
                if write:
                    con.execute(SCHEMA)
                return con
            except duckdb.Error as e:
                if self._corrupt(e):
                    raise
                if time.monotonic() >= deadline:
                    raise IndexBusyError(f"run index {self.path} is locked by another process ({e}); "
                                         "try again in a moment") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def _use(self, write: bool, wait: float, work: Callable[[Any], T]) -> T:
        """work(an open connection), closed afterwards. A database file that turns out corrupt (a
        crash mid-write, a full disk, a newer DuckDB's format) is moved aside and replaced by an
        empty one, once: the index is a cache of the stores' manifests, and the empty index has
        seen no store, so ensure() rebuilds it from them. Retrying a corrupt file only ever fails."""
        import duckdb

        for attempt in (1, 2):
            try:
                con = self._connect(write=write or attempt == 2, wait=wait)
                try:
                    return work(con)
                finally:
                    con.close()
            except duckdb.Error as e:
                if attempt == 2 or not self._corrupt(e):
                    raise
                self._quarantine(e)
        raise AssertionError("unreachable")

    def _corrupt(self, e: BaseException) -> bool:
        text = str(e).replace(str(self.path), "").lower()  # the path itself may hold any word
        return not any(s in text for s in _BUSY_SIGNS) and any(s in text for s in _CORRUPT_SIGNS)

    def _quarantine(self, e: BaseException) -> None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        for src, dst in ((self.path, aside), (Path(f"{self.path}.wal"), Path(f"{aside}.wal"))):
            try:
                os.replace(src, dst)
            except FileNotFoundError:  # another process moved it first
                pass
        log.warning("run index %s is unreadable (%s): moved it to %s; rebuilding it from the stores' manifests",
                    self.path, " ".join(str(e).split())[:200], aside.name)

    # ---- writing ------------------------------------------------------------------------------
    def _enqueue(self, entry: dict) -> None:
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        write_atomic(self.journal / name, json.dumps(entry, default=str), durable=False)

    def record(self, store_url: str, m: Manifest) -> None:
        """Note a committed artifact (called by the store on commit/push). Never raises."""
        try:
            self._enqueue({"op": "put", "store": store_url, "manifest": m.to_dict()})
            self.flush(wait=self.write_wait)
        except Exception as e:
            log.warning("run index not updated for %s (%s); `nanorun index --rebuild` fixes it", m.ref, e)

    def forget(self, store_url: str, ref: ArtifactRef) -> None:
        try:
            self._enqueue({"op": "delete", "store": store_url, "ref": str(ref)})
            self.flush(wait=self.write_wait)
        except Exception as e:
            log.warning("run index not updated for deleted %s (%s)", ref, e)

    @staticmethod
    def _put(con, store_url: str, m: Manifest) -> None:
        ref = str(m.ref)
        con.execute("DELETE FROM lineage WHERE store = ? AND ref = ?", [store_url, ref])
        con.execute(
            "INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [store_url, ref, m.stage, m.label, m.fingerprint, m.code_version,
             _timestamp(m.provenance.get("committed_at")), m.total_bytes, len(m.files),
             _json(m.identity), _json(m.runtime), _json(m.metrics), _json(m.provenance)])
        for name, inp in sorted(m.inputs.items()):
            con.execute("INSERT INTO lineage VALUES (?, ?, ?, ?)", [store_url, ref, name, str(inp)])

    def _apply_journal(self, con) -> int:
        entries = sorted(self.journal.glob("*.json")) if self.journal.is_dir() else []
        if not entries:
            return 0
        con.execute("BEGIN TRANSACTION")
        for p in entries:
            try:
                e = json.loads(p.read_text())
                if e["op"] == "put":
                    self._put(con, e["store"], Manifest.from_dict(e["manifest"]))
                else:
                    con.execute("DELETE FROM artifacts WHERE store = ? AND ref = ?", [e["store"], e["ref"]])
                    con.execute("DELETE FROM lineage WHERE store = ? AND ref = ?", [e["store"], e["ref"]])
            except (OSError, ValueError, KeyError) as err:
                log.warning("dropping unreadable index journal entry %s: %s", p.name, err)
        con.execute("COMMIT")
        for p in entries:
            p.unlink(missing_ok=True)
        return len(entries)

    def flush(self, wait: float = 5.0) -> bool:
        """Apply pending journal entries; False if the database stayed busy for `wait` seconds."""
        try:
            self._use(True, wait, self._apply_journal)
        except IndexBusyError:
            return False
        return True

    def rebuild(self, store) -> int:
        """Replace this store's rows with what its manifests say. Returns the artifact count."""
        manifests = store.list()

        def replace_rows(con) -> None:
            self._apply_journal(con)
            con.execute("BEGIN TRANSACTION")
            con.execute("DELETE FROM artifacts WHERE store = ?", [store.url])
            con.execute("DELETE FROM lineage WHERE store = ?", [store.url])
            for m in manifests:
                self._put(con, store.url, m)
            con.execute("INSERT OR REPLACE INTO stores VALUES (?, ?)",
                        [store.url, dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)])
            con.execute("COMMIT")

        self._use(True, 30.0, replace_rows)
        return len(manifests)

    def reconcile(self, store, stage: str | None = None) -> set[str]:
        """Make this store's rows (of one stage, or all) agree with its manifests, which are the
        truth: rows whose manifest is gone or unreadable are dropped, artifacts committed from
        elsewhere (another machine, a push, a forced rebuild) are (re)added. Reads each manifest
        once, in parallel (a local store: milliseconds for hundreds). Returns the refs committed now."""
        manifests = {str(m.ref): m for m in store.list(stage)}
        indexed = {r["ref"]: r["committed_at"] for r in self.query(
            "SELECT ref, committed_at FROM artifacts WHERE store = ?" + (" AND stage = ?" if stage else ""),
            [store.url] + ([stage] if stage else []))}
        stale = [ref for ref in indexed if ref not in manifests]
        fresh = [m for ref, m in manifests.items()
                 if ref not in indexed or indexed[ref] != _timestamp(m.provenance.get("committed_at"))]
        for ref in stale:
            self._enqueue({"op": "delete", "store": store.url, "ref": ref})
        for m in fresh:
            self._enqueue({"op": "put", "store": store.url, "manifest": m.to_dict()})
        if stale or fresh:
            log.info("run index: %d row(s) dropped, %d added or updated from %s", len(stale), len(fresh), store.url)
            self.flush(wait=self.write_wait)
        return set(manifests)

    def ensure(self, store) -> bool:
        """Rebuild this store's rows if the index is missing or has never seen the store. Returns
        True if it rebuilt. Applies pending journal entries either way."""
        if self.path.exists():
            self.flush(wait=self.write_wait)
            rows = self.query("SELECT 1 FROM stores WHERE store = ?", [store.url])
            if rows:
                return False
        self.rebuild(store)
        return True

    # ---- reading ------------------------------------------------------------------------------
    def query(self, sql: str, params: list | None = None, wait: float = 10.0) -> list[dict]:
        """Run a read-only SQL query; rows as dicts. Tables: artifacts, lineage, stores (see SCHEMA;
        JSON columns can be read with DuckDB's ->> operator, e.g. metrics->>'val_bpb')."""
        if not self.path.exists():
            return []

        def read(con) -> list[dict]:
            cur = con.execute(sql, params or [])
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, row)) for row in cur.fetchall()]
        return self._use(False, wait, read)

    def artifacts(self, store: str | None = None, stage: str | None = None) -> list[dict]:
        """Committed artifacts (newest first), JSON columns decoded to dicts."""
        where, params = [], []
        if store:
            where.append("store = ?")
            params.append(store)
        if stage:
            where.append("stage = ?")
            params.append(stage)
        sql = "SELECT * FROM artifacts" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self.query(sql + " ORDER BY committed_at DESC NULLS LAST, ref", params)
        for r in rows:
            for c in JSON_COLUMNS:
                r[c] = json.loads(r[c]) if r[c] else {}
        return rows

    def lineage(self, ref: ArtifactRef | str, store: str | None = None, upstream: bool = True) -> list[dict]:
        """Transitive inputs (upstream=True) or consumers (False) of ref: rows with ref, input_name,
        input_ref and depth (1 = direct)."""
        a, b = ("ref", "input_ref") if upstream else ("input_ref", "ref")
        store_filter = "AND store = ?" if store else ""
        sql = f"""
            WITH RECURSIVE walk(ref, input_name, input_ref, depth) AS (
                SELECT ref, input_name, input_ref, 1 FROM lineage WHERE {a} = ? {store_filter}
                UNION
                SELECT l.ref, l.input_name, l.input_ref, w.depth + 1 FROM lineage l
                JOIN walk w ON l.{a} = w.{b} WHERE w.depth < 64 {store_filter.replace('store', 'l.store')}
            ) SELECT DISTINCT * FROM walk ORDER BY depth, ref, input_name"""
        params = [str(ref)] + ([store] if store else []) + ([store] if store else [])
        return self.query(sql, params)
