"""The trainers' configs: one typed dataclass per trainer, the single source of every training option.

    from core.train.config import PretrainConfig, SFTConfig, parse_config
    cfg = PretrainConfig(depth=4, ...)                  # validated in __post_init__ (no I/O)
    cfg = parse_config(PretrainConfig, argv, prog="python -m core.train.pretrain")   # flags / --config JSON

Each field says what it is in its metadata, with the same keys as stages.base.identity()/runtime():
- "identity": changes the weights (a checkpoint resumes only with the same values; the stage hashes
  these into the artifact's fingerprint);
- "runtime": how the run executes (device batch size, cadences, wandb);
- "input": a path the stage fills in from its inputs (never part of a stage config).
The stages (stages/pretrain.py, stages/sft.py) build their Config from these fields
(stagekit.training.stage_fields), so a default or a rule lives here once. Torch-free on purpose: the
CLI imports the stages (and so this module) without paying for torch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

WANDB_MODES = ("disabled", "offline", "online")
DTYPES = ("auto", "bfloat16", "float32", "float16")
DEVICE_TYPES = ("", "cuda", "cpu", "mps")
# Every process holds the whole model's fp32 weights and gradients (ZeRO-2 shards only the optimizer
# state), 8 bytes per parameter; the largest accelerators hold 192 GB. A depth whose weights and
# gradients exceed this cannot train anywhere: refuse it before any allocation.
MAX_REPLICATED_BYTES = 2 ** 40


def opt(default, help: str, kind: str = "runtime"):
    return field(default=default, metadata={"kind": kind, "help": help})


def identity_opt(default, help: str):
    return opt(default, help, "identity")


def input_opt(help: str, required: bool = True):
    return field(default="", metadata={"kind": "input", "help": help, "required": required})


def type_problem(name: str, v, t: str) -> str | None:
    """What is wrong with value v for a field annotated t (as a string: these modules use postponed
    annotations), or None: a bool is not an int, an int is accepted for a float, no float is NaN or
    infinite; a JSON list is a tuple. One line naming the field. The stage configs use it too."""
    if t == "bool | None":
        ok = v is None or isinstance(v, bool)
    elif t == "bool":
        ok = isinstance(v, bool)
    elif t == "int":
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif t == "float":
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if ok and not math.isfinite(v):
            return f"{name}={v!r}: must be a finite number"
    elif t == "str":
        ok = isinstance(v, str)
    elif t.startswith("tuple"):
        ok = isinstance(v, (tuple, list))
    elif t.startswith("dict"):
        ok = isinstance(v, dict)
    else:
        ok = True
    return None if ok else f"{name}={v!r}: expected {t}, got {type(v).__name__}"


def _check_types(cfg) -> None:
    """Every field's value has its type (type_problem); floats given as ints become floats."""
    for f in fields(cfg):
        v, t = getattr(cfg, f.name), str(f.type)
        problem = type_problem(f.name, v, t)
        if problem:
            raise ValueError(problem)
        if t == "float":
            setattr(cfg, f.name, float(v))


