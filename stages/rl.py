"""Stage rl: a chat model improved on GSM8K by reinforcement learning (core/train/rl.py under torchrun).

    nanorun stage rl --preset cpu-demo --set data_dir=../shared/data/chat \\
        --input base=sft@latest --input tokenizer=tokenizer@latest        # a few minutes on 2 CPU cores
    nanorun stage rl --preset d20 --input base=sft@latest --input tokenizer=tokenizer@latest   # 8 GPUs

    m = execute("rl", preset("tiny", data_dir="../shared/data/chat"), {"base": sft_ref, "tokenizer": tok_ref}, store)
    m.metrics["final_passk"], m.metrics["reward_curve"]

The recipe is the reference's (nanochat scripts/chat_rl.py; see core/train/rl.py): on-policy
REINFORCE over GSM8K train, 16 questions x 16 samples per step, pass@k on held-out test questions.
GSM8K sources (identity: `train_source` / `test_source`) are resolved as the sft stage's mixture
sources: a file name in `data_dir` (identified by its sha256, e.g. ../shared/data/chat's
gsm8k_train.jsonl) or an URL (downloaded into the work dir, checked against `train_sha256` /
`test_sha256` when given; the GPU presets use the reference's Hugging Face parquet files). A
missing file is a ConfigError (one line, exit 2). The base is an sft artifact; a pretrain base is
allowed (a warning: it has not learnt the chat format, the rewards stay ~0).

The artifact has the sft layout, so chat_eval, export, chat and serve take it as a model:
checkpoint.json -> checkpoints/step_N (kind "rl"), run.json, metrics.jsonl (train, rollout, passk
rows), train.log, attempts.jsonl, rl_curve.png (reward and pass@k against steps).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from core.tasks.mixture import REFERENCE_SOURCES
from core.train.config import RLConfig
from stages.base import ConfigError, Input, identity, runtime, stage_logger
from stagekit.reporting import plot_rl_curves
from stagekit.sources import SOURCES_DIR, SourcedConfig, normalise_specs, resolve_sources
from stagekit.training import LaunchConfig, launch_trainer, read_training, seal_training_dir, stage_fields, trainer_values

NAME = "rl"
code_version = "1"
INPUTS = ("base", "tokenizer")

log = stage_logger(NAME)


@dataclass(frozen=True)
class Config(SourcedConfig, LaunchConfig, stage_fields(RLConfig, "RL")):
    """The trainer's fields (core/train/config.py RLConfig), how it is launched, and the GSM8K sources."""
    train_source: str = identity("gsm8k_train.jsonl", help="GSM8K train split: a file name in data_dir or an URL")
    test_source: str = identity("gsm8k_test.jsonl", help="GSM8K test split (pass@k): a file name in data_dir or an URL")
    train_sha256: str = identity("", help="expected sha256 of an URL train_source's download (optional)")
    test_sha256: str = identity("", help="expected sha256 of an URL test_source's download (optional)")
    source_digests: dict = identity(None, help="sha256 per local source (computed; a value given must match)")
    data_dir: str = runtime("", help="directory of the file sources (e.g. ../shared/data/chat)")
    rdzv_id: str = runtime("nanorun-rl", help="rendezvous id shared by the nodes of one job")
    fetch_retries: int = runtime(5, help="attempts per URL source download")
    extra_args: tuple = runtime((), help="extra flags for core.train.rl (experiments)")

    def __post_init__(self):
        object.__setattr__(self, "extra_args", tuple(str(a) for a in self.extra_args))
        if self.data_dir:
            object.__setattr__(self, "data_dir", str(Path(self.data_dir).expanduser().resolve()))
        normalise_specs(self.source_specs(), "rl.train_source/test_source")
        self.check_launch(NAME)
        if self.nnodes > 1:
            raise ConfigError("rl: nnodes > 1 is not supported yet (RL runs on one node; use nproc)")
        if not isinstance(self.fetch_retries, int) or self.fetch_retries < 1:
            raise ConfigError(f"rl.fetch_retries={self.fetch_retries!r}: expected an integer >= 1")
        if self.examples_per_step % self.world_size:
            raise ConfigError(f"rl.examples_per_step={self.examples_per_step} is not a multiple of the "
                              f"{self.world_size} process(es); change examples_per_step or nproc")
        trainer_values(self, RLConfig, NAME)  # the trainer's own rules (core/train/config.py)

    def source_specs(self) -> list[dict]:
        return [{"task": "gsm8k", "source": self.train_source, "sha256": self.train_sha256},
                {"task": "gsm8k", "source": self.test_source, "sha256": self.test_sha256}]


    def trainer_config(self, **paths) -> dict:
        return trainer_values(self, RLConfig, NAME, **{"tokenizer_fingerprint": "", **paths},
                              run_name=self.run_name or "rl-gsm8k")

    def label(self) -> str:
        return "gsm8k"


