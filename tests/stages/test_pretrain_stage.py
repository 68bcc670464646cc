"""pretrain stage: config and presets; through execute with a local store on real inputs built by the
data_shards and tokenizer stages: a crash (the trainer SIGKILLed after a checkpoint), a rerun that
resumes in the same work dir, the committed layout, progress, the cache hit; a bad flag's LaunchError."""
from __future__ import annotations

import json
import re
import signal
import threading
import time
from dataclasses import fields

import psutil
import pytest

from core.checkpoint import check_tokenizer, load_model
from core.layouts import model_checkpoint
from core.train.pretrain import IDENTITY_FIELDS, PretrainConfig
from stages import pretrain
from stages.base import ConfigError, report_progress_to
from pipeline.execute import artifact_ref, execute
from stagekit.launch import LaunchError
from tests.train_helpers import store_with_data_and_tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data):
    """A local store with a data_shards artifact (real documents: 2 small train shards + val) and a
    tokenizer artifact trained on it by the tokenizer stage."""
    store, data, tok = store_with_data_and_tokenizer(tmp_path_factory.mktemp("pretrain-stage"),
                                                     shared_data / "corpus")
    return store, {"data": data.ref, "tokenizer": tok.ref}


def test_config_validation_identity_and_presets():
    cfg = pretrain.Config()
    assert cfg.label() == "d20" and cfg.world_size == 1
    ident = set(cfg.identity_dict())
    # the stage hashes what the trainer refuses to resume across, plus the machine's kernels
    assert ident == set(IDENTITY_FIELDS) | {"platform", "world_size"}
    trainer_fields = {f.name for f in fields(PretrainConfig)}
    assert set(cfg.runtime_dict()) - trainer_fields == {"nproc", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_id",
                                                        "omp_threads", "timeout", "heartbeat", "gpu_hour_price",
                                                        "extra_args", "resolved"}
    for kw, msg in [(dict(nproc=0), "nproc=0"), (dict(wandb="cloud"), "use one of disabled, offline, online"),
                    (dict(dtype="int8"), "pretrain.dtype"), (dict(nnodes=2), "rdzv_endpoint host:port"),
                    (dict(node_rank=1), "node_rank=1 must be in [0, nnodes=1)"),
                    (dict(window_pattern="SXL"), "use only S (short) and L"),
                    (dict(total_batch_size=1000, device_batch_size=2, max_seq_len=64),
                     "1,000 tokens is not a multiple of device_batch_size 2 x max_seq_len 64 x 1 process(es) = 128")]:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            pretrain.Config(**kw)
    with pytest.raises(ConfigError, match="unknown field"):
        pretrain.Config.from_dict({"dept": 3})
    for name in pretrain.PRESETS:
        assert pretrain.preset(name).label().startswith("d")
    speedrun = pretrain.preset("d24-speedrun")
    assert (speedrun.depth, speedrun.target_param_data_ratio, speedrun.fp8, speedrun.nproc) == (24, 8.0, True, 8)
    assert pretrain.preset("tiny", seed=3).seed == 3
    with pytest.raises(ConfigError, match="stage pretrain has no preset 'd99'"):
        pretrain.preset("d99")
    # runtime fields do not move the artifact, identity fields do
    a = pretrain.preset("tiny")
    assert a.identity_dict() == pretrain.preset("tiny", device_batch_size=1, wandb="offline", save_every=4).identity_dict()
    # the world size changes which documents make up a step: identity; how it splits is not
    assert a.identity_dict() != pretrain.preset("tiny", nproc=2).identity_dict()
    assert (pretrain.preset("tiny", nproc=2).identity_dict()
            == pretrain.preset("tiny", nnodes=2, rdzv_endpoint="10.0.0.1:29500").identity_dict())
    assert a.identity_dict() != pretrain.preset("tiny", loader_buffer=64).identity_dict()