def _check_common(cfg, positive: tuple[str, ...]) -> None:
    _check_types(cfg)
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: expected an integer >= 1")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}: use one of {', '.join(DTYPES)}")
    if cfg.device_type not in DEVICE_TYPES:
        raise ValueError(f"device_type={cfg.device_type!r}: use cuda, cpu or mps (empty = autodetect)")
    if cfg.wandb not in WANDB_MODES:
        raise ValueError(f"wandb={cfg.wandb!r}: use one of {', '.join(WANDB_MODES)}")
    if cfg.num_iterations < -1:
        raise ValueError(f"num_iterations={cfg.num_iterations}: expected -1 (off) or a number of steps")
    if cfg.eval_every > 0 and getattr(cfg, "eval_tokens", 1) < 1:
        raise ValueError("eval_tokens must be >= 1 when eval_every is on")


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def cpu_has_native_bf16() -> bool:
    """Does this CPU multiply bf16 natively (AVX512-BF16 or AMX)? Read from /proc/cpuinfo (Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_dtype(device_type: str, cuda_major: int | None = None) -> tuple[str, str]:
    """dtype="auto" on this machine: (dtype name, why). bf16 on SM80+ GPUs (cuda_major: the device's
    compute capability) and on CPUs with native bf16, fp32 elsewhere; NANORUN_DTYPE overrides. Why
    bf16 on such CPUs: the pretrain stage's cpu-demo setup ran 2.0x faster than fp32 at the same val
    bpb on a quiet machine (6,650 vs 3,382 tok/s, bpb 2.2048 vs 2.2030 after 40 steps;
    bench/pretrain_path.py), and reached its step-0 evaluation sooner. The stages call this when the
    plan is built, so the fingerprint hashes the dtype the run will use (stagekit/training.py)."""
    override = os.environ.get("NANORUN_DTYPE", "").strip().lower()
    if override:
        name = _DTYPE_ALIASES.get(override, override)
        if name not in DTYPES or name == "auto":
            raise ValueError(f"NANORUN_DTYPE={override!r}: use one of bfloat16, float32, float16")
        return name, f"NANORUN_DTYPE={override}"
    if device_type == "cuda":
        if cuda_major is not None and cuda_major >= 8:
            return "bfloat16", f"CUDA compute capability {cuda_major}.x >= 8"
        return "float32", f"CUDA compute capability {cuda_major}.x < 8 (no fast bf16)"
    if device_type == "cpu" and cpu_has_native_bf16():
        return "bfloat16", "CPU with native bf16 (avx512_bf16 / amx_bf16 in /proc/cpuinfo)"
    return "float32", f"{device_type or 'this device'} without native bf16"


def replicated_bytes(depth: int, aspect_ratio: int, head_dim: int) -> int:
    """A lower bound of the fp32 weights + gradients one process holds at this depth: the transformer
    matrices alone, 12 x depth x model_dim^2 (attention 4 d^2 + MLP 8 d^2 per layer, as
    core.gpt.count_params), model_dim as core.scaling.model_dims. Arithmetic only: no torch here."""
    model_dim = -(-depth * aspect_ratio // head_dim) * head_dim
    return 8 * 12 * depth * model_dim * model_dim


@dataclass
class PretrainConfig:
    # inputs and output (paths: the stage fills them in)
    data_dir: str = input_opt("data_shards artifact: train/ and val/ shard_*.parquet")
    tokenizer_dir: str = input_opt("tokenizer artifact (tokenizer.json, token_bytes.npy)")
    out: str = input_opt("output directory: checkpoints/, metrics.jsonl, wandb/ (resumes from its checkpoints)")
    tokenizer_fingerprint: str = input_opt("the tokenizer artifact's fingerprint (stored in checkpoints; "
                                           "default: a hash of tokenizer.json)", required=False)
    eval_bundle_dir: str = input_opt("CORE eval bundle directory (enables core_metric_every)", required=False)
    # model: the depth dial (identity: these change the weights)
    depth: int = identity_opt(20, "number of transformer layers; everything else derives from it")
    aspect_ratio: int = identity_opt(64, "model_dim = depth x aspect_ratio, rounded up to head_dim")
    head_dim: int = identity_opt(128, "attention head dimension")
    max_seq_len: int = identity_opt(2048, "context length")
    window_pattern: str = identity_opt("SSSL", "sliding windows tiled over layers: S = quarter context, L = full")
    # horizon: num_iterations > target_flops > target_param_data_ratio
    target_param_data_ratio: float = identity_opt(12.0, "tokens = ratio x scaling params (also sets batch and WD)")
    target_flops: float = identity_opt(-1.0, "train for this many FLOPs (-1 = off)")
    num_iterations: int = identity_opt(-1, "explicit number of optimizer steps (-1 = off)")
    # optimisation
    total_batch_size: int = identity_opt(-1, "tokens per optimizer step (-1 = auto from the Power Lines rule)")
    embedding_lr: float = identity_opt(0.3, "AdamW lr of the token embedding (before batch/width scaling)")
    unembedding_lr: float = identity_opt(0.008, "AdamW lr of lm_head (before batch/width scaling)")
    matrix_lr: float = identity_opt(0.02, "Muon lr of the transformer matrices (before batch scaling)")
    scalar_lr: float = identity_opt(0.5, "AdamW lr of the per-layer scalars (before batch scaling)")
    weight_decay: float = identity_opt(0.28, "Muon cautious weight decay at d12 (scaled by batch and horizon)")
    warmup_steps: int = identity_opt(40, "linear LR warmup steps")
    warmdown_ratio: float = identity_opt(0.65, "fraction of steps at the end with a linear LR decay")
    final_lr_frac: float = identity_opt(0.05, "LR at the end of the warmdown, as a fraction of the peak")
    loader_buffer: int = identity_opt(1000, "documents kept tokenized for best-fit packing (the reference's "
                                            "1000; it decides which documents share a row: part of the recipe)")
    seed: int = identity_opt(42, "model init and RNG seed")
    dtype: str = identity_opt("auto", "compute dtype: auto (bf16 on SM80+ GPUs and CPUs with native bf16, fp32 "
                                      "elsewhere) | bfloat16 | float32 | float16")
    fp8: bool = identity_opt(False, "FP8 matmuls in the transformer blocks (H100+ GPUs only)")
    fp8_recipe: str = identity_opt("tensorwise", "FP8 scaling: tensorwise | rowwise")
    # runtime: how the run is executed, not what it computes
    device_type: str = opt("", "cuda | cpu | mps (empty = autodetect)")
    device_batch_size: int = opt(32, "sequences per micro-batch per process")
    eval_every: int = opt(250, "val bits-per-byte every N steps and at the end (-1 = off)")
    eval_tokens: int = opt(20 * 524288, "validation tokens per evaluation (a fixed slice of the val shard)")
    core_metric_every: int = opt(2000, "CORE every N steps and at the end (-1 = off; needs eval_bundle_dir)")
    core_metric_max_per_task: int = opt(500, "CORE examples per task during training (-1 = all)")
    sample_every: int = opt(2000, "greedy samples every N steps and at the end (-1 = off)")
    save_every: int = opt(250, "checkpoint every N steps (-1 = only at the end)")
    keep_checkpoints: int = opt(2, "keep the newest K checkpoints")
    compile: bool | None = opt(None, "torch.compile the model and the optimizer steps (default: on CUDA, and on CPU "
                                     "for fp32 runs long enough to pay it back: core.train.common.maybe_compile)")
    wandb: str = opt("offline", "wandb mode: disabled | offline (no network; `wandb sync` later) | online")
    wandb_project: str = opt("nanorun", "wandb project")
    run_name: str = opt("", "wandb run name (default: d{depth})")

    def __post_init__(self):
        _check_common(self, ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size",
                             "keep_checkpoints", "loader_buffer"))
        self.window_pattern = self.window_pattern.upper()
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise ValueError(f"window_pattern={self.window_pattern!r}: use only S (short) and L (full)")
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "target_param_data_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        if not 0 <= self.warmdown_ratio <= 1 or not 0 <= self.final_lr_frac <= 1 or self.warmup_steps < 0:
            raise ValueError("warmdown_ratio and final_lr_frac must be in [0, 1], warmup_steps >= 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay}: must be >= 0")
        if self.fp8_recipe not in ("tensorwise", "rowwise"):
            raise ValueError(f"fp8_recipe={self.fp8_recipe!r}: use tensorwise or rowwise")
        need = replicated_bytes(self.depth, self.aspect_ratio, self.head_dim)
        if need > MAX_REPLICATED_BYTES:
            raise ValueError(f"depth={self.depth} (aspect_ratio {self.aspect_ratio}) needs ~{need / 2 ** 30:,.0f} GiB "
                             f"of fp32 weights and gradients on every process, more than the "
                             f"{MAX_REPLICATED_BYTES / 2 ** 30:,.0f} GiB any device holds; choose a smaller depth")

    def identity(self) -> dict:
        """The settings that change the weights; a checkpoint is resumable only with the same ones."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["kind"] == "identity"}