# ---- presets ------------------------------------------------------------------------------------------
_GPU = dict(train_source=REFERENCE_SOURCES["gsm8k_train"], test_source=REFERENCE_SOURCES["gsm8k_test"], nproc=8)
PRESETS: dict[str, dict] = {
    # seconds on a CPU, for the tests (base: the sft 'tiny' preset's model)
    "tiny": dict(num_iterations=2, examples_per_step=2, num_samples=2, device_batch_size=2, max_new_tokens=32,
                 eval_every=1, eval_examples=2, eval_samples=2, save_every=1, wandb="disabled", device_type="cpu"),
    # a few minutes on 2 CPU cores (base: the sft 'cpu-demo' preset's d4 model): the curves, not a better model
    "cpu-demo": dict(num_iterations=30, examples_per_step=4, num_samples=4, device_batch_size=4, max_new_tokens=128,
                     eval_every=10, eval_examples=32, eval_samples=4, save_every=10, device_type="cpu"),
    # the reference's values (RLConfig's defaults: 1 epoch, 16 x 16, 256 tokens, eval every 60 on 400)
    "d12": dict(_GPU),
    "d20": dict(_GPU),
    "d24": dict(_GPU),
    "d26": dict(_GPU),
}

preset = Config.from_preset


# ---- run ------------------------------------------------------------------------------------------------
def run(cfg: Config, inputs: dict[str, Input], out: Path) -> dict:
    cfg.check_platform(NAME)
    from core.checkpoint import list_checkpoints, load_checkpoint
    from core.layouts import CHAT_KINDS, model_checkpoint, tokenizer_dir

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_ckpt = model_checkpoint(inputs["base"].path)
    kind = load_checkpoint(base_ckpt).meta.get("kind")
    if kind not in CHAT_KINDS:
        log.warning("rl on %s, a %s model (not chat-tuned): it has not learnt the chat format or the calculator, "
                    "so its rewards stay ~0; the recipe is rl after sft (--input base=sft@latest)",
                    inputs["base"].ref, kind)
    paths = resolve_sources(cfg.source_specs(), cfg.data_dir, cfg.source_digests, out, cfg.fetch_retries)
    run_json = out / "run.json"
    run_json.write_text(json.dumps(cfg.trainer_config(
        base_checkpoint=str(base_ckpt), tokenizer_dir=str(tokenizer_dir(inputs["tokenizer"].path)),
        train_file=paths[cfg.train_source], test_file=paths[cfg.test_source], out=str(out),
        tokenizer_fingerprint=inputs["tokenizer"].ref.fingerprint), indent=1) + "\n")
    ckpts = list_checkpoints(out / "checkpoints")
    start = ckpts[-1][0] if ckpts else 0
    log.info("rl from %s on %d process(es)%s", inputs["base"].ref, cfg.nproc,
             f"; resuming from the checkpoint at step {start} in the work dir" if ckpts else "")
    launch_trainer("core.train.rl", run_json, out, name="rl", nproc=cfg.nproc, omp_threads=cfg.omp_threads,
                   timeout=cfg.timeout, heartbeat=cfg.heartbeat, extra_args=cfg.extra_args, resumed_from=start)
    return finish(out)


def finish(out: Path) -> dict:
    """Keep the final checkpoint only, drop downloads, draw the curves, compute the metrics."""
    from core.train.telemetry import read_metrics

    latest, _, _, _, common = read_training(out)
    derived = latest["start"]["derived"]
    total = derived["num_iterations"]
    shutil.rmtree(out / SOURCES_DIR, ignore_errors=True)
    rel = seal_training_dir(out, total)
    rows = read_metrics(out / "metrics.jsonl")
    by_step = lambda kind: sorted({r["step"]: r for r in rows if r["kind"] == kind}.values(),  # noqa: E731
                                  key=lambda r: r["step"])
    rollouts, evals = by_step("rollout"), by_step("passk")
    reward_curve = [[r["step"], round(r["reward"], 5), round(r["sequence_length"], 2)] for r in rollouts]
    passk_curve = [[r["step"], [round(r[f"pass@{k}"], 5) for k in range(1, _k_max(r) + 1)]] for r in evals]
    plot_rl_curves(out / "rl_curve.png", reward_curve, passk_curve, "rl gsm8k")
    final = {f"pass@{k}": v for k, v in enumerate(passk_curve[-1][1], 1)} if passk_curve else {}
    return {"checkpoint": rel, "iterations": total, "world_size": derived["world_size"], "device": derived["device"],
            "dtype": derived["dtype"], "lrs": derived["lrs"], "base_kind": derived["base_kind"],
            "train_questions": derived["train_questions"], "final_reward": reward_curve[-1][1] if reward_curve else None,
            "final_passk": final, "reward_curve": reward_curve, "passk_curve": passk_curve, **common}


def _k_max(row: dict) -> int:
    return sum(1 for key in row if key.startswith("pass@"))
