"""A trainer's checkpoints, mirrored to the store while it runs, so that its build resumes on any
machine (the store side and its layout: artifacts/staging.py). Used by stagekit/training.py:

    sync = CheckpointSync(checkpoint_mirror(), out, logs=("metrics.jsonl", "attempts.jsonl", "train.log"))
    resumed_from = sync.restore()   # the store's newest snapshot, when newer than the work dir's
    sync.start()                    # uploads each new complete checkpoint in a background thread
    ...run the trainer...
    sync.stop(failed=returncode != 0)

What a snapshot holds: one complete checkpoint directory (checkpoints/step_NNNNNN/: model, every
rank's optimizer and loader/RNG state, meta.json) and the line logs a resumed run continues, cut
at their last complete line (the trainer may be mid-append): metrics.jsonl (the trainer drops the
rows past the checkpoint on resume), the attempts ledger and train.log. Not run.json: the stage
writes it afresh on every launch with this machine's paths.

Upload: the thread polls the checkpoint root every POLL_S seconds and uploads only the newest
complete checkpoint, so while one upload runs the saves it misses are skipped, never queued; the
trainer is never waited for. The snapshot's files are hard links, so the trainer's keep-last-K
pruning cannot pull them away mid-upload (and a checkpoint is linked only while it is the newest:
pruning starts after a newer save). After each upload the store keeps the snapshots of the
steps still on local disk, like the trainer's own pruning (artifacts/staging.CheckpointStaging.prune).
When the trainer fails, the newest checkpoint is snapshotted once more with the final logs (the
failed attempt's ledger row included) before the error goes on; when it succeeds, an upload in
progress is abandoned at the next file boundary: the artifact is about to be committed.
A machine lost outright keeps what the thread had uploaded: at most the last checkpoint interval
of work, plus whatever the upload of one checkpoint takes, is redone.

Restore: before launching, the newest complete snapshot whose step is past the work dir's newest
checkpoint is downloaded (every file checked against its sha256) next to the work dir, the logs
are moved in, then the checkpoint directory is renamed into checkpoints/ (the rename makes it
visible, as in core/checkpoint.py). A damaged snapshot is skipped for the next older one. Only
the listed logs and checkpoint directories are taken from a snapshot; the checkpoint files are
loaded by the trainer with weights_only=True, like every checkpoint.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

from core.checkpoint import list_checkpoints

log = logging.getLogger("nanorun.checkpoint_sync")

POLL_S = 1.0  # how often the upload thread looks for a new checkpoint (one directory listing)
CHECKPOINTS = "checkpoints"


class CheckpointSync:
    def __init__(self, staging, work: Path, logs: tuple[str, ...], poll_s: float = POLL_S):
        self.staging, self.work, self.logs, self.poll_s = staging, Path(work), tuple(logs), poll_s
        self.root = self.work / CHECKPOINTS
        self.uploaded = -1  # step of the newest checkpoint known to be in the store
        self.failed = -1  # step whose upload failed: retried only at the end, a newer one is tried next
        self._stop, self._abandon = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    def _scratch(self, what: str) -> Path:
        """A directory next to the work dir (same filesystem: renames and hard links work; outside
        it: never committed with the artifact), emptied."""
        d = self.work.parent / f".{self.work.name}.{what}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    # ---- restore -------------------------------------------------------------------------------
    def restore(self) -> int:
        """Bring in the store's newest snapshot if it is past the work dir's newest checkpoint;
        returns its step (0 when nothing was restored)."""
        local = list_checkpoints(self.root)
        have = local[-1][0] if local else 0
        for snap in reversed(self.staging.snapshots()):
            if snap.step == have:
                self.uploaded = have
            if snap.step <= have:
                break
            try:
                self._install(snap)
            except Exception as e:  # damaged or half-deleted: an older snapshot still beats step 0
                log.warning("cannot restore the checkpoint at step %d from %s (%s: %s); trying an older one",
                            snap.step, self.staging, type(e).__name__, e)
                continue
            log.info("restored the checkpoint at step %d (%s, saved on %s) from %s: resuming from it",
                     snap.step, _size(snap.bytes), snap.host, self.staging)
            self.uploaded = snap.step
            return snap.step
        return 0

    def _install(self, snap) -> None:
        tmp = self._scratch("restore")
        try:
            self.staging.fetch(snap, tmp)
            names = [p.name for p in tmp.iterdir() if p.name in self.logs and p.is_file()]
            dirs = [p for p in (tmp / CHECKPOINTS).iterdir() if p.is_dir()] if (tmp / CHECKPOINTS).is_dir() else []
            if [p.name for p in dirs] != [snap.name]:
                raise ValueError(f"the snapshot holds {sorted(p.name for p in dirs)} under {CHECKPOINTS}/, "
                                 f"expected {snap.name}")
            self.root.mkdir(parents=True, exist_ok=True)
            for name in names:  # the logs first: the checkpoint becomes visible last, by its rename
                os.replace(tmp / name, self.work / name)
            shutil.rmtree(self.root / snap.name, ignore_errors=True)
            os.replace(dirs[0], self.root / snap.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not any(step == snap.step for step, _ in list_checkpoints(self.root)):
            raise ValueError(f"{self.root / snap.name} is not a complete checkpoint")

    # ---- upload --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="checkpoint-sync", daemon=True)
        self._thread.start()

    def stop(self, failed: bool) -> None:
        """Stop the thread once its upload in progress is done. After a success that upload is
        abandoned at the next file (the artifact is committed next and the staging area dropped);
        after a failure the newest checkpoint is staged with the final logs, for a rerun anywhere."""
        if not failed:
            self._abandon.set()
        self._stop.set()
        self._thread.join()
        if failed:
            self.sync(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.sync()

    def sync(self, final: bool = False) -> None:
        """Upload the newest complete checkpoint if the store does not have it yet (final: in any
        case, to refresh its logs). Never raises: training goes on without the mirror."""
        ckpts = list_checkpoints(self.root)
        if not ckpts or (ckpts[-1][0] <= max(self.uploaded, self.failed) and not final):
            return
        step, path = ckpts[-1]
        try:
            snap_dir = self._scratch("upload")
            try:
                self._snapshot(path, snap_dir)
                now = list_checkpoints(self.root)
                if not now or now[-1][0] != step:  # a newer save landed meanwhile and may be pruning
                    return                          # this one: take the newer one next time
                snap = self.staging.upload(snap_dir, path.name, step, stop=self._abandon.is_set)
            finally:
                shutil.rmtree(snap_dir, ignore_errors=True)
            if snap is None:
                return
            self.staging.prune(keep={s for s, _ in list_checkpoints(self.root)} | {step})
            self.uploaded = step
            log.info("checkpoint at step %d (%s) staged in %s", step, _size(snap.bytes), self.staging)
        except Exception as e:
            self.failed = step
            log.warning("could not stage the checkpoint at step %d in %s (%s: %s); training goes on, but "
                        "only this machine can resume from it", step, self.staging, type(e).__name__, e)

    def _snapshot(self, ckpt: Path, dest: Path) -> None:
        """Hard links to the checkpoint's files, copies of the logs cut at their last full line."""
        for src in sorted(ckpt.rglob("*")):
            if src.is_file():
                d = dest / CHECKPOINTS / ckpt.name / src.relative_to(ckpt)
                d.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, d)
                except OSError:  # a filesystem without hard links
                    shutil.copyfile(src, d)
        for name in self.logs:
            if (self.work / name).is_file():
                data = (self.work / name).read_bytes()
                (dest / name).write_bytes(data[:data.rfind(b"\n") + 1])


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