def test_the_stage_plans_with_the_trainers_recipe():
    """The stage's plan (its step count and batch, what it logs and checks before launching) is the
    trainer's plan for the same run.json: every recipe field reaches derive(), the LRs included."""
    from core.scaling import derive

    cfg = pretrain.preset("tiny")
    run_json = cfg.trainer_config(data_dir="d", tok_dir="t", out="o", tokenizer_fingerprint="", eval_bundle_dir=None)
    assert pretrain._plan(cfg, 1024) == derive(PretrainConfig(**run_json), 1024)
    assert pretrain._plan(cfg, 1024).matrix_lr == pytest.approx(0.2 * (256 / 2 ** 19) ** 0.5)
    with pytest.raises(ConfigError, match="pretrain: the horizon gives 0 iterations"):
        pretrain._plan(pretrain.preset("tiny", num_iterations=-1, target_param_data_ratio=1e-6), 1024)


def _machine(monkeypatch, *, env_dtype: str = "", native_bf16: bool = True) -> None:
    """Simulate a machine: its NANORUN_DTYPE and whether its CPU multiplies bf16 natively."""
    from core.train import config

    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: native_bf16)
    if env_dtype:
        monkeypatch.setenv("NANORUN_DTYPE", env_dtype)
    else:
        monkeypatch.delenv("NANORUN_DTYPE", raising=False)


@pytest.mark.slow
def test_auto_values_are_resolved_when_the_plan_is_built(built, monkeypatch, capsys):
    """dtype=auto resolves per machine: two machines that would train in different dtypes get two
    fingerprints, two that resolve the same values share one (and the artifact says what was decided)."""
    from cli.main import main

    store, inputs = built
    small = dict(num_iterations=2, eval_every=-1, save_every=-1, sample_every=-1)
    _machine(monkeypatch, env_dtype="float32")
    fp32 = pretrain.preset("tiny", **small)
    assert (fp32.dtype, fp32.device_type, fp32.platform) == ("float32", "cpu", "cpu")
    assert fp32.resolved == ("dtype: auto -> float32 (NANORUN_DTYPE=float32)", "platform: cpu (this machine's "
                                                                               "kernels for cpu)")
    m = execute("pretrain", fp32, inputs, store)
    assert m.identity["dtype"] == "float32"
    assert json.loads((store.materialize(m.ref) / "run.json").read_text())["dtype"] == "float32"  # what it ran
    _machine(monkeypatch, native_bf16=True)  # a CPU with AMX: auto means bf16 there
    bf16 = pretrain.preset("tiny", **small)
    assert bf16.dtype == "bfloat16" and "avx512_bf16" in bf16.resolved[0]
    assert artifact_ref("pretrain", bf16, inputs) != m.ref
    _machine(monkeypatch, native_bf16=False)  # another machine, the same resolved values: the same artifact
    assert artifact_ref("pretrain", pretrain.preset("tiny", **small), inputs) == m.ref
    assert pretrain.Config.from_dict(dict(fp32.runtime_dict(), **fp32.identity_dict())).resolve() == fp32
    assert main(["--store", store.url, "show", str(m.ref)]) == 0
    out = capsys.readouterr().out
    assert "resolved when the plan was built:\n  dtype: auto -> float32 (NANORUN_DTYPE=float32)" in out


def _kill_trainer_after_checkpoint(work, stop: threading.Event, killed: list):
    """SIGKILL the trainer worker (not torchrun) once the first checkpoint is complete."""
    first = work / "checkpoints" / "step_000004" / "meta.json"
    while not stop.is_set():
        if first.exists():
            for p in psutil.Process().children(recursive=True):
                try:
                    cmd = p.cmdline()
                except psutil.Error:
                    continue
                if "core.train.pretrain" in cmd and "torch.distributed.run" not in cmd:
                    p.send_signal(signal.SIGKILL)
                    killed.append(p.pid)
            if killed:
                return
        time.sleep(0.002)


