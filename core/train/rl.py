"""Reinforcement learning on GSM8K, with exact resume. Run under torchrun like the other trainers:

    python -m torch.distributed.run --standalone --nproc_per_node=8 -m core.train.rl \\
        --base-checkpoint SFT/checkpoints/step_000800 --tokenizer-dir TOK --train-file gsm8k_train.jsonl \\
        --test-file gsm8k_test.jsonl --out OUT
    python -m core.train.rl --config OUT/run.json          # the same keys from a file (what stages/rl.py writes)

The recipe (reference: nanochat scripts/chat_rl.py): on-policy REINFORCE, the reference's "GRPO"
without a trust region (no KL to a reference model) and without PPO's ratio and clip (on policy):
- per step, examples_per_step questions across the ranks (rank r takes questions r, r+W, ... of the
  seed-42 shuffle, cycling); per question num_samples replies sampled by core/engine.py (prefill
  the prompt once, expand the KV cache to the group, temperature 1.0, top-k 50, up to
  max_new_tokens, the calculator tool live);
- reward 1.0 when the reply's `#### N` equals the reference answer, else 0; advantage = reward -
  mean reward of the question's group (no division by the std);
- loss = -sum(logp x advantage) over the sampled tokens, divided by the number of sampled tokens
  of the pass (token-level, DAPO style), by the passes per question and the questions per rank:
  prompt tokens and the calculator's forced output tokens are masked out (the engine's mask 0);
- the model's Muon + AdamW groups at init_lr_frac x the base LRs, linear decay to 0 over the run;
- pass@1..pass@eval_samples on held-out test questions every eval_every steps and at the end.
Rollouts are seeded per (seed, step, question) and the data position is the step, so a killed run
resumed from its newest checkpoint (model, optimizer, RNG, cursor, loop state) ends bit-identical.
metrics.jsonl kinds (besides the skeleton's): "rollout" (reward, sequence_length, lrm per step),
"passk" ({"pass@k": ...}); wandb keys as the reference: reward, sequence_length, lrm, pass@k.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

import torch
import torch.distributed as dist

from core.checkpoint import load_model
from core.common import dtype_name, print0
from core.engine import Engine
from core.layouts import CHAT_KINDS
from core.optim import build_optimizer
from core.scaling import reference_lrs
from core.tasks.gsm8k import GSM8K
from core.train.common import (LoopState, finish_run, load_base, log_eval, log_step, open_log, optimizer_step,
                               resume_model, resume_state, run_entry_point, save, seed_everything, start_run,
                               stop_run)
from core.train.telemetry import run_peak_flops
from core.train.config import RLConfig
from core.train.config import parse_config as _parse_config

def parse_config(argv: list[str] | None = None) -> RLConfig:
    return _parse_config(RLConfig, argv, prog="python -m core.train.rl", description="Reinforcement learning on GSM8K")


# ---- the objective ---------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Reward minus the group's mean (the reference: no division by the std)."""
    return rewards - rewards.mean()


def rollout_tensors(sequences: list[list[int]], masks: list[list[int]], pad: int,
                    device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) (B, T-1) from prompt+reply token rows and their engine masks (1 = sampled,
    0 = prompt or forced tool output), padded with `pad` (never a target): targets are -1 wherever
    the next token was not sampled by the model, so only its own choices carry gradient."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], dtype=torch.long, device=device)
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long, device=device)
    targets = ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = -1
    return ids[:, :-1], targets


