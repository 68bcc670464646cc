"""What every trainer shares: the skeleton of its phases (start_run, resume_model, resume_state,
open_log, save, optimizer_step, log_step, log_eval, finish_run), the loop state carried across a
resume (LoopState, a typed value each trainer extends), SIGTERM, seeding and the resume checks.
Used by core/train/pretrain.py, core/train/sft.py and core/train/rl.py; what they report (the step line,
MFU's peak, metrics.jsonl, wandb) is core/train/telemetry.py.

    run = start_run(cfg, PretrainLoop())               # process group, threads, out dir, loop state
    model = build...; notes = resume_model(run, model, identity=..., tokenizer=..., device_batch_size=...)
    optimizer = build...; loader_state = resume_state(run, optimizer)
    open_log(run, total_steps=..., rows=[...], ...)    # start-up table, metrics "start" row, wandb
    while True: evals; stop = run.stop_requested(); if run.save_due(step, every, last=last, stop=stop): save(...);
                if stop: stop_run(run, step); lrm = schedule; loss, dt = optimizer_step(run, ...);
                step += 1; log_step(run, step, loss, lrm, dt, ...)
    return finish_run(run, summary, message)           # the "done" row, wandb, process group

After a resume from step s, metrics.jsonl rows past s are dropped so the file reads as one run.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from core.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from core.common import (DistInfo, cleanup_distributed, init_distributed, parse_dtype, print0,
                         set_num_threads)
from core.openmp import wait_env
from core.train.config import auto_dtype
from core.train.telemetry import MetricsLog, StepClock, format_step_line, read_metrics, setup_wandb

# ---- seeding -----------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Model init uses its own generator (build_model)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ---- tokenizer identity and resume checks ------------------------------------------------------------


def tokenizer_record(tokenizer_dir: Path | str, vocab_size: int, fingerprint: str | None = None) -> dict:
    """The meta record {"fingerprint", "vocab_size"} of the tokenizer a model is trained with.

    fingerprint: the tokenizer artifact's fingerprint (what stages pass; consumers compare it with
    core.checkpoint.check_tokenizer). Without one, a content hash of tokenizer.json stands in."""
    if not fingerprint:
        data = (Path(tokenizer_dir) / "tokenizer.json").read_bytes()
        fingerprint = "sha256:" + hashlib.sha256(data).hexdigest()[:16]
    return {"fingerprint": fingerprint, "vocab_size": int(vocab_size)}


def load_base(cfg) -> tuple:
    """A fine-tuning trainer's starting point (cfg: base_checkpoint, tokenizer_dir, tokenizer_fingerprint):
    (tokenizer, base Checkpoint, the tokenizer record for its checkpoints, the base's id). The
    tokenizer must be the one the base was trained with; the id (a hash of the base's step, model
    config and identity) goes into the run's identity, so a resume refuses another base."""
    from core.checkpoint import check_tokenizer
    from core.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_directory(cfg.tokenizer_dir)
    base_ck = load_checkpoint(Path(cfg.base_checkpoint))
    base = base_ck.meta
    check_tokenizer(base, cfg.tokenizer_fingerprint or None, tokenizer.vocab_size, f"--base-checkpoint {base_ck.path}")
    tok_rec = (tokenizer_record(cfg.tokenizer_dir, tokenizer.vocab_size, cfg.tokenizer_fingerprint)
               if cfg.tokenizer_fingerprint or not base.get("tokenizer") else dict(base["tokenizer"]))
    base_id = hashlib.sha256(json.dumps({"step": base_ck.step, "model_config": base["model_config"],
                                         "identity": base.get("identity")}, sort_keys=True).encode()).hexdigest()[:16]
    return tokenizer, base_ck, tok_rec, base_id


class ResumeError(ValueError):
    """A checkpoint cannot be continued by this run; the message says why and what to do."""


def check_resume(meta: dict, *, where: Path | str, identity: dict, tokenizer: dict, world_size: int,
                 device_batch_size: int | None = None) -> list[str]:
    """Refuse to continue a checkpoint made by a different recipe, tokenizer or process count.

    Returns notes for changes that are allowed (a new device batch size: each rank's stream of
    packed rows does not depend on it, so every step sees the same tokens; only the split of the
    gradient sum into micro-batches changes, i.e. float rounding, as between two fresh runs)."""
    fresh = f"use another --out directory, or delete {where} to start over"
    saved = meta.get("identity")
    if not isinstance(saved, dict):
        raise ResumeError(f"checkpoint {where} has no identity record: it was not written by this trainer; {fresh}")
    diff = {k: (saved.get(k, "<absent>"), identity.get(k, "<absent>")) for k in sorted(set(saved) | set(identity))
            if saved.get(k, "<absent>") != identity.get(k, "<absent>")}
    if diff:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ResumeError(f"refusing to resume from {where}: the identity config differs (saved -> now: {shown}); "
                          f"these settings change the weights, so the checkpoint belongs to another run; {fresh}")
    tok = meta.get("tokenizer") or {}
    if tok.get("vocab_size") != tokenizer["vocab_size"] or tok.get("fingerprint") != tokenizer["fingerprint"]:
        raise ResumeError(f"refusing to resume from {where}: it was trained with tokenizer {tok.get('fingerprint')} "
                          f"(vocab {tok.get('vocab_size')}), this run has {tokenizer['fingerprint']} (vocab "
                          f"{tokenizer['vocab_size']}); pass the tokenizer the checkpoint was trained with, or {fresh}")
    saved_world = meta.get("world_size")
    if saved_world != world_size:
        raise ResumeError(
            f"refusing to resume from {where}: it was saved by {saved_world} process(es), this run has {world_size}. "
            "Each rank's data stream (row groups dealt round-robin) and its ZeRO-2 optimizer shard depend on the "
            f"number of processes, so the run cannot continue exactly; rerun with {saved_world} process(es) in total "
            f"(nproc x nnodes), or {fresh}")
    notes = []
    old_dbs = meta.get("device_batch_size")
    if device_batch_size is not None and old_dbs is not None and old_dbs != device_batch_size:
        notes.append(f"device batch size {old_dbs} -> {device_batch_size}: every step trains on the same tokens "
                     "(the packed row stream does not depend on it) with a different micro-batch split, so "
                     "the result equals an uninterrupted run up to float rounding, not bit for bit")
    return notes


# ---- the trainer skeleton: the phases every trainer shares -------------------------------------------
# A trainer is a flat script: start_run -> build its model -> resume_model -> build its optimizer ->
# resume_state -> its data -> open_log -> loop {evals; save; optimizer_step; log_step} -> finish_run.
# What differs (data, schedule, evals, the meta record) stays in the trainer.


LOSS_EMA_BETA = 0.9  # the logged training loss is an EMA of the step losses, debiased for the first steps


@dataclass
class LoopState:
    """What a trainer's loop carries across a resume, saved by save() in every checkpoint as meta.json
    "loop_state": a JSON object keyed by these field names, the trainer's own fields last. Each
    trainer extends it with its own fields (core/train/pretrain.py PretrainLoop, sft.py SFTLoop,
    rl.py RLLoop) and updates them in place: the object lives as long as its Run."""
    smooth_train_loss: float = 0.0  # EMA (LOSS_EMA_BETA) of the step losses, not yet debiased
    training_time: float = 0.0      # seconds of timed optimizer steps over all attempts (telemetry.StepClock)
    timed_steps: int = 0            # the steps training_time covers
    wall_time: float = 0.0          # process seconds over all attempts, counted up to each save
    wandb_id: str | None = None     # the wandb run this one logs into: a resume continues it

    def train_loss(self, step: int) -> float:
        """The smoothed training loss after `step` optimizer steps (the EMA, debiased)."""
        return self.smooth_train_loss / (1 - LOSS_EMA_BETA ** max(step, 1))

    def to_dict(self) -> dict:
        return asdict(self)

    def restore(self, saved: dict, where: Path | str) -> None:
        """Take over a checkpoint's loop_state, in place; a key absent from it keeps its start value.
        A key this trainer does not know means the checkpoint is another trainer's: ResumeError."""
        unknown = sorted(set(saved) - {f.name for f in fields(self)})
        if unknown:
            raise ResumeError(f"refusing to resume from {where}: its loop state has {unknown}, which "
                              f"{type(self).__name__} does not carry (it was written by another trainer); use "
                              f"another --out directory, or delete {where} to start over")
        for name, value in saved.items():
            setattr(self, name, value)


@dataclass
class Run:
    """One trainer process: where it runs, where it writes, and the loop state saved in checkpoints."""
    info: DistInfo
    dtype: torch.dtype
    out: Path
    metrics: "MetricsLog"
    loop: LoopState                      # carried across resumes (meta.json "loop_state")
    t_process: float = field(default_factory=time.time)
    ck: Checkpoint | None = None         # the checkpoint this process resumed from
    start_step: int = 0
    total_steps: int = 0
    wandb: object = None
    clock: "StepClock | None" = None

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world(self) -> int:
        return self.info.world_size

    @property
    def master(self) -> bool:
        return self.info.rank == 0

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def barrier(self) -> None:
        if self.info.ddp:
            dist.barrier()

    def stop_requested(self) -> bool:
        """Whether a SIGTERM reached any rank (see run_entry_point). Collective under torchrun: every
        rank calls it once per step, at the same point of the loop."""
        stop = _TERM.is_set()
        if self.info.ddp:
            flag = torch.tensor([float(stop)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def save_due(self, step: int, every: int, *, last: bool, stop: bool) -> bool:
        """Whether the loop saves a checkpoint at `step`: not the step it resumed at (saved already),
        and the end, the `every` cadence, or a SIGTERM (stop_requested) after at least one new step."""
        return not self.resumed_at(step) and (last or (step > 0 and every > 0 and step % every == 0)
                                              or (stop and step > self.start_step))

    def resumed_at(self, step: int) -> bool:
        """The step this process resumed at: its evals and its save happened before that save."""
        return self.ck is not None and step == self.start_step


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `name` on `device`: auto as core.train.config.auto_dtype decides (the
    stages resolve it when the plan is built, so a stage's trainer gets an explicit name)."""
    if name != "auto":
        return parse_dtype(name)
    major = torch.cuda.get_device_capability()[0] if device.type == "cuda" and torch.cuda.is_available() else None
    return parse_dtype(auto_dtype(device.type, major)[0])


def start_run(cfg, loop: LoopState) -> Run:
    """Join the process group, set CPU threads, make the output directory. loop: the trainer's loop
    state at its start values (a LoopState subclass with what the trainer itself carries)."""
    info = init_distributed(cfg.device_type or None)
    if info.device.type == "cpu":
        set_num_threads()  # OMP_NUM_THREADS, else the cores we may use (torchrun would default to 1)
        if wait_env(os.environ):
            print0("note: neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT is set (the stages set PASSIVE, core/openmp.py): "
                   "on a busy CPU OpenMP's default spin-waiting made steps many times slower here")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    return Run(info=info, dtype=resolve_dtype(cfg.dtype, info.device), out=out,
               metrics=MetricsLog(out / "metrics.jsonl", enabled=info.rank == 0), loop=loop)


def resume_model(run: Run, model: torch.nn.Module, *, identity: dict, tokenizer: dict,
                 device_batch_size: int | None) -> list[str]:
    """Load the newest complete checkpoint in run.out/checkpoints into `model` (initialised as a fresh
    run first, so a missing checkpoint changes nothing) after check_resume; returns its notes."""
    latest = latest_checkpoint(run.ckpt_root)
    if latest is None:
        return []
    run.ck = load_checkpoint(latest)
    notes = check_resume(run.ck.meta, where=latest, identity=identity, tokenizer=tokenizer, world_size=run.world,
                         device_batch_size=device_batch_size)
    model.load_state_dict(run.ck.model_state(run.device), strict=True)
    return notes


# fp32 CPU runs with at least this many optimizer steps compile by default (maybe_compile): see
# docs/cpu-compile.md for the measured compile cost and per-step gain this break-even comes from.
CPU_FP32_COMPILE_MIN_STEPS = 600


def maybe_compile(model: torch.nn.Module, flag: bool | None, device: torch.device, dtype: torch.dtype | None = None,
                  steps: int | None = None) -> tuple[torch.nn.Module, bool]:
    """(the model to call in the loop, whether it is compiled; the caller builds its optimizer with
    compile_steps=that). flag None: compile on CUDA; on CPU only an fp32 run of `steps` >=
    CPU_FP32_COMPILE_MIN_STEPS optimizer steps, long enough to pay back the compile (bf16 on CPU and
    shorter runs stay eager). Compiling changes results by reduction-order rounding only."""
    if flag is None:
        flag = device.type == "cuda" or (dtype == torch.float32 and (steps or 0) >= CPU_FP32_COMPILE_MIN_STEPS)
    return (torch.compile(model, dynamic=False) if flag else model), flag


def resume_state(run: Run, optimizer) -> dict | None:
    """After resume_model: this rank's optimizer shard, RNG and the loop state; returns the loader
    state to continue from (None for a fresh run)."""
    if run.ck is None:
        return None
    optimizer.load_state_dict(run.ck.optim_state(run.rank, run.device))
    rank_state = run.ck.rank_state(run.rank)
    set_rng_state(rank_state["rng"])
    run.loop.restore(run.ck.meta["loop_state"], run.ck.path)
    run.start_step = run.ck.step
    return rank_state["loader"]


def open_log(run: Run, *, total_steps: int, rows: list[tuple[str, str]], notes: list[str], config: dict,
             identity: dict, derived: dict, tokenizer: dict, wandb_mode: str, wandb_project: str, wandb_name: str,
             wandb_config: dict) -> None:
    """Print the start-up table, start metrics.jsonl (dropping what an interrupted attempt recorded
    after the checkpoint) and wandb, and start the clock. The loop starts right after."""
    run.total_steps = total_steps
    rows = rows + [("start", f"resuming from {run.ck.path} (step {run.start_step})" if run.ck else
                             f"fresh (no checkpoint in {run.ckpt_root})")]
    width = max(len(k) for k, _ in rows) + 1
    print0("\n".join(f"{k:<{width}} : {v}" for k, v in rows))
    for note in notes:
        print0(f"note: {note}")
    dropped = run.metrics.truncate_after(run.start_step if run.ck is not None else -1)
    if dropped:
        print0(f"metrics.jsonl: dropped {dropped} row(s) an interrupted attempt recorded after step {run.start_step}")
    run.metrics.append("start", step=run.start_step, resumed=run.ck is not None, config=config, identity=identity,
                       derived=derived, tokenizer=tokenizer)
    run.wandb = setup_wandb(wandb_mode, project=wandb_project, name=wandb_name, config=wandb_config,
                            directory=run.out, rank=run.rank, run_id=run.loop.wandb_id)
    run.loop.wandb_id = getattr(run.wandb, "id", None)
    run.clock = StepClock(total_steps, training_time=run.loop.training_time, timed_steps=run.loop.timed_steps)
    mark_loop_started()


def save(run: Run, step: int, *, model: torch.nn.Module, optimizer, loader_state: dict, meta: dict | None,
         keep: int) -> None:
    """A checkpoint of everything needed to continue exactly (collective: every rank calls it). meta:
    the trainer's record; the loop state, as it stands at this save, is added as its "loop_state"."""
    run.loop.wall_time += time.time() - run.t_process
    run.t_process = time.time()
    meta = {**meta, "loop_state": run.loop.to_dict()} if meta is not None else None
    path = save_checkpoint(run.ckpt_root, step, rank=run.rank, world_size=run.world,
                           model_state=model.state_dict() if run.master else None, optim_state=optimizer.state_dict(),
                           rank_state={"loader": loader_state, "rng": rng_state()},
                           meta=meta if run.master else None, keep_last=keep, barrier=run.barrier)
    print0(f"step {step:05d}/{run.total_steps:05d} | saved checkpoint {path}")


def optimizer_step(run: Run, model: torch.nn.Module, optimizer, batches: Iterator, grad_accum: int,
                   loss_fn: Callable | None = None) -> tuple[float, float]:
    """grad_accum micro-batches, then optimizer.step() (the LR schedule set before): (mean loss, seconds).
    loss_fn(x, y): the micro-batch's loss when it is not model(x, y) (the RL trainer's policy gradient)."""
    run.sync()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=run.device)
    for _ in range(grad_accum):
        x, y = next(batches)
        loss = (loss_fn or model)(x, y)
        loss_sum += loss.detach()
        (loss / grad_accum).backward()  # .backward() sums: divide for the mean over micro-batches
    optimizer.step()
    model.zero_grad(set_to_none=True)
    train_loss = (loss_sum / grad_accum).item()  # also the sync point for the timing
    run.sync()
    return train_loss, time.perf_counter() - t0


def log_step(run: Run, step: int, train_loss: float, lrm: float, dt: float, *, tokens_per_step: int,
             flops_per_token: float, peak: float, epoch: float | None = None) -> None:
    """After optimizer step `step` (1-based): divergence check, clock, the step line, metrics.jsonl,
    wandb (every 10 steps, with the reference's keys) and the reference's GC trick."""
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"training loss is {train_loss} at step {step}: the run diverged; lower the "
                                 "learning rates or check the data (resuming would diverge the same way)")
    clock, loop = run.clock, run.loop
    clock.tick(dt, step)
    beta = LOSS_EMA_BETA  # an EMA of the loss for a readable log
    loop.smooth_train_loss = beta * loop.smooth_train_loss + (1 - beta) * train_loss
    smooth = loop.train_loss(step)
    loop.training_time, loop.timed_steps = clock.training_time, clock.timed_steps
    tok_per_s = tokens_per_step / dt
    mfu = 100 * flops_per_token * tokens_per_step / dt / (peak * run.world)
    print0(format_step_line(step, run.total_steps, smooth, lrm, dt, tok_per_s, mfu, clock.training_time,
                            clock.eta(step)))
    run.metrics.append("train", step=step, loss=smooth, raw_loss=train_loss, lrm=lrm, dt=dt, tok_per_s=tok_per_s,
                       mfu=mfu, training_time=clock.training_time, tokens=step * tokens_per_step)
    if step % 10 == 0 or step == run.total_steps:
        row = {"step": step, "train/loss": smooth, "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_s,
               "train/mfu": mfu, "tokens": step * tokens_per_step, "total_training_time": clock.training_time,
               "total_training_flops": flops_per_token * tokens_per_step * step}
        if epoch is not None:
            row["train/epoch"] = epoch
        run.wandb.log(row)
    # The reference's GC trick: after the first step, freeze the setup's objects and stop the cyclic
    # collector, which otherwise spends ~0.5 s scanning them every few steps.
    if step == run.start_step + 1:
        gc.collect()
        gc.freeze()
        gc.disable()
    elif step % 5000 == 0:
        gc.collect()


def log_eval(run: Run, step: int, wandb_row: dict, **fields) -> None:
    """An eval's row in metrics.jsonl (kind = fields["kind"]) and in wandb, with the reference's totals."""
    kind = fields.pop("kind")
    run.metrics.append(kind, step=step, **fields)
    run.wandb.log({"step": step, "total_training_time": run.loop.training_time, **wandb_row})


def finish_run(run: Run, summary: dict, message: str) -> dict:
    """The done row (also after a resume at the last step: the attempt that finished may have died
    before writing it), the closing line, wandb and the process group."""
    if run.start_step < run.total_steps or not any(r["kind"] == "done" for r in read_metrics(run.metrics.path)):
        run.metrics.append("done", **summary)
    if run.start_step < run.total_steps:
        print0(f"done: {message} | training time {run.loop.training_time / 60:.2f}m")
    run.wandb.finish()
    cleanup_distributed()
    return summary


class Terminated(Exception):
    """Raised by stop_run once the checkpoint a SIGTERM asked for is saved."""


def stop_run(run: Run, step: int) -> None:
    """After the loop saved step `step` because stop_requested(): close wandb and leave (run_entry_point
    exits with 128 + SIGTERM, as a process killed by the signal would)."""
    where = f"rerun to resume from the checkpoint of step {step}" if step else "nothing trained yet"
    print0(f"step {step:05d}/{run.total_steps:05d} | stopped by SIGTERM: {where}")
    run.wandb.finish()
    raise Terminated(step)


# SIGTERM -> a checkpoint at the next step boundary, then exit. Preemption (spot nodes), a cancelled
# Prefect run, a timeout and the CLI's Ctrl-C all reach the trainer as SIGTERM to its process group,
# with SIGKILL after a grace period (stagekit/launch.py: 10 s when interrupted, 30 s on a timeout);
# torchrun forwards one more TERM to its workers. Dying mid-step loses every step since the last
# save_every checkpoint; finishing the step and saving loses none. Further TERMs are ignored (the
# launcher's KILL is the backstop for a trainer stuck in a collective or a long evaluation).
_TERM = threading.Event()
EXIT_TERMINATED = 128 + signal.SIGTERM


def _on_sigterm(signum, frame) -> None:
    if not _TERM.is_set():
        _TERM.set()
        os.write(2, b"SIGTERM: finishing this step, saving a checkpoint, then exiting\n")  # no print(): reentrancy


_loop_started = False  # set by the trainer once its loop starts: errors before it are configuration problems


def mark_loop_started() -> None:
    global _loop_started
    _loop_started = True


def run_entry_point(train: Callable, cfg) -> None:
    """train(cfg), as a torchrun worker's main. A ValueError / FileNotFoundError raised before the
    loop started means the run cannot start as configured (resume refused, batch does not divide,
    FP8 on CPU, missing inputs): one clear line and exit 2 instead of a traceback."""
    global _loop_started
    _loop_started = False  # a process may run several trainers (tests): each starts before its loop
    _TERM.clear()
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        train(cfg)
    except Terminated:
        cleanup_distributed()
        sys.exit(EXIT_TERMINATED)
    except (ValueError, FileNotFoundError) as e:
        if _loop_started:
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        cleanup_distributed()
        sys.exit(2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
