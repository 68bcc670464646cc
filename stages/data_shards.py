"""Stage data_shards: pretraining text as parquet shards (column `text`) in train/ and val/.

    nanorun stage data_shards --set train_shards=170                    # ClimbMix, the speedrun's data
    nanorun stage data_shards --set source=fineweb-edu --set train_shards=8
    nanorun stage data_shards --set source=../shared/data/corpus        # a local folder (offline)
    nanorun stage data_shards --set source=chitchat                     # PyPI chitchat-dataset (offline demo)

Sources (`source`):
- `climbmix` / `fineweb-edu`: karpathy's shuffled shards on Hugging Face, shard_{i:05d}.parquet;
  train = shards 0..train_shards-1 (or `shard_indices`), validation = the last shard (6542 / 1822).
- an URL pattern `https://host/path/shard_{i:05d}.parquet` or `s3://bucket/prefix/shard_{i:05d}.parquet`
  (val_shard must be given).
- `s3://bucket/prefix` (listed) or a local directory / glob: the .parquet, .jsonl, .jsonl.gz and .txt
  files there, sorted by name. All-parquet: the last file is the validation shard and the first
  `train_shards` (0 = all) of the others are the train shards. The path is a runtime field
  (`local_path`): what identifies the data is `content_digest`, computed when the config is built
  from every file's name, size and sha256 (S3: key, size, ETag), so a changed file is a new artifact
  and two copies of the same files are one.
- `chitchat`: the 7,168 conversations of the PyPI package chitchat-dataset rendered as plain text.
Parquet shards are kept byte-identical. Other formats, a single parquet file, and any source with a
document filter (min_doc_chars / max_doc_chars) are re-sharded: documents in source order, the last
`val_docs` of them to val/, the rest into train shards of ~shard_chars characters, row groups of
1024 documents (jsonl: the "text" field; txt: one document per file).

Downloads run `workers` at a time through stagekit/fetch.py (resume with Range, retries with backoff,
sha256 per file, parquet check before the atomic rename); shards already complete in the work dir
from an earlier attempt are not fetched again. The metrics hold DuckDB statistics per split
(documents, characters, length percentiles); sources.json maps every output file to its origin.
"""
from __future__ import annotations

import collections
import dataclasses
import glob as globlib
import gzip
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from artifacts.files import file_sha256
from artifacts.redact import redact_value
from core.layouts import shard_files
from stages.base import (
    ConfigError,
    Input,
    StageConfig,
    identity,
    progress,
    runtime,
    stage_logger,
)

NAME = "data_shards"
code_version = "1"
INPUTS: tuple[str, ...] = ()

log = stage_logger(NAME)

HF = "https://huggingface.co/datasets/karpathy"
NAMED = {  # name -> (URL template, validation shard = the last one)
    "climbmix": (HF + "/climbmix-400b-shuffle/resolve/main/shard_{i:05d}.parquet", 6542),
    "fineweb-edu": (HF + "/fineweb-edu-100b-shuffle/resolve/main/shard_{i:05d}.parquet", 1822),
}
TEXT_EXTS = (".parquet", ".jsonl", ".jsonl.gz", ".txt")
ROW_GROUP = 1024  # documents per row group, as in the reference shards (the loader's unit of work)
SOURCES_FILE = "sources.json"
_RAW = "raw"  # scratch dir in `out` for files that are rewritten (removed on success)


