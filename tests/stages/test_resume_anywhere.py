"""Resume on any machine: a trainer's checkpoints mirrored to the store's staging area while it runs
(stagekit/checkpoint_sync.py over artifacts/staging.py) and restored on a machine without its work
dir. Unit tests on fake checkpoints, then the real thing: two NANORUN_HOMEs on one S3 (moto) store,
pretraining killed on "machine A" after its second checkpoint, rerun on "machine B", with final
weights equal to an uninterrupted run's."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from artifacts import open_store
from artifacts.staging import STAGING, CheckpointStaging
from stages import pretrain
from stagekit.checkpoint_sync import CheckpointSync
from pipeline.execute import artifact_ref, execute
from tests.artifacts.fixtures import REPO, make_ref, subprocess_env
from tests.train_helpers import assert_states_equal, final_state, store_with_data_and_tokenizer, trainer_env

LOGS = ("metrics.jsonl", "attempts.jsonl")


def _checkpoint(work, step: int) -> None:
    """A complete checkpoint as core/checkpoint.py makes one: files in step_N.tmp, then the rename."""
    tmp = work / "checkpoints" / f"step_{step:06d}.tmp"
    tmp.mkdir(parents=True)
    (tmp / "model.pt").write_bytes(bytes([step]) * 4096)
    (tmp / "rank0.pt").write_bytes(b"r%d" % step)
    (tmp / "meta.json").write_text(json.dumps({"step": step}))
    os.replace(tmp, work / "checkpoints" / f"step_{step:06d}")


def _prune(work, step: int) -> None:
    shutil.rmtree(work / "checkpoints" / f"step_{step:06d}")


def _steps(area) -> list[int]:
    return [s.step for s in area.snapshots()]


@pytest.fixture
def area(tmp_path):
    return CheckpointStaging(open_store(str(tmp_path / "store"), index=False), make_ref("d2"))


def test_sync_sends_only_the_newest_checkpoint_and_prunes_like_the_trainer(area, tmp_path):
    work = tmp_path / "a" / "work"
    sync = CheckpointSync(area, work, LOGS)
    sync.sync()  # no checkpoint yet: nothing to do
    assert area.snapshots() == []
    _checkpoint(work, 4)
    _checkpoint(work, 8)
    (work / "metrics.jsonl").write_text('{"step": 8}\n{"step": 9, "lo')  # the trainer is mid-append
    sync.sync()
    assert _steps(area) == [8]  # step 4 was never the newest when the uploader looked: skipped
    _checkpoint(work, 12)
    _prune(work, 4)
    sync.sync()
    assert _steps(area) == [8, 12]
    _checkpoint(work, 16)
    _prune(work, 8)
    sync.sync()
    assert _steps(area) == [12, 16]  # what the trainer keeps (its keep-last-2), nothing older

    # machine B: a fresh work dir gets the newest snapshot, logs cut at their last full line
    other = tmp_path / "b" / "work"
    assert CheckpointSync(area, other, LOGS).restore() == 16
    assert (other / "checkpoints" / "step_000016" / "model.pt").read_bytes() == bytes([16]) * 4096
    assert (other / "metrics.jsonl").read_text() == '{"step": 8}\n'
    assert not (other / "attempts.jsonl").exists()
    assert not list(other.parent.glob(".work.*"))  # the scratch dirs are gone
    assert CheckpointSync(area, other, LOGS).restore() == 0  # nothing newer than what it has


def test_restore_skips_a_damaged_snapshot_and_takes_only_logs_and_checkpoints(area, tmp_path, caplog):
    work = tmp_path / "a" / "work"
    _checkpoint(work, 4)
    (work / "run.json").write_text('{"data_dir": "/machine-a/path"}')
    sync = CheckpointSync(area, work, LOGS + ("run.json",))  # an uploader that (wrongly) ships run.json
    sync.sync()
    _checkpoint(work, 8)
    sync.sync()
    newest = area.snapshots()[-1]
    model = next(f for f in newest.files if f.path.endswith("model.pt"))
    (area.store.root / area.base / newest.name / model.key).write_bytes(b"\0" * model.size)

    other = tmp_path / "b" / "work"
    other.mkdir(parents=True)
    (other / "run.json").write_text('{"data_dir": "/machine-b/path"}')
    with caplog.at_level(logging.WARNING, "nanorun"):
        assert CheckpointSync(area, other, LOGS).restore() == 4
    assert "cannot restore the checkpoint at step 8" in caplog.text and "sha256" in caplog.text
    assert (other / "run.json").read_text() == '{"data_dir": "/machine-b/path"}'  # not a log: not taken
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == ["step_000004"]


def test_the_thread_uploads_while_training_and_a_failure_stages_the_final_logs(area, tmp_path, monkeypatch):
    work = tmp_path / "work"
    uploaded = threading.Event()
    upload = area.upload
    monkeypatch.setattr(area, "upload", lambda *a, **kw: (upload(*a, **kw), uploaded.set())[0])
    sync = CheckpointSync(area, work, LOGS, poll_s=0.01)
    sync.start()
    _checkpoint(work, 4)
    assert uploaded.wait(30)
    (work / "attempts.jsonl").write_text('{"returncode": -9}\n')  # the launcher's ledger row, after the kill
    sync.stop(failed=True)
    [snap] = area.snapshots()
    restored = tmp_path / "b"
    assert CheckpointSync(area, restored, LOGS).restore() == 4
    assert (restored / "attempts.jsonl").read_text() == '{"returncode": -9}\n'
    assert len({f.key.split("/")[0] for f in snap.files}) == 2  # the checkpoint was not sent twice

    uploaded.clear()
    sync = CheckpointSync(area, work, LOGS, poll_s=3600)
    assert sync.restore() == 0
    sync.start()
    sync.stop(failed=False)  # success: nothing more to send, the artifact is committed next
    assert not uploaded.is_set()


def test_a_failed_upload_is_warned_once_and_the_next_checkpoint_goes(area, tmp_path, monkeypatch, caplog):
    work = tmp_path / "work"
    calls, upload = [], area.upload

    def flaky(*a, **kw):
        calls.append(a[2])
        if len(calls) == 1:
            raise OSError("connection reset")
        return upload(*a, **kw)

    monkeypatch.setattr(area, "upload", flaky)
    sync = CheckpointSync(area, work, LOGS)
    _checkpoint(work, 4)
    with caplog.at_level(logging.WARNING, "nanorun"):
        sync.sync()
        sync.sync()  # no retry storm: the same checkpoint is not tried again every poll
    assert calls == [4] and caplog.text.count("could not stage the checkpoint at step 4") == 1
    _checkpoint(work, 8)
    sync.sync()
    assert calls == [4, 8] and _steps(area) == [8]


# ---- two machines, one S3 store ------------------------------------------------------------------
MACHINE_A = """
import json, logging, sys
from artifacts import ArtifactRef, open_store
from stages import pretrain
from pipeline.execute import execute
logging.basicConfig(level=logging.INFO)
url, inputs, overrides = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
execute(pretrain, pretrain.preset("tiny", **overrides), {k: ArtifactRef.parse(v) for k, v in inputs.items()},
        open_store(url, index=False))
