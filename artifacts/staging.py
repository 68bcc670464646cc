"""Resume state of an unfinished build, kept in the store so that the build resumes on any machine.

A trainer stage checkpoints into its work dir, and for an S3 store that dir is machine-local
($NANORUN_HOME/.s3/...): a retry on another node, or after a spot instance is lost, would start
from step 0. So while such a stage runs, each complete checkpoint is also uploaded to the store
(stagekit/checkpoint_sync.py does that in a background thread and restores from it), here:

    {root}/_staging/{stage}/{label}-{fp}/STAGING.json                 {"ref", "updated", "host"}: for gc
    {root}/_staging/{stage}/{label}-{fp}/step_NNNNNN/{gen}/{path}     the files of one snapshot
    {root}/_staging/{stage}/{label}-{fp}/step_NNNNNN/STAGED.json      written last: the snapshot itself

A snapshot is a set of files under their paths in the work dir (a checkpoint directory plus the
logs a resume continues: metrics.jsonl, ...). Its STAGED.json lists every file's path, object key,
size and sha256 and is written after all of them, so, like an artifact's MANIFEST.json, its
presence is the commit: a kill mid-upload leaves a step dir nobody reads, removed by the next
prune. Snapshotting a step again (fresher logs after a failure) uploads only what changed, under a
new `{gen}` folder, and switches to it with one write of STAGED.json. Every download is checked
against the listed size and sha256.

execute() discards the area once the artifact is committed, and `nanorun gc` treats it like any
other uncommitted leftover: removed when its artifact is committed, or when no live lease protects
it and it was not updated for the grace period (gc_items below, which artifacts/__init__.py
registers with Store.gc: this module builds on the store, never the reverse).

Only the store's primitives are used (_read/_write/_dirs/_files/_remove, _put_file/_get_file to
stream large files, _remove_tree), so every backend gets it; mirroring is switched on only where
it is useful (checkpoint_staging below).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection

from artifacts.files import list_tree, sha256_file
from artifacts.lease import lost_lease
from artifacts.manifest import ArtifactRef, FileEntry
from artifacts.store import GcItem, Store

log = logging.getLogger("nanorun.staging")

STAGING = "_staging"  # not a stage name (those start with a letter or digit): listings skip it
MARKER = "STAGED.json"
INFO = "STAGING.json"


@dataclass(frozen=True)
class StagedFile(FileEntry):
    key: str = ""  # object key under the snapshot's step dir: {gen}/{path}

    def __post_init__(self):
        super().__post_init__()
        FileEntry(self.key, self.size, self.sha256)  # a key obeys the path rule too: relative, no ".."


@dataclass(frozen=True)
class Snapshot:
    name: str  # the step dir in the store (= the checkpoint directory's name in the work dir)
    step: int
    files: tuple[StagedFile, ...]
    uploaded_at: float
    host: str

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        return json.dumps({"step": self.step, "uploaded_at": self.uploaded_at, "host": self.host,
                           "files": [{"path": f.path, "key": f.key, "size": f.size, "sha256": f.sha256}
                                     for f in self.files]}, indent=1).encode()

    @classmethod
    def from_json(cls, name: str, data: bytes) -> "Snapshot":
        d = json.loads(data)
        files = tuple(StagedFile(f["path"], int(f["size"]), str(f["sha256"]), str(f["key"])) for f in d["files"])
        return cls(name, int(d["step"]), files, float(d["uploaded_at"]), str(d.get("host", "?")))


class CheckpointStaging:
    """The staging area of one artifact's build in one store."""

    def __init__(self, store: Store, ref: ArtifactRef):
        self.store, self.ref = store, ref
        self.base = f"{STAGING}/{ref.stage}/{ref.name}"

    def __str__(self) -> str:
        return f"{self.store.url}/{self.base}"

    # ---- reading -------------------------------------------------------------------------------
    def snapshots(self) -> list[Snapshot]:
        """The complete snapshots, oldest step first (a step dir without a readable STAGED.json is
        an upload that never finished: ignored)."""
        found = (self._snapshot(name) for name in self.store._dirs(self.base))
        return sorted((s for s in found if s is not None), key=lambda s: s.step)

    def _snapshot(self, name: str) -> Snapshot | None:
        data = self.store._read(f"{self.base}/{name}/{MARKER}")
        if data is None:
            return None
        try:
            return Snapshot.from_json(name, data)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("%s/%s: ignoring an unreadable %s (%s)", self, name, MARKER, e)
            return None

    def fetch(self, snap: Snapshot, dest: Path) -> None:
        """Download the snapshot's files under dest (each checked against its size and sha256:
        ChecksumError if one does not match)."""
        for f in snap.files:
            self.store._get_file(f"{self.base}/{snap.name}/{f.key}", Path(dest) / f.path, f)

    def age(self) -> float:
        """Seconds since an upload last started here (inf when unknown)."""
        try:
            return time.time() - float(json.loads(self.store._read(f"{self.base}/{INFO}") or b"")["updated"])
        except (ValueError, KeyError, TypeError):
            return float("inf")

    # ---- writing -------------------------------------------------------------------------------
    def upload(self, src: Path, name: str, step: int, stop: Callable[[], bool] = lambda: False) -> Snapshot | None:
        """Upload every file under src (laid out as in the work dir) as the snapshot `name` of
        `step`, then commit it by writing its STAGED.json. Files the step's current snapshot
        already holds (same path, size and sha256) are not sent again. Returns None, committing
        nothing, if stop() turns true on the way (checked between files) or this process lost the
        build's lease (the area is the new builder's now)."""
        if self._fenced():
            return None
        self.store._write(f"{self.base}/{INFO}", json.dumps(
            {"ref": str(self.ref), "updated": time.time(), "host": socket.gethostname()}).encode())
        prev = self._snapshot(name)
        have = {(f.path, f.size, f.sha256): f.key for f in (prev.files if prev else ())}
        gen = uuid.uuid4().hex[:8]
        files = []
        for rel in list_tree(Path(src)):
            if stop() or self._fenced():
                return None
            size, digest = sha256_file(Path(src) / rel)
            key = have.get((rel, size, digest))
            if key is None:
                key = f"{gen}/{rel}"
                self.store._put_file(f"{self.base}/{name}/{key}", Path(src) / rel)
            files.append(StagedFile(rel, size, digest, key))
        snap = Snapshot(name, step, tuple(files), time.time(), socket.gethostname())
        if self._fenced():
            return None
        self.store._write(f"{self.base}/{name}/{MARKER}", snap.to_json())  # the commit point
        used = {f.key.partition("/")[0] for f in files}
        for old in self.store._dirs(f"{self.base}/{name}"):  # generations the new STAGED.json left behind
            if old not in used:
                self.store._remove_tree(f"{self.base}/{name}/{old}")
        return snap

    def prune(self, keep: Collection[int]) -> None:
        """Delete the complete snapshots whose step is not in `keep` (the newest one always stays)
        and every unfinished upload. Only the build's one uploader calls it (it holds the lease)."""
        if self._fenced():
            return
        complete = {s.name: s for s in self.snapshots()}
        newest = max(complete.values(), key=lambda s: s.step, default=None)
        for name in self.store._dirs(self.base):
            s = complete.get(name)
            if s is None or (s.step not in keep and s is not newest):
                self.store._remove_tree(f"{self.base}/{name}")

    def _fenced(self) -> bool:
        """True once this process has lost the build lease of ref: it must not touch the area."""
        lost = lost_lease(self.ref)
        if lost is not None:
            log.warning("%s: not writing resume checkpoints: %s", self, lost.lost_message())
        return lost is not None

    def discard(self) -> None:
        """Remove the whole area (the artifact is committed, or a forced rebuild starts over). Best
        effort: a leftover costs only storage, and `nanorun gc` removes it."""
        try:
            self.store._remove_tree(self.base)
        except Exception as e:
            log.warning("could not remove the resume checkpoints in %s (%s); `nanorun gc` will", self, e)