def check_parquet(path: Path, deep: bool = True) -> None:
    """Raise unless path is a readable parquet file with a string column `text` and >= 1 row.

    deep=False reads the footer only (milliseconds: catches zero-byte, truncated, non-parquet and
    wrong-schema files); deep=True also decodes every page (a damaged page fails here, not in training)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    if "text" not in schema.names or not (pa.types.is_string(schema.field("text").type)
                                          or pa.types.is_large_string(schema.field("text").type)):
        raise ValueError(f"no string column 'text' (columns: {', '.join(schema.names) or 'none'})")
    if pf.metadata.num_rows == 0:
        raise ValueError("no rows")
    if deep:
        for rg in range(pf.num_row_groups):
            pf.read_row_group(rg, columns=["text"])


def check_source(path: Path, deep: bool) -> None:
    """ConfigError naming a local source file that cannot be used (before any work is done on it)."""
    import pyarrow as pa

    try:
        if path.name.endswith(".parquet"):
            check_parquet(path, deep=deep)
        else:
            with open(path, "rb"):
                pass
    except (OSError, ValueError, pa.ArrowException) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"data source {path} is not usable: {why[:300]} -- fix or remove the file") from None


# ---- sources -------------------------------------------------------------------------------------
def _kind(source: str) -> str:
    if source in NAMED:
        return "named"
    if source == "chitchat":
        return "chitchat"
    if source.startswith(("http://", "https://", "s3://")) and "{i" in source:
        return "pattern"
    if source.startswith("s3://"):
        return "s3"
    if source.startswith(("http://", "https://")):
        raise ConfigError(f"data_shards.source={source!r}: an http(s) source must be a pattern with {{i:05d}} "
                          "where the shard index goes, e.g. https://host/data/shard_{i:05d}.parquet")
    return "local"


def _ext(name: str) -> str | None:
    return next((e for e in TEXT_EXTS if name.endswith(e)), None)


def _local_files(path: str) -> tuple[Path, list[Path]]:
    """(root, supported files sorted by relative path) of a directory or glob."""
    p = Path(path).expanduser()
    if p.is_dir():
        root, files = p, [f for f in p.rglob("*") if f.is_file()]
    elif p.is_file():
        root, files = p.parent, [p]
    else:
        files = [Path(f) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file()]
        root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else p.parent
    files = sorted((f for f in files if _ext(f.name) and not f.name.startswith(".")),
                   key=lambda f: f.relative_to(root).as_posix())
    return root.resolve(), [f.resolve() for f in files]


def _digest(entries: list[tuple[str, int, str]]) -> str:
    h = hashlib.sha256()
    for name, size, tag in entries:
        h.update(f"{name}\0{size}\0{tag}\n".encode())
    return h.hexdigest()[:32]


def _chitchat_file() -> Path:
    try:
        import chitchat_dataset
    except ImportError:
        raise ConfigError("data_shards.source='chitchat' needs the PyPI package chitchat-dataset "
                          "(pip install 'nanorun[demo]')") from None
    return Path(chitchat_dataset.__file__).parent / "dataset.json"


@dataclass(frozen=True)
class _Item:
    uri: str      # URL, s3:// URL or local path
    split: str    # train | val | "" (re-sharded: decided per document)
    name: str     # file name in the output (or in raw/)


@dataclass(frozen=True)
class Config(StageConfig):
    source: str = identity("climbmix", help="climbmix | fineweb-edu | chitchat | https://…{i:05d}… | "
                                            "s3://bucket/prefix[/…{i:05d}…] | a local directory or glob")
    train_shards: int = identity(8, help="train shards: indexed sources take shards 0..N-1; listed parquet "
                                         "sources at most the first N files (0 = all); re-sharded sources "
                                         "write at most N (0 = all)")
    shard_indices: tuple = identity((), help="explicit train shard indices (indexed sources) instead of "
                                             "train_shards")
    val_shard: int = identity(-1, help="validation shard index of an indexed source (-1: the named "
                                       "dataset's last shard)")
    min_doc_chars: int = identity(0, help="drop documents shorter than this (forces re-writing shards)")
    max_doc_chars: int = identity(0, help="drop documents longer than this, 0 = no limit (forces re-writing)")
    val_docs: int = identity(1024, help="re-sharded sources: the last N documents form the validation shard")
    shard_chars: int = identity(250_000_000, help="re-sharded sources: characters per train shard")
    content_digest: str = identity("", help="listed sources: digest of the files (computed; a value given "
                                            "must match)")
    local_path: str = runtime("", help="the local directory or glob (set from `source`)")
    workers: int = runtime(4, help="parallel downloads")
    retries: int = runtime(5, help="attempts per file before failing")
    timeout: float = runtime(60.0, help="seconds without data before an attempt fails")
    backoff: float = runtime(2.0, help="first retry delay in seconds (doubles each attempt)")

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise in place)
        for f in ("train_shards", "min_doc_chars", "max_doc_chars", "val_docs", "shard_chars"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 0:
                raise ConfigError(f"data_shards.{f}={getattr(self, f)!r}: expected an integer >= 0")
        if self.workers < 1 or self.retries < 1 or self.timeout <= 0 or self.backoff < 0:
            raise ConfigError("data_shards: workers and retries must be >= 1, timeout > 0, backoff >= 0")
        if self.max_doc_chars and self.max_doc_chars < self.min_doc_chars:
            raise ConfigError(f"data_shards: max_doc_chars {self.max_doc_chars} < min_doc_chars {self.min_doc_chars}")
        set_("shard_indices", tuple(self.shard_indices))
        if not self.source and self.local_path:
            set_("source", "local")
        kind = _kind(self.source)
        if kind == "local" and self.source != "local":  # a path given as the source
            set_("local_path", self.source)
            set_("source", "local")
        if self.local_path and kind != "local":
            raise ConfigError(f"data_shards.local_path is for local sources, but source is {self.source!r}")
        if self.local_path:  # absolute, so a later run from another directory reads the same files
            set_("local_path", str(Path(self.local_path).expanduser().resolve()))
        if kind in ("named", "pattern"):
            self._check_indexed(kind)
            set_("val_docs", 0), set_("shard_chars", 0)  # unused: keep them out of the identity
            if self.content_digest:
                raise ConfigError("data_shards.content_digest applies to listed sources (local, s3://prefix, chitchat)")
            return
        if self.shard_indices or self.val_shard != -1:
            raise ConfigError(f"data_shards: shard_indices / val_shard apply to indexed sources (climbmix, "
                              f"fineweb-edu, URL patterns), not to {self.source!r}")

    def resolve(self) -> "Config":
        """A listed source (local files, an S3 prefix, the chitchat package): the digest of what is
        there now, and whether it is re-sharded (which decides whether val_docs / shard_chars are part
        of the identity). Lists the source once; a given digest is taken as it is, and run() lists
        again to prove the files did not change."""
        kind = _kind(self.source) if self.source != "local" else "local"
        if kind in ("named", "pattern") or self.content_digest:
            return self
        if kind == "chitchat":
            f = _chitchat_file()
            digest, reshard = _digest([("dataset.json", f.stat().st_size, file_sha256(f))]), True
        else:
            entries, reshard = self._listing(kind)
            reshard = reshard or bool(self.min_doc_chars or self.max_doc_chars)
            digest = _digest(entries)
        if reshard and self.val_docs < 1:
            raise ConfigError("data_shards.val_docs must be >= 1 for a re-sharded source")
        if reshard and self.shard_chars < 1:
            raise ConfigError("data_shards.shard_chars must be >= 1 for a re-sharded source")
        unused = {} if reshard else {"val_docs": 0, "shard_chars": 0}
        return dataclasses.replace(self, content_digest=digest, **unused)

    def _check_indexed(self, kind: str) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if kind == "named" and self.val_shard == -1:
            set_("val_shard", NAMED[self.source][1])
        if self.val_shard < 0:
            raise ConfigError(f"data_shards.val_shard: the pattern {self.source!r} needs the validation shard's index")
        if kind == "pattern":
            try:
                self.source.format(i=0)
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(f"data_shards.source={self.source!r}: bad pattern ({e}); use {{i:05d}} for the index")
        if kind == "named" and self.val_shard > NAMED[self.source][1]:
            raise ConfigError(f"data_shards.val_shard={self.val_shard}: {self.source} has shards 0..{NAMED[self.source][1]}")
        if self.shard_indices:
            idx = self.shard_indices
            if any(not isinstance(i, int) or i < 0 for i in idx) or len(set(idx)) != len(idx):
                raise ConfigError(f"data_shards.shard_indices={list(idx)}: expected distinct integers >= 0")
            object.__setattr__(self, "shard_indices", tuple(sorted(idx)))
            set_("train_shards", len(idx))
        elif self.train_shards < 1:
            raise ConfigError(f"data_shards.train_shards must be >= 1 for {self.source!r} (the speedrun uses 170)")
        if self.val_shard in self.train_indices():
            raise ConfigError(f"data_shards: the validation shard {self.val_shard} is also a train shard: "
                              "lower train_shards or drop it from shard_indices")
        if kind == "named" and max(self.train_indices()) >= NAMED[self.source][1]:
            raise ConfigError(f"data_shards: {self.source} has train shards 0..{NAMED[self.source][1] - 1}")

    def _listing(self, kind: str) -> tuple[list[tuple[str, int, str]], bool]:
        """(name, size, sha256/etag) of the source files used, and whether they need re-sharding."""
        if kind == "s3":
            from stagekit.fetch import list_s3
            try:
                objs = [o for o in list_s3(self.source) if _ext(o["key"])]
            except Exception as e:
                raise ConfigError(f"data_shards.source={self.source!r}: cannot list it ({type(e).__name__}: {e})") from None
            names = [(o["key"], o["size"], o["etag"]) for o in objs]
        else:
            if not self.local_path:
                raise ConfigError("data_shards.source='local' needs local_path (a directory or glob)")
            root, files = _local_files(self.local_path)
            for f in files:  # footers only here (ms per file); run() decodes every page before any work
                check_source(f, deep=False)
            names = [(f.relative_to(root).as_posix(), f.stat().st_size, f) for f in files]
        if not names:
            raise ConfigError(f"data_shards.source={self.local_path or self.source!r}: no {', '.join(TEXT_EXTS)} "
                              f"files there; a source is {', '.join(NAMED)}, chitchat, an URL pattern with "
                              "{i:05d}, s3://bucket/prefix, or an existing local directory / glob")
        parquet_only = all(n.endswith(".parquet") for n, _, _ in names) and len(names) >= 2
        if parquet_only and not (self.min_doc_chars or self.max_doc_chars):
            n_train = len(names) - 1
            if self.train_shards:
                object.__setattr__(self, "train_shards", min(self.train_shards, n_train))
            else:
                object.__setattr__(self, "train_shards", n_train)
            names = names[:self.train_shards] + names[-1:]
        entries = [(n, s, tag if isinstance(tag, str) else file_sha256(tag)) for n, s, tag in names]
        return entries, not parquet_only

    def train_indices(self) -> tuple[int, ...]:
        return self.shard_indices or tuple(range(self.train_shards))

    def label(self) -> str:
        kind = _kind(self.source) if self.source != "local" else "local"
        if kind == "named":
            base = self.source.replace("-", "_")
        elif kind == "pattern":
            base = "s3" if self.source.startswith("s3://") else "http"
        elif kind == "s3":
            base = "s3_" + re.sub(r"[^A-Za-z0-9_.]", "_", self.source[5:].strip("/"))[:40]
        else:
            base = kind
        resharded = kind == "chitchat" or self.val_docs > 0
        return base if resharded or not self.train_shards else f"{base}_{self.train_shards}"


def _plan(cfg: Config) -> tuple[str, list[_Item]]:
    """('direct' | 'filter' | 'reshard', the files to bring in)."""
    kind = _kind(cfg.source) if cfg.source != "local" else "local"
    filters = bool(cfg.min_doc_chars or cfg.max_doc_chars)
    if kind in ("named", "pattern"):
        tpl = NAMED[cfg.source][0] if kind == "named" else cfg.source
        items = [_Item(tpl.format(i=i), "train", f"shard_{i:05d}.parquet") for i in cfg.train_indices()]
        items.append(_Item(tpl.format(i=cfg.val_shard), "val", f"shard_{cfg.val_shard:05d}.parquet"))
        return ("filter" if filters else "direct"), items
    if kind == "chitchat":
        return "reshard", [_Item(str(_chitchat_file()), "", "chitchat.json")]
    # A listed source: re-list and prove the files are the ones the config was built from (a file
    # now missing or unusable is the ConfigError that names it).
    fresh = dataclasses.replace(cfg, content_digest="").resolve().content_digest
    if fresh != cfg.content_digest:
        raise RuntimeError(f"{cfg.local_path or cfg.source} changed since the config was built (digest "
                           f"{fresh}, config {cfg.content_digest}): rebuild the config to take the new files")
    if kind == "s3":
        from stagekit.fetch import list_s3
        objs = [o for o in list_s3(cfg.source) if _ext(o["key"])]
        uris = [(f"s3://{cfg.source[5:].split('/')[0]}/{o['key']}", o["key"]) for o in objs]
    else:
        root, files = _local_files(cfg.local_path)
        uris = [(str(f), f.relative_to(root).as_posix()) for f in files]
    if cfg.val_docs:  # re-sharded: every file, in order
        return "reshard", [_Item(u, "", f"{k:05d}_{Path(n).name}") for k, (u, n) in enumerate(uris)]
    sel = uris[:cfg.train_shards] + uris[-1:]
    items = [_Item(u, "train", f"shard_{k:05d}.parquet") for k, (u, _) in enumerate(sel[:-1])]
    items.append(_Item(sel[-1][0], "val", f"shard_{len(uris) - 1:05d}.parquet"))
    return "direct", items


# ---- documents -----------------------------------------------------------------------------------
def _render_chitchat(conv: dict) -> str:
    """One conversation as plain text: a line per turn, speakers A/B by order of appearance."""
    speakers: dict[str, str] = {}
    lines = []
    for turn in conv["messages"]:
        if not turn:
            continue
        who = speakers.setdefault(turn[0]["sender"], "AB"[len(speakers) % 2])
        lines.append(f"{who}: " + " ".join(m["text"].strip() for m in turn if m["text"].strip()))
    return "\n".join(lines)


def _docs(path: Path, name: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    if name.endswith("chitchat.json"):
        for conv in json.loads(path.read_text()).values():
            yield _render_chitchat(conv)
    elif name.endswith(".parquet"):  # checked already: local sources by run(), downloads by fetch
        for batch in pq.ParquetFile(path).iter_batches(columns=["text"], batch_size=ROW_GROUP):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
                text = obj.get("text") if isinstance(obj, dict) else obj
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: expected a string or an object with a string 'text' field")
                yield text
    elif name.endswith(".txt"):
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def _keep(cfg: Config):
    lo, hi = cfg.min_doc_chars, cfg.max_doc_chars
    return lambda t: len(t) >= lo and (not hi or len(t) <= hi)


def _write_shard(path: Path, docs: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"text": pa.array(docs, type=pa.string())}), tmp, row_group_size=ROW_GROUP,
                   compression="zstd")
    os.replace(tmp, path)


def _reshard(cfg: Config, files: list[tuple[Path, str]], out: Path) -> dict:
    keep = _keep(cfg)
    held: collections.deque[str] = collections.deque()  # the last val_docs documents seen so far
    buf, chars, n_train, seen, dropped = [], 0, 0, 0, 0
    for path, name in files:
        for text in _docs(path, name):
            seen += 1
            if not keep(text):
                dropped += 1
                continue
            held.append(text)
            if len(held) <= cfg.val_docs:
                continue
            text = held.popleft()
            if cfg.train_shards and n_train >= cfg.train_shards:
                continue  # train is full; read on: the validation documents are the source's last ones
            buf.append(text)
            chars += len(text)
            if chars >= cfg.shard_chars:
                _write_shard(out / "train" / f"shard_{n_train:05d}.parquet", buf)
                n_train, buf, chars = n_train + 1, [], 0
    if buf and not (cfg.train_shards and n_train >= cfg.train_shards):
        _write_shard(out / "train" / f"shard_{n_train:05d}.parquet", buf)
        n_train += 1
    if n_train == 0:
        raise RuntimeError(f"{cfg.local_path or cfg.source}: only {len(held)} document(s) left after filtering "
                           f"({seen} read, {dropped} dropped), all needed for val_docs={cfg.val_docs}: "
                           "lower val_docs or relax min_doc_chars/max_doc_chars")
    _write_shard(out / "val" / f"shard_{n_train:05d}.parquet", list(held))
    return {"docs_read": seen, "docs_dropped": dropped}


def _filter_file(cfg: Config, src: Path, dst: Path) -> tuple[int, int]:
    import pyarrow.parquet as pq

    keep = _keep(cfg)
    texts = pq.read_table(src, columns=["text"]).column("text").to_pylist()
    kept = [t for t in texts if t is not None and keep(t)]
    if not kept:
        raise RuntimeError(f"{src.name}: every document was dropped by min_doc_chars={cfg.min_doc_chars} / "
                           f"max_doc_chars={cfg.max_doc_chars}")
    _write_shard(dst, kept)
    return len(texts), len(texts) - len(kept)


def split_stats(files: list[Path], threads: int = 2) -> dict:
    """Documents, characters and document-length percentiles of parquet files (DuckDB)."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads={max(1, threads)}")
    paths = ", ".join("'" + str(f).replace("'", "''") + "'" for f in files)
    row = con.execute(
        "SELECT count(*), sum(length(text)), min(length(text)), max(length(text)), avg(length(text)), "
        f"quantile_cont(length(text), [0.1, 0.5, 0.9, 0.99]) FROM read_parquet([{paths}])").fetchone()
    con.close()
    docs, chars, lo, hi, mean, q = row
    return {"files": len(files), "docs": int(docs), "chars": int(chars or 0), "bytes": sum(f.stat().st_size for f in files),
            "doc_chars": {"min": lo, "p10": q[0], "p50": q[1], "p90": q[2], "p99": q[3], "max": hi,
                          "mean": round(mean or 0, 1)}}