@pytest.mark.slow
def test_crash_then_rerun_resumes_and_commits_one_final_checkpoint(built):
    store, inputs = built
    # one thread per process: the CI box is shared and an oversubscribed OpenMP pool crawls
    # (checkpoints every 4 steps: the kill after the first leaves 20 steps of margin on a busy box)
    cfg = pretrain.preset("tiny", wandb="offline", gpu_hour_price=2.0, omp_threads=1, save_every=4)
    ref = artifact_ref(pretrain, cfg, inputs)
    work = store.work_dir(ref)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_trainer_after_checkpoint, args=(work, stop, killed), daemon=True)
    killer.start()
    try:
        with pytest.raises(LaunchError, match=r"pretrain exited with code 1(.|\n)*exitcode: -9") as e:
            execute(pretrain, cfg, inputs, store)
        # the one line a table or the CLI shows: the signal, where it stopped, where a rerun resumes
        assert re.fullmatch(r"pretrain killed by SIGKILL at step \d+; last checkpoint step [1-9]\d*", e.value.headline)
    finally:
        stop.set()
        killer.join()
    assert killed and not (work / "checkpoints" / "step_000024").exists()

    events = []
    with report_progress_to(lambda step, total, info: events.append((step, total, info))):
        m = execute(pretrain, cfg, inputs, store)
    assert m.ref == ref and m.provenance["resumed"] is True
    start_step = events[0][0]
    assert start_step in range(4, 24, 4) and events[0][1] == 24  # from the newest checkpoint in the work dir
    assert events[-1][:2] == (24, 24) and events[-1][2]["loss"] > 0 and events[-1][2]["tok_per_s"] > 0

    art = store.materialize(m.ref)
    paths = {f.path for f in m.files}
    assert {"checkpoint.json", "run.json", "train.log", "metrics.jsonl", "attempts.jsonl",
            "loss_curve.png"} <= paths
    assert sorted({p.split("/")[1] for p in paths if p.startswith("checkpoints/")}) == ["step_000024"]
    assert {"checkpoints/step_000024/model.pt", "checkpoints/step_000024/optim_rank0.pt"} <= paths
    assert any(p.startswith("wandb/offline-run-") for p in paths)
    assert (art / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (art / "train.log").read_text()
    assert f"resuming from {work / 'checkpoints' / f'step_{start_step:06d}'}" in log

    mt = m.metrics
    assert (mt["iterations"], mt["tokens"], mt["total_batch_size"], mt["grad_accum_steps"]) == (24, 6144, 256, 2)
    assert mt["checkpoint"] == "checkpoints/step_000024" and mt["attempts"] == 2
    assert mt["final_val_bpb"] < mt["val_bpb_curve"][0][1] and mt["min_val_bpb"] <= mt["final_val_bpb"]
    assert [s for s, _ in mt["val_bpb_curve"]] == [0, 8, 16, 24]  # each eval once across the two attempts
    assert [s for s, _ in mt["loss_curve"]] == list(range(1, 25))
    assert mt["final_train_loss"] == pytest.approx(mt["loss_curve"][-1][1], abs=1e-5) and mt["num_params"] > mt["num_scaling_params"] > 0
    assert mt["tok_per_s"] > 0 and mt["wall_time_s"] > 0 and mt["training_time_s"] >= 0
    assert mt["cost_estimate"] == pytest.approx(2.0 * mt["device_hours"], abs=1e-3) and mt["device_hours"] > 0

    model, meta = load_model(model_checkpoint(art))
    assert model.config.n_layer == 2 and meta["kind"] == "base"
    check_tokenizer(meta, inputs["tokenizer"].fingerprint, 1024, "test")  # the artifact's fingerprint
    assert meta["tokenizer"]["fingerprint"] == inputs["tokenizer"].fingerprint
    run_cfg = json.loads((art / "run.json").read_text())
    assert run_cfg["depth"] == 2 and run_cfg["tokenizer_fingerprint"] == inputs["tokenizer"].fingerprint

    seen = []  # a runtime change is the same artifact: a cache hit, nothing launched
    again = execute(pretrain, pretrain.preset("tiny", device_batch_size=1), inputs, store,
                    on_event=lambda k, i: seen.append(k))
    assert seen == ["cached"] and again.ref == m.ref and again.metrics == m.metrics


@pytest.mark.slow
def test_a_bad_trainer_flag_fails_with_the_trainers_message(built):
    store, inputs = built
    cfg = pretrain.preset("tiny", seed=5, extra_args=("--no-such-flag",), omp_threads=1)
    with pytest.raises(LaunchError) as e:
        execute(pretrain, cfg, inputs, store)
    msg = str(e.value)
    assert msg.startswith("pretrain exited with code 1") and "last error lines" in msg and "train.log" in msg
    assert "error: unrecognized arguments: --no-such-flag" in msg and "failed (exitcode: 2)" in msg
    assert "ChildFailedError" not in msg  # torchrun's own traceback says nothing about the cause
