"""The pretraining loop (core/train/pretrain.py) run for real as a subprocess on the shared corpus:
bit-exact resume after SIGKILL, the same total batch on 1 and 2 gloo processes, refused resumes;
plus the helpers of core/train/common.py."""
from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch

from core.train.common import LoopState, ResumeError, check_resume
from core.train.telemetry import (MetricsLog, StepClock, format_step_line, measure_matmul_flops, parse_step_line,
                                  read_metrics)
from core.train.pretrain import IDENTITY_FIELDS, PretrainConfig, PretrainLoop, main, parse_config, train
from tests.train_helpers import (REPO, RUNTIME_TOLERANCE, assert_states_equal, final_state, make_data_dir,
                                 make_tokenizer_dir, run_trainer, trainer_cmd, trainer_env, weights_distance)

STEPS = 24  # the tiny preset: checkpoints at 8, 16, 24


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("pretrain-inputs")
    return (make_data_dir(root / "data", shared_data / "corpus"),
            make_tokenizer_dir(root / "tok", shared_data / "corpus"))


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run-a") / "out"
    r = run_trainer(trainer_cmd(*inputs, out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _rows(out, kind):
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == kind]


def _resume_matches(cmd: list[str], out, uninterrupted) -> None:
    """Rerun the interrupted command: it resumes and ends bit-identical to the uninterrupted run, and
    the metrics read as one run (every step once, the same losses and val bpb)."""
    r = run_trainer(cmd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming from" in r.stdout
    model_a, optim_a = final_state(uninterrupted, STEPS)
    model_b, optim_b = final_state(out, STEPS)
    assert_states_equal(model_a, model_b, "model")
    assert_states_equal(optim_a, optim_b, "optimizer")
    for kind, key in (("train", "raw_loss"), ("val", "val_bpb")):
        a, b = _rows(uninterrupted, kind), _rows(out, kind)
        assert [(r["step"], r[key]) for r in b] == [(r["step"], r[key]) for r in a]
    # MFU's denominator: the resumed attempt reuses the first attempt's measured peak (no jump)
    starts = _rows(out, "start")
    assert len(starts) == 2 and starts[1]["resumed"]
    assert starts[0]["derived"]["peak_flops"] == starts[1]["derived"]["peak_flops"]


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_gives_bitwise_identical_weights(inputs, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    # checkpoints every 4 steps here (a runtime setting: it must not change the weights), and the kill
    # right after the first leaves 20 steps of margin for a slow poll on a busy machine
    cmd = trainer_cmd(*inputs, out, "--save-every", "4")
    first = out / "checkpoints" / "step_000004" / "meta.json"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=trainer_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while not first.exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint after 240 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # killed mid-run: the end was not reached (else this test would not test a resume)
    assert not (out / "checkpoints" / f"step_{STEPS:06d}").exists()

    _resume_matches(cmd, out, uninterrupted)
    assert [r["step"] for r in _rows(out, "val")] == [0, 8, 16, 24]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_000020", "step_000024"]  # keep-checkpoints 2
    meta = json.loads((out / "checkpoints" / "step_000024" / "meta.json").read_text())
    assert meta["kind"] == "base" and meta["model_config"]["n_layer"] == 2 and meta["world_size"] == 1
    assert meta["tokenizer"]["vocab_size"] == 1024 and meta["tokenizer"]["fingerprint"].startswith("sha256:")
    assert meta["loop_state"]["min_val_bpb"] <= meta["val_bpb"]


def _term_after_step(cmd: list[str], log_path, step: int, timeout: float = 240) -> int:
    """Start a trainer in its own process group, SIGTERM the group (as stagekit/launch.py does) once it
    has logged optimizer step `step`; its exit status."""
    marker = f"step {step:05d}/{STEPS:05d} ("
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=trainer_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + timeout
        while marker not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, f"no step {step} after {timeout} s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)
        return proc.wait(timeout=60)


@pytest.mark.slow
def test_sigterm_saves_the_step_it_reached_and_the_rerun_resumes_bitwise(inputs, uninterrupted, tmp_path):
    """Preemption / a cancelled run: SIGTERM mid-run checkpoints at the next step boundary (not only at
    the save_every cadence, 8 here), exits 128+15, and the rerun ends bit-identical to an uninterrupted run."""
    out = tmp_path / "termed"
    cmd = trainer_cmd(*inputs, out)
    rc = _term_after_step(cmd, tmp_path / "termed.log", 2)
    log = (tmp_path / "termed.log").read_text()
    assert rc == 128 + signal.SIGTERM, log[-3000:]
    saved = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(saved) == 1 and 2 <= int(saved[0][5:]) < 8, (saved, log[-2000:])
    assert f"stopped by SIGTERM: rerun to resume from the checkpoint of step {int(saved[0][5:])}" in log

    _resume_matches(cmd, out, uninterrupted)


@pytest.mark.slow
def test_sigterm_under_torchrun_both_ranks_save_the_same_step(inputs, tmp_path):
    """Two gloo ranks agree on the step to stop at (an all-reduce of the flag), so the collective save
    completes with both ranks' shards and both exit."""
    out = tmp_path / "termed2"
    rc = _term_after_step(trainer_cmd(*inputs, out, nproc=2), tmp_path / "termed2.log", 2)
    log = (tmp_path / "termed2.log").read_text()
    assert rc != 0 and "stopped by SIGTERM" in log, log[-3000:]
    (ckpt,) = (out / "checkpoints").iterdir()
    names = {p.name for p in ckpt.iterdir()}
    assert {"meta.json", "rank0.pt", "rank1.pt", "optim_rank0.pt", "optim_rank1.pt"} <= names, names


@pytest.mark.slow
def test_two_gloo_processes_reach_the_same_total_batch_and_train(inputs, uninterrupted, tmp_path, shared_data):
    out = tmp_path / "two"
    # also the end-of-run CORE (split over the two ranks; 12 examples per task: 10-shot tasks need 11)
    # and the greedy samples
    r = run_trainer(trainer_cmd(*inputs, out, "--eval-bundle-dir", str(shared_data / "eval_bundle"),
                                "--core-metric-every", "100", "--core-metric-max-per-task", "12",
                                "--sample-every", "100", nproc=2))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (core,) = _rows(out, "core")
    n_tasks = len(core["tasks"])  # the tasks whose data the shared bundle carries
    assert core["step"] == STEPS and core["label"] == f"CORE over {n_tasks}/22 tasks (<= 12 examples/task)"
    assert -1 <= core["core"] <= 1 and n_tasks >= 15
    (samples,) = _rows(out, "sample")
    assert len(samples["samples"]) == 7 and samples["samples"][0].startswith("The capital of France is")
    one, two = _rows(uninterrupted, "start")[0]["derived"], _rows(out, "start")[0]["derived"]
    assert (one["world_size"], one["grad_accum_steps"]) == (1, 2)
    assert (two["world_size"], two["grad_accum_steps"]) == (2, 1)
    assert one["total_batch_size"] == two["total_batch_size"] == 256
    assert _rows(out, "train")[-1]["tokens"] == _rows(uninterrupted, "train")[-1]["tokens"] == STEPS * 256
    losses = [r["loss"] for r in _rows(out, "train")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.2, losses
    final = out / "checkpoints" / f"step_{STEPS:06d}"
    assert (final / "optim_rank0.pt").is_file() and (final / "optim_rank1.pt").is_file()  # ZeRO-2 shards
    # each rank reads its own rows: the process count changes what a step sees, far beyond summation
    # noise, so the stages hash the world size (stagekit/training.py)
    assert weights_distance(final_state(uninterrupted, STEPS)[0], final_state(out, STEPS)[0]) > 10 * RUNTIME_TOLERANCE
    # one process cannot continue what two started: refused, saying why (in-process: a fresh
    # interpreter per refusal would cost seconds of imports)
    code, err = _main_exit(trainer_cmd(*inputs, out)[3:])
    assert code == 2 and "saved by 2 process(es), this run has 1" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("flags, env", [(["--device-batch-size", "1"], {}), ([], {"OMP_NUM_THREADS": "2"})],
                         ids=["4 accumulation steps instead of 2", "2 threads instead of 1"])
def test_runtime_fields_keep_the_weights_within_the_stated_tolerance(inputs, uninterrupted, tmp_path, flags, env):
    """What makes a field runtime (docs/identity.md): changing it moves the final weights by less than
    RUNTIME_TOLERANCE (relative), here the device batch size (with gradient accumulation making up
    the same total batch) and the CPU threads."""
    out = tmp_path / "variant"
    r = subprocess.run(trainer_cmd(*inputs, out, *flags), cwd=REPO, env=trainer_env(**env), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    distance = weights_distance(final_state(uninterrupted, STEPS)[0], final_state(out, STEPS)[0])
    assert distance < RUNTIME_TOLERANCE, f"{flags or env}: the weights moved {distance:.2e}"


def _main_exit(argv: list[str]) -> tuple[int, str]:
    """Run the trainer's main() in this process; (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, err.getvalue()


@pytest.mark.slow  # needs the uninterrupted run
@pytest.mark.parametrize("flags, message", [
    (["--seed", "7"], "identity config differs (saved -> now: seed: 42 -> 7)"),
    (["--tokenizer-fingerprint", "abc123"], "this run has abc123 (vocab 1024)"),
])
def test_resume_with_another_recipe_or_tokenizer_is_refused(inputs, uninterrupted, flags, message):
    before = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    code, err = _main_exit(trainer_cmd(*inputs, uninterrupted, *flags)[3:])
    assert code == 2 and message in err and "refusing to resume" in err and "Traceback" not in err, err
    assert err.startswith("error: ResumeError: ")
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir()) == before


def test_a_total_batch_that_does_not_divide_is_refused(inputs, tmp_path):
    data, tok = inputs
    cfg = PretrainConfig(data_dir=str(data), tokenizer_dir=str(tok), out=str(tmp_path / "o"), depth=2, head_dim=64,
                         max_seq_len=64, device_batch_size=3, total_batch_size=256, num_iterations=2,
                         wandb="disabled", device_type="cpu")
    with pytest.raises(ValueError, match=r"not a multiple of device_batch_size 3 x seq 64 x 1 ranks"):
        train(cfg)


def test_fp8_on_a_cpu_is_refused_with_one_line(inputs, tmp_path):
    code, err = _main_exit(trainer_cmd(*inputs, tmp_path / "o", "--fp8")[3:])
    assert code == 2 and "FP8 training needs a CUDA GPU" in err and "Drop --fp8" in err and "Traceback" not in err, err


# ---- core/train/common.py and the config ---------------------------------------------------------


def test_step_line_round_trips():
    line = format_step_line(12, 300, 5.4321, 0.75, 0.1234, 8300.4, 1.23, 95.0, 3600.0)
    assert line.startswith("step 00012/00300 (4.0%) | loss 5.432100 | lrm 0.750 | dt 123.4ms | tok/s 8,300")
    p = parse_step_line(line)
    assert p == {"step": 12, "total": 300, "loss": 5.4321, "lrm": 0.75, "dt": 0.1234, "tok_per_s": 8300.0,
                 "mfu": 1.23}
    assert parse_step_line("step 00012/00300 | val bpb 1.2") is None
    nan = parse_step_line(format_step_line(1, 2, float("nan"), 1.0, 0.1, 1.0, 0.0, 0.0, None))
    assert math.isnan(nan["loss"]) and "eta ?" in format_step_line(1, 2, 1.0, 1.0, 0.1, 1.0, 0.0, 0.0, None)


def test_step_clock_skips_warmup_steps_and_estimates_eta():
    clock = StepClock(100, skip_first=2)
    for step in range(1, 5):
        clock.tick(1.0 if step > 2 else 50.0, step)
    assert clock.timed_steps == 2 and clock.training_time == 2.0 and clock.eta(4) == 96.0


def test_check_resume_rules(tmp_path):
    ident = {"depth": 2, "seed": 42}
    tok = {"fingerprint": "abc", "vocab_size": 1024}
    meta = {"identity": ident, "tokenizer": tok, "world_size": 2, "device_batch_size": 4}
    assert check_resume(meta, where=tmp_path, identity=ident, tokenizer=tok, world_size=2, device_batch_size=4) == []
    notes = check_resume(meta, where=tmp_path, identity=ident, tokenizer=tok, world_size=2, device_batch_size=2)
    assert len(notes) == 1 and "device batch size 4 -> 2" in notes[0] and "same tokens" in notes[0]
    with pytest.raises(ResumeError, match=r"depth: 2 -> 3"):
        check_resume(meta, where=tmp_path, identity={"depth": 3, "seed": 42}, tokenizer=tok, world_size=2)
    with pytest.raises(ResumeError, match=r"fp8: '<absent>' -> True"):
        check_resume(meta, where=tmp_path, identity={**ident, "fp8": True}, tokenizer=tok, world_size=2)
    with pytest.raises(ResumeError, match="vocab 1024.*vocab 2048"):
        check_resume(meta, where=tmp_path, identity=ident, tokenizer={**tok, "vocab_size": 2048}, world_size=2)
    with pytest.raises(ResumeError, match="saved by 2 process"):
        check_resume(meta, where=tmp_path, identity=ident, tokenizer=tok, world_size=8)
    with pytest.raises(ResumeError, match="no identity record"):
        check_resume({}, where=tmp_path, identity=ident, tokenizer=tok, world_size=2)


# meta.json "loop_state" as the trainers wrote it while the loop state was a plain dict: the typed
# state must write these bytes and read them back (checkpoints from then resume).
DICT_ERA_LOOP_STATES = {
    "pretrain": '{"smooth_train_loss": 4.25, "training_time": 1.5, "timed_steps": 6, "wall_time": 9.0, '
                '"wandb_id": null, "min_val_bpb": 3.1, "val_bpb": 3.2}',
    "pretrain-fresh": '{"smooth_train_loss": 0.0, "training_time": 0.0, "timed_steps": 0, "wall_time": 0.0, '
                      '"wandb_id": null, "min_val_bpb": Infinity, "val_bpb": null}',
    "sft": '{"smooth_train_loss": 1.5, "training_time": 2.0, "timed_steps": 3, "wall_time": 4.0, '
           '"wandb_id": "abc123", "val_loss": 1.25, "val_bpb": 0.75, "min_val_loss": 1.0}',
    "rl": '{"smooth_train_loss": 0.0, "training_time": 2.0, "timed_steps": 3, "wall_time": 4.0, '
          '"wandb_id": null, "reward": 0.5, "passk": [0.25, 0.5]}',
}


@pytest.mark.parametrize("name", sorted(DICT_ERA_LOOP_STATES))
def test_loop_state_reads_and_writes_the_checkpoint_format(name, tmp_path):
    from core.train.rl import RLLoop
    from core.train.sft import SFTLoop

    cls = {"pretrain": PretrainLoop, "pretrain-fresh": PretrainLoop, "sft": SFTLoop, "rl": RLLoop}[name]
    saved = DICT_ERA_LOOP_STATES[name]
    loop = cls()
    loop.restore(json.loads(saved), tmp_path)
    assert json.dumps(loop.to_dict()) == saved  # the same keys, order and values
    if name == "pretrain-fresh":
        assert json.dumps(PretrainLoop().to_dict()) == saved  # what a fresh run starts from
    assert loop.train_loss(10) == pytest.approx(loop.smooth_train_loss / (1 - 0.9 ** 10))


def test_loop_state_refuses_another_trainers_state(tmp_path):
    loop = PretrainLoop()
    loop.restore({"smooth_train_loss": 2.0}, tmp_path)  # a key it lacks keeps its start value
    assert loop.smooth_train_loss == 2.0 and loop.min_val_bpb == math.inf and loop.val_bpb is None
    with pytest.raises(ResumeError, match=r"\['passk', 'reward'\], which PretrainLoop does not carry"):
        PretrainLoop().restore(json.loads(DICT_ERA_LOOP_STATES["rl"]), tmp_path)
    assert LoopState().to_dict() == {"smooth_train_loss": 0.0, "training_time": 0.0, "timed_steps": 0,
                                     "wall_time": 0.0, "wandb_id": None}

def test_save_writes_the_loop_state_as_it_stands_at_the_save(tmp_path):
    """The checkpoint's loop_state includes this save's wall time (save() adds it, then writes)."""
    from core.common import DistInfo
    from core.train.common import Run, save

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = PretrainLoop(val_bpb=3.0, min_val_bpb=3.0)
    run = Run(info=DistInfo(ddp=False, rank=0, local_rank=0, world_size=1, device=torch.device("cpu")),
              dtype=torch.float32, out=tmp_path, metrics=MetricsLog(tmp_path / "metrics.jsonl"), loop=loop,
              t_process=time.time() - 5.0, total_steps=4)
    for step in (2, 4):
        save(run, step, model=model, optimizer=optimizer, loader_state={}, meta={"kind": "base"}, keep=2)
    metas = [json.loads((tmp_path / "checkpoints" / f"step_{s:06d}" / "meta.json").read_text()) for s in (2, 4)]
    assert list(metas[1])[:2] == ["kind", "loop_state"]  # the trainer's record, then the loop state
    assert metas[1]["loop_state"] == loop.to_dict() and loop.wall_time >= 5.0
    assert metas[0]["loop_state"]["wall_time"] >= 5.0 and metas[0]["loop_state"]["val_bpb"] == 3.0

def test_metrics_log_truncates_an_interrupted_attempt(tmp_path):
    m = MetricsLog(tmp_path / "metrics.jsonl")
    m.append("start", step=0)
    for step in range(1, 6):
        m.append("train", step=step, loss=1.0 / step)
    m.append("val", step=4, val_bpb=1.5)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # torn line of a killed writer
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 7
    assert m.truncate_after(3) == 3
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in rows] == [("start", 0), ("train", 1), ("train", 2), ("train", 3)]
    assert not MetricsLog(tmp_path / "x.jsonl", enabled=False).truncate_after(0)


def test_config_file_and_flags(tmp_path, capsys):
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"data_dir": "D", "tokenizer_dir": "T", "out": "O", "depth": 6, "seed": 3}))
    cfg = parse_config(["--config", str(cfg_file), "--depth", "8", "--no-compile", "--wandb", "disabled"])
    assert (cfg.depth, cfg.seed, cfg.compile, cfg.wandb, cfg.data_dir) == (8, 3, False, "disabled", "D")
    assert cfg.identity()["depth"] == 8 and "device_batch_size" not in cfg.identity()
    assert {"depth", "seed", "fp8", "total_batch_size", "matrix_lr", "dtype"} <= set(IDENTITY_FIELDS)
    cfg_file.write_text(json.dumps({"dept": 6}))
    with pytest.raises(SystemExit):
        parse_config(["--config", str(cfg_file)])
    assert "unknown key(s) ['dept']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--data-dir", "D", "--tokenizer-dir", "T", "--out", "O", "--wandb", "cloud"])
    assert "use one of disabled, offline, online" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--data-dir", "D", "--tokenizer-dir", "T"])
    assert "--out is required" in capsys.readouterr().err


def test_cpu_peak_flops_is_measured():
    flops = measure_matmul_flops("cpu", torch.float32, n=128, repeats=2)
    assert 1e6 < flops < 1e14


def test_wandb_rows_carry_the_references_keys(tmp_path):
    """total_training_time, total_training_flops and train/epoch on train rows (as nanochat logs them)."""
    from core.common import DistInfo
    from core.train.common import Run, log_eval, log_step

    class Recorder:
        rows = []

        def log(self, row, step=None):
            self.rows.append(row)

    run = Run(info=DistInfo(ddp=False, rank=0, local_rank=0, world_size=1, device=torch.device("cpu")),
              dtype=torch.float32, out=tmp_path, metrics=MetricsLog(tmp_path / "metrics.jsonl"),
              loop=LoopState(), start_step=8,
              total_steps=10, wandb=Recorder(), clock=StepClock(10, skip_first=0))
    try:
        for step in (9, 10):  # (a process's first step is never timed: warm-up)
            log_step(run, step, 2.0, 0.5, 0.25, tokens_per_step=100, flops_per_token=6.0, peak=1e9, epoch=2)
    finally:  # log_step's GC trick after the first step: give this test process its collector back
        gc.unfreeze()
        gc.enable()
    row = Recorder.rows[-1]
    assert row["total_training_flops"] == 6.0 * 100 * 10 and row["train/epoch"] == 2
    assert row["total_training_time"] == 0.25 and row["train/tok_per_sec"] == 400
    log_eval(run, 10, {"core_metric": 0.1, "centered_results": {"hellaswag": 0.2}}, kind="core", core=0.1)
    assert Recorder.rows[-1]["total_training_time"] == 0.25 and Recorder.rows[-1]["centered_results"]
    assert [r["kind"] for r in read_metrics(tmp_path / "metrics.jsonl")] == ["train", "train", "core"]