def pg_loss(nll: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """-sum(logp x advantage) / number of trained tokens: nll (B, T) per-token -logp (0 where the
    target is -1), advantages (B,). Token-level normalisation (DAPO) over the pass."""
    objective = (-nll * advantages.unsqueeze(-1)).sum()
    return -objective / (targets >= 0).sum().clamp(min=1)


def rollout_seed(seed: int, step: int, index: int) -> int:
    """A sampling seed per (run seed, step, question): the same replies on a resume, on any rank."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{index}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def lr_multiplier(step: int, total: int) -> float:
    return 1.0 - step / max(total, 1)


def pass_at_k(correct: list[list[bool]], k_max: int) -> list[float]:
    """[pass@1 .. pass@k_max] counts (not yet divided): per question, is any of its first k right."""
    return [float(sum(any(c[:k]) for c in correct)) for k in range(1, k_max + 1)]


def _all_reduce(values: list[float], device, op=None) -> list[float]:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


# ---- the run ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RLLoop(LoopState):
    """The RL loop's state across resumes: the shared fields plus its latest results."""
    reward: float | None = None             # mean reward of the last step's rollouts, over all ranks
    passk: list[float] | None = None        # the latest pass@1..k on held-out questions


def train(cfg: RLConfig) -> dict:
    run = start_run(cfg, RLLoop())
    device, rank, world, dtype, loop = run.device, run.rank, run.world, run.dtype, run.loop

    tokenizer, base_ck, tok_rec, base_id = load_base(cfg)
    base, model_cfg = base_ck.meta, base_ck.meta["model_config"]
    if cfg.examples_per_step % world:
        raise ValueError(f"examples_per_step={cfg.examples_per_step} is not a multiple of the {world} process(es): "
                         "every rank takes the same number of questions per step")
    per_rank = cfg.examples_per_step // world
    passes = max(1, cfg.num_samples // cfg.device_batch_size)
    rows_per_pass = cfg.num_samples // passes
    train_task = GSM8K(cfg.train_file, stop=None if cfg.train_examples < 0 else cfg.train_examples)
    test_task = GSM8K(cfg.test_file)
    if len(train_task) < world:
        raise ValueError(f"{cfg.train_file}: {len(train_task)} question(s) for {world} process(es)")
    total_steps = (cfg.num_iterations if cfg.num_iterations > 0
                   else (len(train_task) // cfg.examples_per_step) * cfg.num_epochs)
    if total_steps < 1:
        raise ValueError(f"{len(train_task)} train question(s) make no step of {cfg.examples_per_step}: lower "
                         "examples_per_step or use more questions")
    lrs = reference_lrs(model_cfg["n_embd"], 1.0, embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr,
                        matrix_lr=cfg.matrix_lr, scalar_lr=cfg.scalar_lr, weight_decay=cfg.weight_decay)
    lrs = {k: (v * cfg.init_lr_frac if k.endswith("_lr") else v) for k, v in lrs.items()}
    identity = {**cfg.identity(), "base": base_id}
    notes = [] if base.get("kind") in CHAT_KINDS else [
        f"the base model is a {base.get('kind')!r} checkpoint, not chat-tuned: expect ~0 reward (RL after SFT is "
        "the recipe)"]

    seed_everything(cfg.seed)
    model, _ = load_model(base_ck.path, device, dtype)
    model.train()
    notes += resume_model(run, model, identity=identity, tokenizer=tok_rec, device_batch_size=cfg.device_batch_size)
    optimizer = build_optimizer(model, None, distributed=run.info.ddp, **lrs)
    loader_state = resume_state(run, optimizer) or {"cursor": 0}
    engine = Engine(model, tokenizer)
    pad = tokenizer.encode_special("<|assistant_end|>")  # padding only: never a target
    my_questions = list(range(rank, len(train_task), world))

    peak, peak_source = run_peak_flops(run)
    flops_per_token = model.estimate_flops()
    derived = {"num_iterations": total_steps, "examples_per_rank": per_rank, "passes_per_question": passes,
               "train_questions": len(train_task), "test_questions": len(test_task), "world_size": world,
               "device": str(device), "dtype": dtype_name(dtype), "lrs": lrs, "flops_per_token": flops_per_token,
               "peak_flops": peak, "peak_flops_source": peak_source, "base_id": base_id, "base_kind": base.get("kind"),
               "num_params": sum(p.numel() for p in model.parameters())}
    open_log(run, total_steps=total_steps, notes=notes, config=dataclasses.asdict(cfg), identity=identity,
             derived=derived, tokenizer=tok_rec, wandb_mode=cfg.wandb, wandb_project=cfg.wandb_project,
             wandb_name=cfg.run_name or f"rl-d{model_cfg['n_layer']}",
             wandb_config={**dataclasses.asdict(cfg), **derived}, rows=[
        ("base", f"{base_ck.path} (kind {base.get('kind')}, d{model_cfg['n_layer']}, id {base_id})"),
        ("processes / device / dtype", f"{world} / {device} / {dtype_name(dtype)}"),
        ("questions per step", f"{cfg.examples_per_step} ({per_rank} per rank) x {cfg.num_samples} samples "
                               f"({passes} pass(es) of {rows_per_pass})"),
        ("steps", f"{total_steps:,} ({len(train_task):,} train questions, {cfg.num_epochs} epoch(s))"
                  if cfg.num_iterations < 1 else f"{total_steps:,} (--num-iterations)"),
        ("sampling", f"temperature {cfg.temperature}, top-k {cfg.top_k}, up to {cfg.max_new_tokens} new tokens"),
        ("lr (x init_lr_frac)", " / ".join(f"{k} {v:.4g}" for k, v in lrs.items())),
        ("eval", f"pass@1..{cfg.eval_samples} on {min(cfg.eval_examples, len(test_task))} test questions"),
        ("peak FLOP/s per process", f"{peak:.3e} ({peak_source})")])

    def meta_record() -> dict:
        return {"kind": "rl", "model_config": model_cfg, "tokenizer": tok_rec, "identity": identity,
                "run_config": dataclasses.asdict(cfg), "derived": derived, "device_batch_size": cfg.device_batch_size,
                "base": {"checkpoint": str(base_ck.path), "step": base_ck.step, "kind": base.get("kind"),
                         "id": base_id}, "reward": loop.reward, "passk": loop.passk}

    stats = {"rewards": [], "lengths": [], "tokens": 0}

    def rollouts(step_of):
        """Micro-batches (inputs, (targets, advantages)) of the questions at the cursor, `passes` per
        question; the rollout of a question happens when its first pass is asked for."""
        while True:
            index = my_questions[loader_state["cursor"] % len(my_questions)]
            loader_state["cursor"] += 1
            conversation = train_task[index]
            prompt = tokenizer.render_for_completion(conversation)
            sequences, masks = engine.generate_batch(prompt, num_samples=cfg.num_samples, max_tokens=cfg.max_new_tokens,
                                                     temperature=cfg.temperature, top_k=cfg.top_k,
                                                     seed=rollout_seed(cfg.seed, step_of(), index))
            rewards = torch.tensor([float(train_task.evaluate(conversation, tokenizer.decode(s[len(prompt):])))
                                    for s in sequences], device=device)
            inputs, targets = rollout_tensors(sequences, masks, pad, device)
            advantages = group_advantages(rewards)
            stats["rewards"].append(rewards.mean().item())
            stats["lengths"] += [len(s) for s in sequences]
            stats["tokens"] += inputs.numel()
            for p in range(passes):
                rows = slice(p * rows_per_pass, (p + 1) * rows_per_pass)
                yield inputs[rows], (targets[rows], advantages[rows])

    def policy_loss(inputs, target_adv):
        # optimizer_step divides by grad_accum = questions per rank x passes: the reference's normalisation
        targets, advantages = target_adv
        return pg_loss(model(inputs, targets, loss_reduction="none"), targets, advantages)

    def evaluate_passk() -> list[float]:
        correct = []
        for idx in range(rank, min(cfg.eval_examples, len(test_task)), world):
            conversation = test_task[idx]
            prompt = tokenizer.render_for_completion(conversation)
            sequences, _ = engine.generate_batch(prompt, num_samples=cfg.eval_samples, max_tokens=cfg.max_new_tokens,
                                                 temperature=1.0, top_k=cfg.top_k, seed=rollout_seed(cfg.seed, -1, idx))
            correct.append([test_task.evaluate(conversation, tokenizer.decode(s[len(prompt):])) for s in sequences])
        counts = _all_reduce([*pass_at_k(correct, cfg.eval_samples), float(len(correct))], device)
        return [c / max(counts[-1], 1) for c in counts[:-1]]

    step = run.start_step
    batches = rollouts(lambda: step)
    while True:
        last = step == total_steps
        fresh = not run.resumed_at(step)
        if fresh and (last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
            passk = evaluate_passk()
            loop.passk = passk
            row = {f"pass@{k}": v for k, v in enumerate(passk, 1)}
            print0(f"step {step:05d}/{total_steps:05d} | " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
            log_eval(run, step, row, kind="passk", **row)
        stop = run.stop_requested()  # a SIGTERM: save this step, then leave
        if run.save_due(step, cfg.save_every, last=last, stop=stop):
            save(run, step, model=model, optimizer=optimizer, loader_state=dict(loader_state), meta=meta_record(),
                 keep=cfg.keep_checkpoints)
        if last:
            break
        if stop:
            stop_run(run, step)
        lrm = lr_multiplier(step, total_steps)
        optimizer.set_schedule(lrm)
        stats.update(rewards=[], lengths=[], tokens=0)
        loss, dt = optimizer_step(run, model, optimizer, batches, per_rank * passes, loss_fn=policy_loss)
        reward, length, tokens = _all_reduce([sum(stats["rewards"]) / len(stats["rewards"]),
                                              sum(stats["lengths"]) / len(stats["lengths"]), stats["tokens"]], device)
        reward, length = reward / world, length / world  # the reference's all-reduce AVG
        loop.reward = reward
        step += 1
        log_step(run, step, loss, lrm, dt, tokens_per_step=int(tokens), flops_per_token=flops_per_token, peak=peak)
        print0(f"step {step:05d}/{total_steps:05d} | reward {reward:.4f} | sequence length {length:.1f}")
        log_eval(run, step, {"reward": reward, "sequence_length": length, "lrm": lrm}, kind="rollout", reward=reward,
                 sequence_length=length, lrm=lrm)

    summary = {"step": total_steps, "reward": loop.reward, "passk": loop.passk,
               "training_time": loop.training_time, "wall_time": loop.wall_time, "world_size": world}
    return finish_run(run, summary, f"{total_steps:,} steps | reward {loop.reward} | pass@1 "
                                    f"{(loop.passk or [None])[0]}")


def main(argv: list[str] | None = None) -> None:
    run_entry_point(train, parse_config(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    main()