@dataclass
class SFTConfig:
    base_checkpoint: str = input_opt("the base model: a complete checkpoint directory (step_NNNNNN)")
    tokenizer_dir: str = input_opt("tokenizer artifact the base was trained with")
    mixture: str = input_opt('JSON file {"train": [specs], "val": [specs], "seed": N, "paths": {source: file}}')
    out: str = input_opt("output directory: checkpoints/, metrics.jsonl (resumes from its checkpoints)")
    tokenizer_fingerprint: str = input_opt("the tokenizer artifact's fingerprint (default: a hash of "
                                           "tokenizer.json)", required=False)
    # identity: the recipe (-1 = inherit from the base run, as the reference)
    max_seq_len: int = identity_opt(-1, "row length (-1 = the base model's context)")
    total_batch_size: int = identity_opt(-1, "tokens per optimizer step (-1 = the base run's)")
    num_iterations: int = identity_opt(-1, "optimizer steps (-1 = one pass over the mixture)")
    embedding_lr: float = identity_opt(-1.0, "AdamW lr of wte, raw (-1 = the base run's)")
    unembedding_lr: float = identity_opt(-1.0, "AdamW lr of lm_head, raw (-1 = the base run's)")
    matrix_lr: float = identity_opt(-1.0, "Muon lr, raw (-1 = the base run's)")
    scalar_lr: float = identity_opt(-1.0, "AdamW lr of the per-layer scalars, raw (-1 = the base run's)")
    init_lr_frac: float = identity_opt(0.8, "every LR starts at this fraction of the above")
    warmup_ratio: float = identity_opt(0.0, "fraction of the steps with a linear LR warmup")
    warmdown_ratio: float = identity_opt(0.5, "fraction of the steps at the end with a linear LR decay")
    final_lr_frac: float = identity_opt(0.0, "LR at the end, as a fraction of the initial LR")
    weight_decay: float = identity_opt(0.0, "Muon weight decay")
    load_optimizer: bool = identity_opt(True, "warm-start the optimizer state from the base checkpoint")
    buffer_size: int = identity_opt(100, "conversations kept rendered for best-fit packing (reference: 100)")
    seed: int = identity_opt(42, "RNG seed")
    dtype: str = identity_opt("auto", "compute dtype: auto (as pretraining) | bfloat16 | float32 | float16")
    # runtime
    device_type: str = opt("", "cuda | cpu | mps (empty = autodetect)")
    device_batch_size: int = opt(-1, "rows per micro-batch per process (-1 = the base run's)")
    eval_every: int = opt(200, "val loss every N steps and at the end (-1 = only at the end)")
    eval_tokens: int = opt(40 * 524288, "validation tokens per evaluation (at most one pass over the val mixture)")
    save_every: int = opt(200, "checkpoint every N steps (-1 = only at the end)")
    keep_checkpoints: int = opt(2, "keep the newest K checkpoints")
    compile: bool | None = opt(None, "torch.compile the model (default: on CUDA only)")
    wandb: str = opt("offline", "wandb mode: disabled | offline | online")
    wandb_project: str = opt("nanorun-sft", "wandb project")
    run_name: str = opt("", "wandb run name (default: sft-d{depth})")

    def __post_init__(self):
        _check_common(self, ("buffer_size", "keep_checkpoints", "eval_tokens"))
        for name in ("max_seq_len", "total_batch_size", "device_batch_size"):
            if getattr(self, name) == 0 or getattr(self, name) < -1:
                raise ValueError(f"{name}={getattr(self, name)}: expected -1 (the base run's) or >= 1")
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr"):
            if getattr(self, name) != -1 and getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0 (or -1: the base run's)")
        if not (0 <= self.warmup_ratio <= 1 and 0 <= self.warmdown_ratio <= 1 and
                self.warmup_ratio + self.warmdown_ratio <= 1 and 0 <= self.final_lr_frac <= 1):
            raise ValueError("warmup_ratio, warmdown_ratio (summing to <= 1) and final_lr_frac must be in [0, 1]")
        if self.init_lr_frac <= 0 or self.weight_decay < 0:
            raise ValueError(f"init_lr_frac={self.init_lr_frac} must be > 0, weight_decay={self.weight_decay} >= 0")

    def identity(self, mixture: dict | None = None) -> dict:
        ident = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["kind"] == "identity"}
        if mixture is not None:
            ident["mixture"] = {k: mixture[k] for k in ("train", "val", "seed")}
        return ident


