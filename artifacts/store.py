"""The artifact store: one interface, two backends (local directory: artifacts/local.py, S3:
artifacts/s3.py), the same behaviour on both. This module is the bottom of the package: the modules
built on it (the backends, the run index, the staging area) register with it and it imports none of
them (artifacts/__init__.py wires them up; tests/artifacts/test_no_import_cycle.py keeps it so).

    store = open_store()                      # $NANORUN_STORE, else the local root $NANORUN_HOME
    store = open_store("s3://bucket/prefix")  # endpoint from $NANORUN_S3_ENDPOINT_URL (any S3 server)
    work = store.work_dir(ref)                # deterministic staging dir: survives crashes, for resume
    ... write files into work ...
    m = store.commit(ref, work, manifest)     # hashes files, moves/uploads them, writes MANIFEST.json last
    path = store.materialize(ref)             # local dir with the verified files (S3: resumable download)

Layout, relative to the root (a directory, or s3://bucket/prefix):
    {stage}/{label}-{fp}/...             the artifact's files
    {stage}/{label}-{fp}/MANIFEST.json   written last: its presence (parseable) is the commit
    {stage}/@aliases/{name}              a named pointer ({"ref": ...}); `latest` moves on every commit
    .leases/{stage}/{label}-{fp}.json    the build lease (artifacts/lease.py)
    _staging/{stage}/{label}-{fp}/...    checkpoints of a build still running or failed, for resuming
                                         it on another machine (artifacts/staging.py; remote stores)
Machine-local state always lives under $NANORUN_HOME: the run index (index.duckdb), and for S3
stores the staging and download-cache directories (.s3/<store-id>/...).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from artifacts.errors import AmbiguousRefError, ChecksumError, NotCommittedError, StoreError, UnknownRefError
from artifacts.files import write_atomic
from artifacts.lease import Lease, live_holder, read_lease
from artifacts.manifest import MANIFEST_NAME, ArtifactRef, CorruptManifestError, FileEntry, Manifest
from artifacts.redact import redact_value

log = logging.getLogger("nanorun.store")

ALIASES = "@aliases"
LEASES = ".leases"
_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")
MIN_PREFIX = 4
# a scheme (two letters at least: not a Windows drive) followed by anything but "//"
_MISTYPED_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:(?!//)")


def nanorun_home() -> Path:
    """Machine-local state: $NANORUN_HOME, else ~/.cache/nanorun."""
    return Path(os.environ.get("NANORUN_HOME") or "~/.cache/nanorun").expanduser().absolute()


def utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---- what plugs into the store ---------------------------------------------------------------
# Registered by artifacts/__init__.py, which Python runs before any artifacts.* module: every
# process that can reach open_store has them all.
Backend = Callable[[str, bool], "Store"]  # (the URL, a directory path for "file"; index) -> the store
GcSource = Callable[["Store", set, float], list["GcItem"]]  # (store, refs being built, grace_s) -> items
_BACKENDS: dict[str, Backend] = {}
_GC_SOURCES: dict[str, GcSource] = {}
_RUN_INDEX: Callable[[], object] | None = None  # RunIndex (artifacts/index.py): .record / .forget artifacts


def register_backend(scheme: str, open_backend: Backend) -> None:
    """open_store(f"{scheme}://...") builds its store with open_backend(url, index); "file" also
    serves plain paths."""
    _BACKENDS[scheme] = open_backend


def register_gc_source(name: str, items: GcSource) -> None:
    """Store.gc also removes items(store, live refs, grace_s): leftovers of a layer built on the store."""
    _GC_SOURCES[name] = items


def register_run_index(run_index: Callable[[], object]) -> None:
    """The machine's run index that commits, pushes and deletes keep up to date (unless index=False)."""
    global _RUN_INDEX
    _RUN_INDEX = run_index


