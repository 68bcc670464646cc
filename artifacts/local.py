"""The local-directory backend (see artifacts/store.py for the layout and the interface), built on the
store; artifacts/__init__.py registers it with open_store for directory paths and file:// URLs.

Commit is a rename: the work dir lives under `{root}/.staging/{stage}/{label}-{fp}` on the same
filesystem, so after hashing (and fsyncing) its files it is renamed to `{root}/{stage}/{label}-{fp}`
and MANIFEST.json is written last (temp file + fsync + os.replace). A kill -9 at any point leaves
either no manifest (not committed; the rerun finds its work dir again, even if the rename already
happened) or a complete artifact. An artifact being replaced is first renamed into `.trash/`, which
uncommits it atomically, and is removed after the new one is in place.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from artifacts import verified
from artifacts.errors import ChecksumError, StoreError
from artifacts.files import (HASH_THREADS, copy_verified, dest_path, dir_size, flocked, fsync_dir, hash_tree,
                             newest_mtime, regular_size, sha256_file, write_atomic)
from artifacts.manifest import MANIFEST_NAME, ArtifactRef, Manifest
from artifacts.store import ALIASES, LEASES, GcItem, Store, VerifyResult, compare_files

log = logging.getLogger("nanorun.store")

STAGING = ".staging"
TRASH = ".trash"


def scan_dir(root: Path) -> tuple[dict[str, int], list[str]]:
    """({relative path: size} of the regular files under root but MANIFEST.json, sorted relative
    paths of the entries that are neither regular files nor directories). lstat and no followlinks:
    a link planted in an artifact is reported, never followed (a linked directory would otherwise
    bring in files from anywhere that no manifest describes)."""
    sizes, odd = {}, []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode) or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                odd.append(rel)
            elif stat.S_ISREG(st.st_mode) and rel != MANIFEST_NAME:
                sizes[rel] = st.st_size
    return sizes, sorted(odd)


def verify_folder(path: Path | str) -> VerifyResult | None:
    """A folder holding an artifact outside any store (`nanorun pull --to DIR` writes MANIFEST.json
    beside the files) checked against its own manifest as the store checks its artifacts: sizes,
    sha256 (remembered per unchanged file: artifacts/verified.py), unlisted files and links. None
    when the folder has no MANIFEST.json (nothing to check against)."""
    path = Path(path)
    if not (path / MANIFEST_NAME).is_file():
        return None
    m = Manifest.from_json((path / MANIFEST_NAME).read_bytes(), where=str(path / MANIFEST_NAME))
    sizes, odd = scan_dir(path)

    def digests(paths: list[str]) -> dict[str, str]:
        got, _ = verified.digests([path / p for p in paths])
        return {p: got[path / p] for p in paths}

    return VerifyResult(m.ref, compare_files(m, sizes, odd, digests), m, "size and sha256")


def require_intact_folder(path: Path | str) -> Manifest | None:
    """verify_folder, raising ChecksumError (one line) for a damaged folder; its manifest, if any."""
    v = verify_folder(path)
    if v is not None and not v.ok:
        raise ChecksumError(f"{path}: {v.one_line()}; not using it: pull it again (`nanorun pull {v.ref} --to "
                            f"{path}`)")
    return v.manifest if v is not None else None


class LocalStore(Store):
    def __init__(self, root: Path, index: bool = True):
        super().__init__(index)
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store root {self.root} exists and is not a directory")

    def _path(self, key: str) -> Path:
        return self.root / key

    # ---- primitives ---------------------------------------------------------------------------
    def _read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _write(self, key: str, data: bytes) -> None:
        write_atomic(self._path(key), data)

    def _remove(self, key: str) -> None:
        p = self._path(key)
        try:
            p.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        fsync_dir(p.parent)

    def _children(self, prefix: str, dirs: bool) -> list[str]:
        try:
            entries = list(os.scandir(self._path(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e.name for e in entries
                      if not e.name.startswith(".") and (e.is_dir(follow_symlinks=False) if dirs else e.is_file()))

    def _dirs(self, prefix: str) -> list[str]:
        return self._children(prefix, dirs=True)

    def _files(self, prefix: str) -> list[str]:
        return self._children(prefix, dirs=False)

    def _holds_artifacts(self, name: str) -> bool:
        # The local root doubles as $NANORUN_HOME, where other tools keep their own directories
        # (prefect/, ...): a stage directory is one that holds an artifact or an alias.
        for child in self._dirs(name):
            if child == ALIASES:
                return True
            try:
                ArtifactRef.parse(f"{name}/{child}")
                return True
            except ValueError:
                pass
        return False

    def _file_sizes(self, ref: ArtifactRef) -> dict[str, int]:
        return self._scan(ref)[0]

    def _scan(self, ref: ArtifactRef) -> tuple[dict[str, int], list[str]]:
        return scan_dir(self._path(ref.key))

    def _sha256(self, ref: ArtifactRef, path: str) -> str:
        return self._digests(ref, [path], recheck=True)[path]

    hashes_locally = True

    def _digests(self, ref: ArtifactRef, paths: list[str], recheck: bool) -> dict[str, str]:
        root = self._path(ref.key)
        got, _ = verified.digests([root / p for p in paths], recheck=recheck)
        return {p: got[root / p] for p in paths}

    # ---- leases: O_CREAT|O_EXCL to create; compare-and-swap under a flock to renew/take over ----
    def _lease_paths(self, ref: ArtifactRef) -> tuple[Path, Path]:
        base = self.root / LEASES / ref.stage
        return base / f"{ref.name}.json", base / f"{ref.name}.lock"

    def _lease_create(self, ref, data: bytes):
        path, _ = self._lease_paths(ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return data  # the token is the exact content we wrote (it holds a unique owner id)

    def _lease_read(self, ref):
        path, _ = self._lease_paths(ref)
        try:
            with open(path, "rb") as f:
                data, written = f.read(), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return data, data, self._clock() - written

    def _clock(self) -> float:
        """The store's "now": the mtime the filesystem gives a file touched now (on NFS, the server's
        clock, the same clock that stamped the lease records), never this host's wall clock."""
        probe = self.root / LEASES / ".clock"
        try:
            os.utime(probe)
        except FileNotFoundError:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.touch()
        return probe.stat().st_mtime

    def _lease_replace(self, ref, data: bytes, token):
        path, lock = self._lease_paths(ref)
        with flocked(lock):
            try:
                if path.read_bytes() != token:
                    return None
            except FileNotFoundError:
                return None
            write_atomic(path, data)
        return data

    def _lease_delete(self, ref, token) -> bool:
        path, lock = self._lease_paths(ref)
        with flocked(lock):
            try:
                if path.read_bytes() != token:
                    return False
            except FileNotFoundError:
                return False
            path.unlink()
        # The .lock file stays: unlinking it while another process waits on its flock would let a
        # third process lock a fresh inode, and two "exclusive" sections would overlap.
        return True

    def _lease_refs(self) -> list[ArtifactRef]:
        out = []
        for p in sorted((self.root / LEASES).glob("*/*.json")):
            try:
                out.append(ArtifactRef.parse(f"{p.parent.name}/{p.stem}"))
            except ValueError:
                pass
        return out

    # ---- building and committing --------------------------------------------------------------
    def work_dir_path(self, ref: ArtifactRef) -> Path:
        """Where work_dir(ref) is, creating and moving nothing (a plan looks for checkpoints there)."""
        return self._staging(ref)

    def _staging(self, ref: ArtifactRef) -> Path:
        return self.root / STAGING / ref.stage / ref.name

    def work_dir(self, ref: ArtifactRef, clear: bool = False) -> Path:
        """`{root}/.staging/{stage}/{name}`: the same directory on every attempt, with whatever the
        previous attempt left there (clear=True empties it). Call it while holding the lease."""
        staging = self._staging(ref)
        if clear and staging.exists():
            shutil.rmtree(staging)
        if not staging.exists():
            final = self._path(ref.key)
            if not clear and final.is_dir() and not (final / MANIFEST_NAME).exists():
                # A crash between the rename and the manifest write: the files are the work dir.
                staging.parent.mkdir(parents=True, exist_ok=True)
                os.rename(final, staging)
                log.info("%s: recovered the work dir of an interrupted commit", ref)
            staging.mkdir(parents=True, exist_ok=True)
        return staging

    def _to_trash(self, path: Path) -> None:
        trash = self.root / TRASH
        trash.mkdir(parents=True, exist_ok=True)
        os.rename(path, trash / f"{path.name}-{uuid.uuid4().hex[:8]}")  # atomic: uncommits at once

    def _empty_trash(self) -> None:
        for p in (self.root / TRASH).glob("*"):
            shutil.rmtree(p, ignore_errors=True)

    def _install(self, src: Path, ref: ArtifactRef) -> Path:
        final = self._path(ref.key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a replaced/damaged artifact or leftovers of a crashed commit
            self._to_trash(final)
        try:
            os.rename(src, final)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            # work dir on another filesystem: copy next to the store, then rename.
            tmp = self.root / STAGING / ".incoming" / f"{ref.name}-{uuid.uuid4().hex[:8]}"
            shutil.copytree(src, tmp)
            os.rename(tmp, final)
            shutil.rmtree(src, ignore_errors=True)
        fsync_dir(final.parent)
        return final

    def _commit(self, ref: ArtifactRef, work_dir: Path, manifest: Manifest) -> Manifest:
        m = replace(manifest, files=hash_tree(work_dir, fsync=True))
        final = self._install(work_dir, ref)
        write_atomic(final / MANIFEST_NAME, m.to_json())  # the commit point
        self._empty_trash()
        return m

    def _receive(self, src: Store, ref: ArtifactRef, manifest: Manifest) -> None:
        tmp = self.root / STAGING / ".incoming" / f"{ref.name}-{uuid.uuid4().hex[:8]}"
        try:
            src.pull(ref, tmp)  # verified copy, MANIFEST.json included: the rename commits it whole
            self._install(tmp, ref)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._empty_trash()

    # ---- reading ------------------------------------------------------------------------------
    def materialize(self, ref: ArtifactRef) -> Path:
        """The artifact directory itself, once every file matches the manifest's size and sha256
        (files unchanged since this machine last checked them are not rehashed: artifacts/verified.py).
        Treat it as read-only."""
        v = self.verify(ref, recheck=False)
        if v.manifest is None:
            self.require(ref)
        if not v.ok:
            raise ChecksumError(f"{v.one_line()} (in {self.url}); not using it: rebuild it (rerun its stage "
                                "with --force) or delete it")
        return self._path(ref.key)

    def pull(self, ref: ArtifactRef, dest_dir: Path | str) -> Path:
        """Copy the artifact into dest_dir (sha256-verified against the manifest; files already
        there and matching are kept), MANIFEST.json last."""
        m = self.require(ref)
        src, dest = self._path(ref.key), Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)

        def copy(f):
            d = dest_path(dest, f.path)
            if regular_size(d) == f.size and sha256_file(d)[1] == f.sha256:  # a link there is replaced
                return
            if not (src / f.path).is_file():
                raise ChecksumError(f"{ref} in {self.url} is damaged: missing file {f.path}")
            copy_verified(src / f.path, d, f)

        with ThreadPoolExecutor(min(HASH_THREADS, max(1, len(m.files)))) as pool:  # big files first
            list(pool.map(copy, sorted(m.files, key=lambda f: -f.size)))
        write_atomic(dest / MANIFEST_NAME, m.to_json())
        return dest

    # ---- deleting -----------------------------------------------------------------------------
    def _remove_tree(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def _delete_files(self, ref: ArtifactRef) -> None:
        final = self._path(ref.key)
        if final.exists():
            self._to_trash(final)
            self._empty_trash()

    def _artifact_age(self, ref: ArtifactRef) -> float:
        try:
            return time.time() - newest_mtime(self._path(ref.key))
        except FileNotFoundError:
            return float("inf")

    def _gc_local(self, live: set[ArtifactRef], grace_s: float) -> list[GcItem]:
        items = []
        now = time.time()
        for d in sorted((self.root / STAGING).glob("*/*")):
            if not d.is_dir():
                continue
            if d.parent.name == ".incoming":
                ref = None
            else:
                try:
                    ref = ArtifactRef.parse(f"{d.parent.name}/{d.name}")
                except ValueError:
                    continue
            if ref in live or now - newest_mtime(d) < grace_s:
                continue
            items.append(GcItem("staging", str(d), dir_size(d), "work dir of an unfinished build (no live lease)",
                                lambda d=d: shutil.rmtree(d, ignore_errors=True)))
        for d in sorted((self.root / TRASH).glob("*")):
            items.append(GcItem("trash", str(d), dir_size(d), "left by an interrupted replace/delete",
                                lambda d=d: shutil.rmtree(d, ignore_errors=True)))
        return items