@dataclass
class RLConfig:
    base_checkpoint: str = input_opt("the chat model to improve: a complete checkpoint directory (an sft run's)")
    tokenizer_dir: str = input_opt("tokenizer artifact the base was trained with")
    train_file: str = input_opt("GSM8K train split: {question, answer} per line (.jsonl) or the HF parquet")
    test_file: str = input_opt("GSM8K test split (held-out questions for pass@k)")
    out: str = input_opt("output directory: checkpoints/, metrics.jsonl (resumes from its checkpoints)")
    tokenizer_fingerprint: str = input_opt("the tokenizer artifact's fingerprint (default: a hash of "
                                           "tokenizer.json)", required=False)
    # identity: the recipe (reference: nanochat scripts/chat_rl.py)
    num_epochs: int = identity_opt(1, "passes over the GSM8K train questions")
    num_iterations: int = identity_opt(-1, "optimizer steps (-1 = num_epochs passes over the questions)")
    train_examples: int = identity_opt(-1, "use the first N questions of the (seed-42 shuffled) train split (-1 = all)")
    examples_per_step: int = identity_opt(16, "questions per optimizer step, across all processes")
    num_samples: int = identity_opt(16, "sampled replies per question (the group of its advantage baseline)")
    max_new_tokens: int = identity_opt(256, "generation budget per reply")
    temperature: float = identity_opt(1.0, "sampling temperature of the rollouts")
    top_k: int = identity_opt(50, "top-k sampling of the rollouts (0 = off)")
    embedding_lr: float = identity_opt(0.2, "AdamW lr of wte (before width scaling)")
    unembedding_lr: float = identity_opt(0.004, "AdamW lr of lm_head (before width scaling)")
    matrix_lr: float = identity_opt(0.02, "Muon lr of the transformer matrices")
    scalar_lr: float = identity_opt(0.5, "AdamW lr of the per-layer scalars")
    weight_decay: float = identity_opt(0.0, "Muon weight decay")
    init_lr_frac: float = identity_opt(0.05, "every LR starts at this fraction of the above, then decays linearly to 0")
    seed: int = identity_opt(42, "seed of the rollouts' sampling")
    dtype: str = identity_opt("auto", "compute dtype: auto (as pretraining) | bfloat16 | float32 | float16")
    # runtime
    device_type: str = opt("", "cuda | cpu | mps (empty = autodetect)")
    device_batch_size: int = opt(8, "replies per forward/backward pass (num_samples must be a multiple)")
    eval_every: int = opt(60, "pass@k on held-out questions every N steps and at the end (-1 = only at the end)")
    eval_examples: int = opt(400, "held-out test questions per evaluation")
    eval_samples: int = opt(8, "replies per test question: pass@1 ... pass@eval_samples")
    save_every: int = opt(60, "checkpoint every N steps (-1 = only at the end)")
    keep_checkpoints: int = opt(2, "keep the newest K checkpoints")
    wandb: str = opt("offline", "wandb mode: disabled | offline | online")
    wandb_project: str = opt("nanorun-rl", "wandb project")
    run_name: str = opt("", "wandb run name (default: rl-d{depth})")

    def __post_init__(self):
        _check_common(self, ("num_epochs", "examples_per_step", "num_samples", "max_new_tokens", "device_batch_size",
                             "eval_examples", "eval_samples", "keep_checkpoints"))
        if self.num_samples % self.device_batch_size and self.device_batch_size < self.num_samples:
            raise ValueError(f"num_samples={self.num_samples} is not a multiple of device_batch_size="
                             f"{self.device_batch_size}: every question's replies are split into equal passes")
        if self.train_examples == 0 or self.train_examples < -1:
            raise ValueError(f"train_examples={self.train_examples}: expected -1 (all) or >= 1")
        if self.temperature < 0 or self.top_k < 0:
            raise ValueError(f"temperature={self.temperature} and top_k={self.top_k} must be >= 0")
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "init_lr_frac"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay}: must be >= 0")

    def identity(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["kind"] == "identity"}


def identity_fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.metadata["kind"] == "identity")


def add_field_flags(p: argparse.ArgumentParser, cls, names: tuple[str, ...] | None = None) -> None:
    """A --flag per field of the config class cls (or per field in names), with its help; an absent
    flag is absent from the parsed namespace, so the class's own default applies."""
    for f in fields(cls):
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {f.default})")
        if str(f.type).startswith("bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(str(f.type), str), **kw)


def parse_config(cls, argv: list[str] | None, prog: str, description: str):
    """A trainer config from flags (--depth 4) and/or --config FILE.json (underscored keys; flags win).
    Every input path is required. Errors exit 2 with one line (argparse)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="JSON file with any of the options below (underscored keys); "
                                    "options given on the command line win")
    add_field_flags(p, cls)
    args = vars(p.parse_args(argv))
    config_file = args.pop("config", None)
    values = {}
    if config_file:
        values = json.loads(Path(config_file).read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            p.error(f"{config_file}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    values.update(args)
    try:
        cfg = cls(**values)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    for f in fields(cls):
        if f.metadata.get("required") and not getattr(cfg, f.name):
            p.error(f"--{f.name.replace('_', '-')} is required (or give it in --config)")
    return cfg