def open_store(url: str | None = None, *, index: bool = True) -> "Store":
    """The store at `url`: `s3://bucket/prefix`, a directory path (or file://path); None means
    $NANORUN_STORE if set, else the local root $NANORUN_HOME (default ~/.cache/nanorun).
    index=False skips updating the machine's run index on commit (benchmarks, scratch stores)."""
    url = url or os.environ.get("NANORUN_STORE") or str(nanorun_home())
    if _MISTYPED_URL.match(url):  # `s3:/bucket/runs` would silently become a directory in the cwd
        raise StoreError(f"store {url!r} looks like a mistyped URL: write s3://bucket/prefix (two slashes), "
                         f"or ./{url} for a directory of that name")
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "file", url
    if scheme not in _BACKENDS:
        raise StoreError(f"unsupported store URL {url!r}: use a directory path or s3://bucket/prefix")
    return _BACKENDS[scheme](rest if scheme == "file" else url, index)


@dataclass
class VerifyResult:
    ref: ArtifactRef
    problems: list[str]
    manifest: Manifest | None = None
    check: str = "size"  # what was compared: "manifest" (unreadable) | "size" | "size and sha256"

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            n = len(self.manifest.files)
            return f"{self.ref}: OK ({n} files, {self.manifest.total_bytes:,} bytes, {self.check} checked)"
        return (f"{self.ref}: {len(self.problems)} problem(s) ({self.check} checked):\n"
                + "\n".join(f"  - {p}" for p in self.problems))

    def one_line(self) -> str:
        return f"{self.ref} is damaged: {'; '.join(self.problems)}"


def compare_files(m: Manifest, sizes: dict[str, int], odd: list[str],
                  digests: Callable[[list[str]], dict[str, str]] | None) -> list[str]:
    """What is wrong with an artifact's files against its manifest (one line each): `sizes` of the
    files present, `odd` entries that are not regular files, and digests(paths) -> {path: sha256}
    for the files of the right size (None: sizes only)."""
    problems = [f"not a regular file: {p} (a symlink or special file; artifacts hold regular files only)"
                for p in odd]
    for f in m.files:
        if f.path not in sizes:
            problems.append(f"missing file {f.path} ({f.size:,} bytes)")
        elif sizes[f.path] != f.size:
            problems.append(f"size mismatch {f.path}: manifest {f.size:,} bytes, store {sizes[f.path]:,}")
    listed = {f.path for f in m.files}
    problems += [f"unlisted file {p} ({sizes[p]:,} bytes): in the artifact but not in its manifest"
                 for p in sorted(set(sizes) - listed)]
    if digests is not None:
        todo = [f for f in m.files if sizes.get(f.path) == f.size]
        got = digests([f.path for f in todo])
        problems += [f"sha256 mismatch {f.path}: manifest {f.sha256[:16]}…, store {got[f.path][:16]}…"
                     for f in todo if got[f.path] != f.sha256]
    return problems


@dataclass
class GcItem:
    kind: str  # unreferenced | uncommitted | staging | stale-lease | trash | cache | multipart
    what: str
    bytes: int
    reason: str
    delete: Callable[[], None] = field(repr=False, compare=False, default=lambda: None)
    ref: ArtifactRef | None = None  # set for committed artifacts (index rows to drop)


