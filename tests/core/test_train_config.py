"""core/train/config.py: the trainers' configs are validated up front (types, NaN, an impossible
depth refused at once), and each stage Config is derived from its trainer's config: one source."""
from __future__ import annotations

import dataclasses
import time

import pytest

from core.train.config import PretrainConfig, SFTConfig
from stages import pretrain, sft
from stages.base import ConfigError


@pytest.mark.parametrize("kw, msg", [
    (dict(seed=1.5), "seed=1.5: expected int"),
    (dict(seed=True), "seed=True: expected int, got bool"),            # a bool is not an int
    (dict(depth="4"), "depth='4': expected int"),
    (dict(fp8=1), "fp8=1: expected bool"),
    (dict(device_type="tpu"), "device_type='tpu'"),
    (dict(matrix_lr=0.0), "matrix_lr=0.0: must be > 0"),
    (dict(embedding_lr=-1.0), "embedding_lr=-1.0: must be > 0"),
    (dict(matrix_lr=float("nan")), "matrix_lr=nan: must be a finite number"),
    (dict(target_flops=float("inf")), "target_flops=inf: must be a finite number"),
    (dict(num_iterations=-2), "num_iterations=-2"),
    (dict(dtype="int8"), "dtype='int8': use one of auto, bfloat16, float32, float16"),
])
def test_pretrain_config_refuses_bad_values_with_one_line(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
        PretrainConfig(**kw)
    assert "\n" not in str(e.value)


def test_an_impossible_depth_is_refused_at_once():
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"depth=100000 .* GiB of fp32 weights and gradients"):
        PretrainConfig(depth=100000)
    with pytest.raises(ConfigError, match=r"pretrain\.depth=100000"):
        pretrain.Config(depth=100000)
    assert time.perf_counter() - t0 < 5
    PretrainConfig(depth=26)  # the reference's largest speedrun model is fine
    assert PretrainConfig(matrix_lr=1).matrix_lr == 1.0 and isinstance(PretrainConfig(matrix_lr=1).matrix_lr, float)


def test_sft_config_rules():
    for kw, msg in [(dict(matrix_lr=0.0), "matrix_lr=0.0: must be > 0 \\(or -1"), (dict(max_seq_len=0), "max_seq_len=0"),
                    (dict(seed=False), "seed=False: expected int"), (dict(init_lr_frac=float("nan")), "finite")]:
        with pytest.raises(ValueError, match=msg):
            SFTConfig(**kw)
    assert SFTConfig(matrix_lr=-1.0).matrix_lr == -1.0  # -1 = the base run's


@pytest.mark.parametrize("stage, trainer", [(pretrain, PretrainConfig), (sft, SFTConfig)])
def test_stage_config_and_trainer_config_cannot_disagree(stage, trainer, shared_data):
    """Every trainer field but the input paths is a stage field with the same default, kind and help;
    the stage's run.json builds the trainer config from them as they are."""
    stage_fields = {f.name: f for f in dataclasses.fields(stage.Config)}
    for f in dataclasses.fields(trainer):
        if f.metadata["kind"] == "input":
            assert f.name not in stage_fields
            continue
        s = stage_fields[f.name]
        assert (s.default, s.metadata["kind"], s.metadata["help"]) == (f.default, f.metadata["kind"],
                                                                       f.metadata["help"]), f.name
    extra = {"data_dir": str(shared_data / "chat")} if stage is sft else {}
    for name in stage.PRESETS:
        cfg = stage.preset(name, **extra)
        paths = (dict(data_dir="D", tok_dir="T", out="O", tokenizer_fingerprint="fp", eval_bundle_dir=None)
                 if stage is pretrain else dict(base_checkpoint="B", tokenizer_dir="T", mixture="M", out="O",
                                                tokenizer_fingerprint="fp"))
        run = trainer(**cfg.trainer_config(**paths))
        for f in dataclasses.fields(trainer):
            if f.metadata["kind"] != "input" and f.name != "run_name":
                assert getattr(run, f.name) == getattr(cfg, f.name), (name, f.name)
        # the identity the stage hashes is the identity the trainer refuses to resume across
        assert {k: v for k, v in cfg.identity_dict().items() if k in run.identity()} == run.identity()


def test_auto_dtype_is_bf16_on_cpus_that_multiply_bf16_natively(monkeypatch):
    """bf16 is not refused on CPU: where the CPU has AVX512-BF16/AMX the pretrain stage's setup ran
    2.0x faster than fp32 at the same val bpb (bench/pretrain_path.py), so auto picks it there."""
    import torch

    from core.train import common, config

    cpu = torch.device("cpu")
    monkeypatch.delenv("NANORUN_DTYPE", raising=False)
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: True)
    assert common.resolve_dtype("auto", cpu) == torch.bfloat16
    assert common.resolve_dtype("float32", cpu) == torch.float32
    monkeypatch.setenv("NANORUN_DTYPE", "float32")  # the documented override wins
    assert common.resolve_dtype("auto", cpu) == torch.float32
    monkeypatch.delenv("NANORUN_DTYPE")
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: False)
    assert common.resolve_dtype("auto", cpu) == torch.float32


def test_compile_default_cpu_fp32_only_for_runs_that_pay_it_back():
    """compile=None: always on CUDA; on CPU only fp32 runs of CPU_FP32_COMPILE_MIN_STEPS steps or more
    (docs/cpu-compile.md); an explicit flag always wins. torch.compile is lazy: nothing compiles here."""
    import torch

    from core.train.common import CPU_FP32_COMPILE_MIN_STEPS as N
    from core.train.common import maybe_compile

    cpu, cuda, net = torch.device("cpu"), torch.device("cuda"), torch.nn.Linear(2, 2)
    decide = lambda *a: maybe_compile(net, *a)[1]  # noqa: E731
    assert decide(None, cpu, torch.float32, N) and not decide(None, cpu, torch.float32, N - 1)
    assert not decide(None, cpu, torch.bfloat16, 10 * N) and not decide(None, cpu)
    assert decide(None, cuda, torch.bfloat16, 1)
    assert not decide(False, cpu, torch.float32, 10 * N) and decide(True, cpu, torch.bfloat16, 1)
    model, used = maybe_compile(net, None, cpu, torch.float32, N)
    assert used and model is not net