# ---- run -----------------------------------------------------------------------------------------
def _clear_unexpected(out: Path, keep: set[str]) -> None:
    """Drop everything a previous attempt left that this plan does not produce (kept: finished
    files and .partial downloads of expected files)."""
    for p in sorted(out.rglob("*"), reverse=True):
        rel = p.relative_to(out).as_posix()
        if p.is_dir():
            if not any(p.iterdir()):
                p.rmdir()
        elif rel not in keep and rel.removesuffix(".partial") not in keep:
            p.unlink()


def run(cfg: Config, inputs: dict[str, Input], out: Path) -> dict:
    from stagekit.fetch import PARTIAL_SUFFIX, fetch_many

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mode, items = _plan(cfg)
    t0 = time.time()
    remote = [it for it in items if it.uri.startswith(("http://", "https://", "s3://"))]
    for it in items:  # every page of every local source, before anything is copied or rewritten
        if it not in remote:
            check_source(Path(it.uri), deep=True)
    target = {it: (out / it.split / it.name) if mode == "direct" else out / _RAW / it.name for it in items}
    _clear_unexpected(out, {target[it].relative_to(out).as_posix() for it in remote})
    log.info("%s: %d file(s) (%d to download), mode %s", cfg.source if cfg.source != "local" else cfg.local_path,
             len(items), len(remote), mode)

    fetched = {}
    if remote:
        done = [0]

        def on_done(r):
            done[0] += 1
            log.info("[%d/%d] %s: %s", done[0], len(remote), r.path.name, "already present" if r.skipped else
                     f"{r.size / 2**20:.1f} MiB in {r.seconds:.1f}s" + (f" (resumed at {r.resumed_from})" if r.resumed_from else ""))
            progress(done[0], len(remote), phase="download", file=r.path.name)

        def validate(path: Path) -> None:  # parquet downloads (a mixed listing holds others too)
            if path.name.removesuffix(PARTIAL_SUFFIX).endswith(".parquet"):
                check_parquet(path)

        results = fetch_many([(it.uri, target[it]) for it in remote], workers=cfg.workers, validate=validate,
                             retries=cfg.retries, timeout=cfg.timeout, backoff=cfg.backoff, on_done=on_done)
        fetched = {it: r for it, r in zip(remote, results)}
    local = {it: Path(it.uri) for it in items if it not in fetched}
    if mode == "direct":
        for it, src in local.items():  # listed local parquet: copy byte-identical
            dst = target[it]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst.with_name(dst.name + ".tmp"))
            os.replace(dst.with_name(dst.name + ".tmp"), dst)
    extra = {}
    paths = {it: (fetched[it].path if it in fetched else local[it]) for it in items}
    if mode == "filter":
        docs = dropped = 0
        for it in items:
            n, d = _filter_file(cfg, paths[it], out / it.split / it.name)
            docs, dropped = docs + n, dropped + d
        extra = {"docs_read": docs, "docs_dropped": dropped}
    elif mode == "reshard":
        for d in ("train", "val"):
            shutil.rmtree(out / d, ignore_errors=True)  # a previous attempt's shards are rewritten
        extra = _reshard(cfg, [(paths[it], it.name) for it in items], out)
    shutil.rmtree(out / _RAW, ignore_errors=True)

    train, val = shard_files(out)
    record = []
    for f in train + val:
        rel = f.relative_to(out).as_posix()
        origin = next((it for it in items if mode != "reshard" and out / it.split / it.name == f), None)
        r = fetched.get(origin) if origin else None
        record.append({"path": rel, "size": f.stat().st_size, "sha256": r.sha256 if r and mode == "direct" else file_sha256(f),
                       "from": origin.uri if origin else None})
    sources = {"source": cfg.source, "local_path": cfg.local_path or None, "mode": mode,
               "inputs": [it.uri for it in items], "files": record}
    (out / SOURCES_FILE).write_text(json.dumps(redact_value(sources), indent=1) + "\n")  # no credentials in URLs
    seconds = time.time() - t0
    got = [r for r in fetched.values() if not r.skipped]
    dl_bytes = sum(r.downloaded for r in got)
    stats = {"train": split_stats(train, cfg.workers), "val": split_stats(val, cfg.workers)}
    for split, s in stats.items():
        log.info("%-5s %3d shard(s) %9d docs %13d chars  doc chars p10/p50/p90/p99 %s/%s/%s/%s", split, s["files"],
                 s["docs"], s["chars"], *(round(s["doc_chars"][k]) for k in ("p10", "p50", "p90", "p99")))
    return {
        "source": cfg.source, "mode": mode, "train_shards": len(train), "val_shards": len(val), **stats, **extra,
        "download": {"files": len(fetched), "fetched": len(got), "skipped": len(fetched) - len(got),
                     "resumed": sum(1 for r in got if r.resumed_from), "bytes": dl_bytes,
                     "seconds": round(seconds, 2), "mib_per_s": round(dl_bytes / 2**20 / max(seconds, 1e-9), 1)},
    }