"""


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _kill_tree(pid: int) -> None:
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _wait(what: str, cond, proc, log, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while not (found := cond()):
        assert proc.poll() is None, f"machine A exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.005)
    return found


@pytest.mark.slow
def test_pretrain_killed_on_one_machine_finishes_on_another(tmp_path, shared_data, s3_bucket, monkeypatch, caplog):
    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/runs"
    monkeypatch.setenv("NANORUN_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("NANORUN_HOME", str(tmp_path / "home-b"))
    local, data, tok = store_with_data_and_tokenizer(tmp_path / "inputs", shared_data / "corpus")
    store = open_store(url, index=False)
    inputs = {"data": local.push(data.ref, store).ref, "tokenizer": local.push(tok.ref, store).ref}
    overrides = dict(omp_threads=1, save_every=4, num_iterations=16)  # checkpoints at 4, 8, 12, 16
    cfg = pretrain.preset("tiny", **overrides)
    ref = artifact_ref(pretrain, cfg, inputs)
    area = CheckpointStaging(store, ref)

    # machine A: its own NANORUN_HOME (so its own work dir); frozen after its second checkpoint until
    # the uploader has staged it, then lost whole (stage process, torchrun and worker: SIGKILL)
    home_a = tmp_path / "home-a"
    log_a = tmp_path / "machine-a.log"
    with open(log_a, "w") as out:
        a = subprocess.Popen([sys.executable, "-c", MACHINE_A, url, json.dumps({k: str(r) for k, r in inputs.items()}),
                              json.dumps(overrides)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                             env=subprocess_env(NANORUN_HOME=home_a, OMP_NUM_THREADS=1))
    try:
        _wait("the second checkpoint", lambda: list(home_a.glob(
            f".s3/*/staging/pretrain/{ref.name}/checkpoints/step_000008/meta.json")), a, log_a)
        workers = [p for p in psutil.Process(a.pid).children(recursive=True)
                   if "core.train.pretrain" in _cmdline(p) and "torch.distributed.run" not in _cmdline(p)]
        assert workers
        for p in workers:
            p.send_signal(signal.SIGSTOP)
        _wait("the upload of the second checkpoint", lambda: [s for s in _steps(area) if s >= 8], a, log_a)
    finally:
        _kill_tree(a.pid)
        a.wait()
    resume_step = _steps(area)[-1]  # (an upload may have finished between the wait and the kill)
    assert resume_step < 16, "machine A finished before it could be stopped"

    # machine B: a fresh home, no work dir: fetches the staged checkpoint and finishes the run
    with caplog.at_level(logging.INFO, "nanorun"):
        m = execute(pretrain, cfg, inputs, store)
    assert f"restored the checkpoint at step {resume_step} " in caplog.text
    art = store.materialize(m.ref)
    [attempt] = [json.loads(line) for line in (art / "attempts.jsonl").read_text().splitlines()]
    assert attempt["resumed_from"] == resume_step and attempt["returncode"] == 0
    work_b = store.work_dir(ref)
    assert f"resuming from {work_b / 'checkpoints' / f'step_{resume_step:06d}'}" in (art / "train.log").read_text()
    starts = [json.loads(r) for r in (art / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["resumed"]) for r in starts if r["kind"] == "start"] == [(0, False), (resume_step, True)]
    assert [s for s, _ in m.metrics["loss_curve"]] == list(range(1, 17))  # one curve across both machines
    assert store._dirs(f"{STAGING}/pretrain") == []  # the staging area went with the commit

    # the same run, uninterrupted (the trainer straight from the artifact's run.json)
    run_cfg = {**json.loads((art / "run.json").read_text()), "out": str(tmp_path / "uninterrupted")}
    (tmp_path / "run.json").write_text(json.dumps(run_cfg))
    r = subprocess.run([sys.executable, "-m", "core.train.pretrain", "--config", str(tmp_path / "run.json")],
                       cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert_states_equal(final_state(tmp_path / "uninterrupted", 16), final_state(art, 16), "final state")