def checkpoint_staging(store: Store, ref: ArtifactRef, work: Path, clear: bool = False) -> CheckpointStaging | None:
    """The staging area execute() hands to the stage building `ref` in `work` (emptied first when
    clear: a forced rebuild starts from nothing), or None where mirroring is pointless: a local
    store keeps its work dirs inside its own root (.staging/), so every machine that sees the store
    already sees the checkpoints. NANORUN_MIRROR_CHECKPOINTS=0 turns it off for remote stores too
    (their checkpoints then resume only on the machine that wrote them)."""
    root = getattr(store, "root", None)
    if os.environ.get("NANORUN_MIRROR_CHECKPOINTS", "1") == "0" or (root and Path(work).is_relative_to(root)):
        return None
    staging = CheckpointStaging(store, ref)
    if clear:
        staging.discard()
    return staging


def gc_items(store: Store, live: set[ArtifactRef], grace_s: float) -> list[GcItem]:
    """Staging areas `nanorun gc` removes: those of committed artifacts (a discard that failed),
    and those of unfinished builds that no live lease protects and nobody updated for grace_s."""
    items = []
    for stage in store._dirs(STAGING):
        for name in store._dirs(f"{STAGING}/{stage}"):
            try:
                ref = ArtifactRef.parse(f"{stage}/{name}")
            except ValueError:
                continue
            area = CheckpointStaging(store, ref)
            committed = store._read(store._manifest_key(ref)) is not None
            if ref in live or (not committed and area.age() < grace_s):
                continue
            why = ("resume checkpoints of an artifact now committed" if committed else
                   "resume checkpoints of an unfinished build (no live lease)")
            items.append(GcItem("staging", str(area), sum(s.bytes for s in area.snapshots()), why, area.discard))
    return items