@dataclass
class GcReport:
    items: list[GcItem]
    kept: list[str]  # things left alone on purpose, with why
    dry_run: bool

    @property
    def total_bytes(self) -> int:
        return sum(i.bytes for i in self.items)

    def format(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        lines = [f"{i.kind:<13} {i.bytes:>14,}  {i.what}  ({i.reason})" for i in self.items]
        lines += [f"kept          {'':>14}  {k}" for k in self.kept]
        lines.append(f"gc: {verb} {len(self.items)} item(s), {self.total_bytes:,} bytes")
        return "\n".join(lines)


class Store:
    """Backend-independent behaviour; subclasses implement the primitives marked below."""

    url: str

    def __init__(self, index: bool = True):
        self._use_index = index

    # ---- primitives every backend implements -----------------------------------------------
    def _read(self, key: str) -> bytes | None: raise NotImplementedError
    def _write(self, key: str, data: bytes) -> None: raise NotImplementedError  # atomic
    def _remove(self, key: str) -> None: raise NotImplementedError
    def _dirs(self, prefix: str) -> list[str]: raise NotImplementedError  # child "directories"
    def _files(self, prefix: str) -> list[str]: raise NotImplementedError  # child objects
    def _file_sizes(self, ref: ArtifactRef) -> dict[str, int]: raise NotImplementedError

    def _scan(self, ref: ArtifactRef) -> tuple[dict[str, int], list[str]]:
        """(_file_sizes, entries that are neither regular files nor directories: symlinks, fifos...)."""
        return self._file_sizes(ref), []

    def _sha256(self, ref: ArtifactRef, path: str) -> str: raise NotImplementedError
    def _lease_create(self, ref, data: bytes): raise NotImplementedError
    def _lease_read(self, ref) -> tuple[bytes, object, float] | None: raise NotImplementedError
    def _lease_replace(self, ref, data: bytes, token): raise NotImplementedError
    def _lease_delete(self, ref, token) -> bool: raise NotImplementedError
    def _lease_refs(self) -> list[ArtifactRef]: raise NotImplementedError
    def _commit(self, ref, work_dir: Path, manifest: Manifest) -> Manifest: raise NotImplementedError
    def _receive(self, src: "Store", ref: ArtifactRef, manifest: Manifest) -> None: raise NotImplementedError
    def _delete_files(self, ref: ArtifactRef) -> None: raise NotImplementedError
    def _artifact_age(self, ref: ArtifactRef) -> float: raise NotImplementedError
    def _gc_local(self, live: set[ArtifactRef], grace_s: float) -> list[GcItem]: raise NotImplementedError
    def work_dir(self, ref: ArtifactRef, clear: bool = False) -> Path: raise NotImplementedError
    def work_dir_path(self, ref: ArtifactRef) -> Path: raise NotImplementedError
    def materialize(self, ref: ArtifactRef) -> Path: raise NotImplementedError
    def pull(self, ref: ArtifactRef, dest_dir: Path | str) -> Path: raise NotImplementedError

    # ---- whole files and trees under any key (the resume staging area, artifacts/staging.py);
    # these defaults go through _read/_write, backends with large files stream instead ------------
    def _put_file(self, key: str, path: Path) -> None:
        self._write(key, Path(path).read_bytes())

    def _get_file(self, key: str, dest: Path, entry: FileEntry) -> None:
        """Download `key` to dest, renamed into place only if its size and sha256 match entry."""
        data = self._read(key)
        if data is None:
            raise StoreError(f"{self.url}/{key} is missing")
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise ChecksumError(f"{self.url}/{key}: {len(data):,} bytes that do not match the expected "
                                f"{entry.size:,} bytes sha256 {entry.sha256[:16]}…")
        write_atomic(Path(dest), data, durable=False)

    def _remove_tree(self, prefix: str) -> None:
        for name in self._files(prefix):
            self._remove(f"{prefix}/{name}")
        for name in self._dirs(prefix):
            self._remove_tree(f"{prefix}/{name}")

    # ---- manifests and verification ----------------------------------------------------------
    @staticmethod
    def _manifest_key(ref: ArtifactRef) -> str:
        return f"{ref.key}/{MANIFEST_NAME}"

    def manifest(self, ref: ArtifactRef) -> Manifest | None:
        """The committed manifest at ref, None if not committed; CorruptManifestError if unreadable."""
        data = self._read(self._manifest_key(ref))
        if data is None:
            return None
        m = Manifest.from_json(data, where=f"{self.url}/{self._manifest_key(ref)}")
        if m.ref != ref:
            raise CorruptManifestError(f"corrupt manifest at {self.url}/{self._manifest_key(ref)}: "
                                       f"it describes {m.ref}, not {ref}")
        return m

    def require(self, ref: ArtifactRef) -> Manifest:
        m = self.manifest(ref)
        if m is None:
            raise NotCommittedError(f"{ref} is not committed in {self.url} (run `nanorun ls` to see what is)")
        return m

    def verify(self, ref: ArtifactRef, fast: bool = False, deep: bool | None = None,
               recheck: bool = True) -> VerifyResult:
        """Check the manifest and every file against it: its size and, unless fast, its sha256;
        files in the artifact that the manifest does not list are problems too. Never raises for
        damage. recheck=True (`nanorun verify`) reads every byte again. recheck=False (a consumer:
        a cache hit, materialize) reuses this machine's earlier checks of files unchanged since
        (artifacts/verified.py), and on a remote store compares sizes only, since materialize
        hashes the bytes as it downloads them. `deep` is accepted for compatibility (sha256 is the
        default now)."""
        del deep
        try:
            m = self.manifest(ref)
        except CorruptManifestError as e:
            return VerifyResult(ref, [str(e)], None, "manifest")
        if m is None:
            return VerifyResult(ref, [f"not committed: no {MANIFEST_NAME} in {self.url}/{ref.key}"], None, "manifest")
        sizes, odd = self._scan(ref)
        hashing = not fast and (recheck or self.hashes_locally)
        problems = compare_files(m, sizes, odd, (lambda paths: self._digests(ref, paths, recheck)) if hashing else None)
        return VerifyResult(ref, problems, m, "size and sha256" if hashing else "size")

    hashes_locally = False  # the store's bytes are on this machine (verify hashes them even for consumers)

    def _digests(self, ref: ArtifactRef, paths: list[str], recheck: bool) -> dict[str, str]:
        """{path: sha256} of the stored files (a backend with local bytes remembers unchanged ones)."""
        with ThreadPoolExecutor(4) as pool:
            return dict(zip(paths, pool.map(lambda p: self._sha256(ref, p), paths)))

    # ---- listing and references ---------------------------------------------------------------
    def stages(self) -> list[str]:
        return sorted(d for d in self._dirs("") if re.match(r"^[a-z0-9][a-z0-9_]*$", d) and self._holds_artifacts(d))

    def _holds_artifacts(self, name: str) -> bool:
        """Is the top-level directory `name` a stage (not, say, the Prefect home under a local root)?"""
        return True

    def refs(self, stage: str | None = None) -> list[ArtifactRef]:
        """Every artifact directory (committed or not) under the given stage or all stages."""
        out = []
        for s in [stage] if stage else self.stages():
            for name in self._dirs(s):
                try:
                    out.append(ArtifactRef.parse(f"{s}/{name}"))
                except ValueError:
                    pass  # @aliases and anything that is not an artifact
        return sorted(out)

    def list(self, stage: str | None = None) -> list[Manifest]:
        """Manifests of every committed artifact (corrupt ones are logged and skipped)."""
        def load(ref):
            try:
                return self.manifest(ref)
            except CorruptManifestError as e:
                log.warning("skipping %s: %s", ref, e)
                return None
        refs = self.refs(stage)
        with ThreadPoolExecutor(8) as pool:
            return [m for m in pool.map(load, refs) if m is not None]

    def resolve(self, text: str) -> ArtifactRef:
        """`stage/label-fp`, a unique fingerprint prefix (>= 4 hex chars, optionally `stage/` or
        `stage/label-` before it) or `stage@alias` -> the committed ArtifactRef it names."""
        text = text.strip().strip("/")
        if "@" in text:
            stage, _, name = text.partition("@")
            ref = self.get_alias(stage, name)
            if ref is None:
                known = ", ".join(sorted(k for k in self.aliases(stage))) or "none"
                raise UnknownRefError(f"no alias {text!r} in {self.url} (aliases of {stage}: {known})")
            if self.manifest(ref) is None:
                raise UnknownRefError(f"alias {text} points to {ref}, which is no longer committed in {self.url}")
            return ref
        stage, _, rest = text.rpartition("/")
        label, _, prefix = rest.rpartition("-")
        if not _HEX_RE.match(prefix) or (stage and not re.match(r"^[a-z0-9][a-z0-9_]*$", stage)):
            raise UnknownRefError(f"not an artifact ref: {text!r} (expected stage/label-fingerprint, a "
                                  f"fingerprint prefix of at least {MIN_PREFIX} hex chars, or stage@alias)")
        if len(prefix) < MIN_PREFIX:
            raise UnknownRefError(f"fingerprint prefix {prefix!r} is too short: give at least {MIN_PREFIX} hex chars")
        if stage and stage not in self.stages():
            raise UnknownRefError(f"no artifacts of stage {stage!r} in {self.url} (stages: {', '.join(self.stages()) or 'none'})")
        candidates = [r for r in self.refs(stage or None)
                      if r.fingerprint.startswith(prefix) and (not label or r.label == label)]
        committed = [r for r in candidates if self._read(self._manifest_key(r)) is not None]
        if not committed:
            raise UnknownRefError(f"unknown ref {text!r}: no committed artifact matches in {self.url}")
        if len(committed) > 1:
            raise AmbiguousRefError(f"ambiguous ref {text!r} matches {len(committed)} artifacts: "
                                    + ", ".join(map(str, committed)) + "; give more of the fingerprint")
        return committed[0]

    # ---- aliases ------------------------------------------------------------------------------
    @staticmethod
    def _check_alias(stage: str, name: str) -> None:
        if not re.match(r"^[a-z0-9][a-z0-9_]*$", stage):
            raise StoreError(f"bad stage name {stage!r} in alias: lowercase letters, digits and _")
        if not _ALIAS_RE.match(name):
            raise StoreError(f"bad alias name {name!r}: letters, digits, '_', '.', '-'; must start alphanumeric")

    def set_alias(self, stage: str, name: str, ref: ArtifactRef) -> None:
        self._check_alias(stage, name)
        if ref.stage != stage:
            raise StoreError(f"alias {stage}@{name} cannot point to {ref}: that is a {ref.stage} artifact")
        self.require(ref)
        self._write(f"{stage}/{ALIASES}/{name}", json.dumps({"ref": str(ref), "set_at": utcnow()}).encode())

    def get_alias(self, stage: str, name: str) -> ArtifactRef | None:
        self._check_alias(stage, name)
        data = self._read(f"{stage}/{ALIASES}/{name}")
        if data is None:
            return None
        try:
            return ArtifactRef.parse(json.loads(data)["ref"])
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"alias {stage}@{name} in {self.url} is unreadable ({e}); set it again "
                             f"with `nanorun alias {stage}@{name} REF`") from e

    def delete_alias(self, stage: str, name: str) -> None:
        self._check_alias(stage, name)
        self._remove(f"{stage}/{ALIASES}/{name}")

    def aliases(self, stage: str | None = None) -> dict[str, ArtifactRef]:
        """{"stage@name": ref} for every alias (of one stage, or all)."""
        out = {}
        for s in [stage] if stage else self.stages():
            for name in self._files(f"{s}/{ALIASES}"):
                if _ALIAS_RE.match(name):
                    ref = self.get_alias(s, name)
                    if ref is not None:
                        out[f"{s}@{name}"] = ref
        return out

    # ---- commit, copy, delete -----------------------------------------------------------------
    def commit(self, ref: ArtifactRef, work_dir: Path | str, manifest: Manifest) -> Manifest:
        """Make the files in work_dir the committed artifact `ref` (the manifest's `files` are
        computed here; its other fields are kept). The manifest is written last; work_dir is
        consumed. Replaces an existing artifact at ref (uncommitting it first). Moves `latest`."""
        if manifest.ref != ref:
            raise ValueError(f"manifest describes {manifest.ref}, not {ref}")
        work_dir = Path(work_dir)
        if not work_dir.is_dir():
            raise StoreError(f"cannot commit {ref}: work dir {work_dir} does not exist")
        # Credentials inside URLs (a source, a command line) never reach a manifest or the index.
        manifest = replace(manifest, identity=redact_value(manifest.identity), runtime=redact_value(manifest.runtime),
                           metrics=redact_value(manifest.metrics),
                           provenance=redact_value({**manifest.provenance, "committed_at": utcnow()}))
        m = self._commit(ref, work_dir, manifest)
        self._write(f"{ref.stage}/{ALIASES}/latest", json.dumps({"ref": str(ref), "set_at": utcnow()}).encode())
        self._index_record(m)
        return m

    def push(self, ref: ArtifactRef, other: "Store", *, with_inputs: bool = False) -> Manifest:
        """Copy a committed artifact into another store (files verified, manifest last); with_inputs,
        every committed artifact it was built from first (each once, even where a damaged or hand-made
        manifest names the artifact itself or a cycle among its inputs)."""
        m = self.require(ref)
        if with_inputs:
            for inp in self._inputs_first(ref, m):
                self.push(inp, other)
        try:
            there = other.manifest(ref)
        except CorruptManifestError:
            there = None
        if there is not None and there.files == m.files and other.verify(ref, recheck=False).ok:
            return there
        lease = Lease(other, ref)
        if not lease.try_acquire():
            raise StoreError(f"{ref} is being built in {other.url} by {lease.holder.describe()}; retry when it is done")
        with lease:
            other._receive(self, ref, m)
        other._index_record(m)
        return m

    def _inputs_first(self, ref: ArtifactRef, m: Manifest) -> list[ArtifactRef]:
        """The committed artifacts `ref` was built from, directly or not, each before its consumers."""
        order: list[ArtifactRef] = []
        seen = {ref}
        stack = [(ref, iter(m.inputs.values()))]
        while stack:  # depth-first post-order without recursion: a cycle is only a visited node
            node, pending = stack[-1]
            inp = next(pending, None)
            if inp is None:
                stack.pop()
                if node != ref:
                    order.append(node)
            elif inp not in seen:
                seen.add(inp)
                there = self.manifest(inp)
                if there is not None:
                    stack.append((inp, iter(there.inputs.values())))
        return order

    def delete(self, ref: ArtifactRef) -> None:
        """Uncommit (manifest first), then remove the files and any alias pointing at ref."""
        self._remove(self._manifest_key(ref))
        self._delete_files(ref)
        for key, target in self.aliases(ref.stage).items():
            if target == ref:
                self.delete_alias(ref.stage, key.partition("@")[2])
        self._index_forget(ref)

    # ---- gc -----------------------------------------------------------------------------------
    def gc(self, dry_run: bool = True, grace_s: float = 3600.0) -> GcReport:
        """Remove uncommitted leftovers and committed artifacts no alias (nor a running build)
        reaches through its inputs. Things touched less than grace_s ago are left alone unless a
        dead lease proves nobody is working on them."""
        items: list[GcItem] = []
        kept: list[str] = []
        live: dict[ArtifactRef, object] = {}
        for ref in self._lease_refs():
            got = read_lease(self, ref)
            if got is None:
                continue
            info, token, age = got
            if live_holder(self, ref) is not None:
                live[ref] = info
            else:
                items.append(GcItem("stale-lease", f"{LEASES}/{ref.key}.json", 0, "owner gone or expired",
                                    lambda r=ref, t=token: self._lease_delete(r, t)))
        roots = set(self.aliases().values())
        for info in live.values():
            for r in getattr(info, "inputs", []) or []:
                try:
                    roots.add(ArtifactRef.parse(r))
                except ValueError:
                    pass
        committed: dict[ArtifactRef, Manifest] = {}
        for ref in self.refs():
            try:
                m = self.manifest(ref)
            except CorruptManifestError as e:
                kept.append(f"{ref} (corrupt manifest, not deleted automatically: {e})")
                continue
            if m is not None:
                committed[ref] = m
            elif ref in live:
                kept.append(f"{ref} (being built by {live[ref].describe()})")
            elif self._artifact_age(ref) < grace_s:
                kept.append(f"{ref} (uncommitted but touched less than {grace_s:.0f}s ago)")
            else:
                items.append(GcItem("uncommitted", ref.key, 0, "no manifest and no live builder",
                                    lambda r=ref: self._delete_files(r)))
        keep, todo = set(), [r for r in roots if r in committed]
        while todo:
            r = todo.pop()
            if r not in keep:
                keep.add(r)
                todo += [i for i in committed[r].inputs.values() if i in committed]
        for ref, m in sorted(committed.items()):
            if ref not in keep:
                items.append(GcItem("unreferenced", ref.key, m.total_bytes,
                                    "no alias reaches it", lambda r=ref: self.delete(r), ref))
        items += self._gc_local(set(live), grace_s)
        for source in _GC_SOURCES.values():  # the staging area's (artifacts/staging.py)
            items += source(self, set(live), grace_s)
        if not dry_run:
            for item in items:
                item.delete()
        return GcReport(items, kept, dry_run)

    # ---- run index hooks (best effort: the index can always be rebuilt from manifests) ---------
    def _index_record(self, m: Manifest) -> None:
        if self._use_index:
            _RUN_INDEX().record(self.url, m)

    def _index_forget(self, ref: ArtifactRef) -> None:
        if self._use_index:
            _RUN_INDEX().forget(self.url, ref)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
