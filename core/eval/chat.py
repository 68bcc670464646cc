"""Chat evaluation: GSM8K with the calculator tool, multiple choice in chat form, spelling.

    python -m core.eval.chat --checkpoint OUT/checkpoints/step_000100 --tokenizer-dir TOK \\
        --tasks tasks.json                     # {"tasks": [TaskSpec dicts], "paths": {source: file}}
    torchrun --nproc_per_node=8 -m core.eval.chat ...   # problems dealt round-robin over ranks

    from core.eval.chat import evaluate_chat, format_table
    result = evaluate_chat(model, tokenizer, {"GSM8K": gsm8k_task, "ARC-Easy": arc}, max_problems={"GSM8K": 50})
    print(format_table(result)); result.to_dict()

Two kinds of task (the reference's chat_eval):
- generative (GSM8K, SpellingBee): the prompt is the conversation up to <|assistant_start|>; the
  Engine generates the reply (greedy by default), running python tool calls through the
  calculator and injecting their output; the reply is decoded and graded by the task (the number
  after '#### ' must equal the reference's). pass@k with num_samples > 1.
- categorical (ARC, MMLU): no sampling: one forward pass over the prompt, and the answer is the
  choice letter with the largest logit at the answer position (argmax over the letters only,
  which makes the task easier than free generation, as in the reference).
Scores: accuracy per task, and ChatCORE = the mean over tasks of accuracy centered on chance
((acc - baseline) / (1 - baseline); baseline 1/#choices for multiple choice, 0 for generative).
Under torch.distributed each rank takes problems rank, rank + world, ... and the counts are
all-reduced, so every rank returns the same result.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

GENERATIVE_DEFAULTS = dict(max_new_tokens=512, temperature=0.0, top_k=50, num_samples=1)


@dataclass
class TaskResult:
    name: str
    kind: str            # generative | categorical
    correct: int
    total: int
    baseline: float      # accuracy of random guessing
    seconds: float = 0.0
    samples: list = field(default_factory=list)  # a few (prompt, completion, correct) for the report

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def centered(self) -> float:
        return (self.accuracy - self.baseline) / (1.0 - self.baseline)


@dataclass
class ChatEvalResult:
    tasks: dict[str, TaskResult]

    @property
    def chatcore(self) -> float | None:
        scored = [t for t in self.tasks.values() if t.total]
        return sum(t.centered for t in scored) / len(scored) if scored else None

    def to_dict(self) -> dict:
        return {"chatcore": self.chatcore,
                "tasks": {k: {"kind": t.kind, "accuracy": t.accuracy, "correct": t.correct, "total": t.total,
                              "baseline": t.baseline, "centered": t.centered, "seconds": round(t.seconds, 3)}
                          for k, t in self.tasks.items()}}


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(values: list[float], device) -> list[float]:
    rank, world = _dist()
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _problems(task, max_problems: int | None) -> int:
    n = len(task)
    return n if max_problems is None or max_problems < 0 else min(n, max_problems)


def _context_limit(model) -> int:
    """Positions the model can address (its rotary table), else its training context."""
    return int(getattr(model, "rotary_len", None) or model.config.sequence_len)


def evaluate_generative(task, engine, tokenizer, *, name: str | None = None, max_problems: int | None = None,
                        max_new_tokens: int = 512, temperature: float = 0.0, top_k: int | None = 50,
                        num_samples: int = 1, seed: int = 42, keep_samples: int = 3,
                        context_limit: int | None = None) -> TaskResult:
    """Sample replies with `engine` (anything with the Engine's generate_batch) and grade them with
    task.evaluate; a problem passes when any of its num_samples replies is correct."""
    rank, world = _dist()
    t0 = time.perf_counter()
    n = _problems(task, max_problems)
    limit = context_limit or _context_limit(engine.model)
    correct = total = 0
    samples = []
    for i in range(rank, n, world):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        budget = min(max_new_tokens, limit - len(prompt))
        completions = []
        if budget >= 1:  # a prompt that fills the model's positions cannot be answered: wrong
            rows, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=budget,
                                            temperature=temperature, top_k=top_k, seed=seed + i)
            completions = [tokenizer.decode(r[len(prompt):]) for r in rows]
        ok = any(task.evaluate(conv, c) for c in completions)
        correct += int(ok)
        total += 1
        if len(samples) < keep_samples:
            samples.append({"index": i, "question": conv["messages"][0]["content"][:500],
                            "completion": (completions[0] if completions else "")[:2000], "correct": ok})
    device = next(engine.model.parameters()).device
    correct, total = (int(v) for v in _all_reduce([correct, total], device))
    return TaskResult(name or task.name, "generative", correct, total, 0.0, time.perf_counter() - t0, samples)


@torch.no_grad()
def evaluate_categorical(task, model, tokenizer, *, name: str | None = None, max_problems: int | None = None,
                         batch_size: int = 8) -> TaskResult:
    """Argmax over the choice letters' logits at the answer position, batches of prompts padded
    with BOS (positions after a prompt's end are never read: attention is causal)."""
    rank, world = _dist()
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    n = _problems(task, max_problems)
    bos = tokenizer.bos_token_id
    letter_ids: dict[str, int] = {}

    def letter_id(letter: str) -> int:
        if letter not in letter_ids:
            ids = tokenizer.encode(letter)
            if len(ids) != 1:
                raise ValueError(f"{task.name}: choice label {letter!r} is {len(ids)} tokens; multiple choice "
                                 "scoring needs single-token labels (A, B, C, ...)")
            letter_ids[letter] = ids[0]
        return letter_ids[letter]

    correct = total = 0
    inv_choices = 0.0
    mine = list(range(rank, n, world))
    for b in range(0, len(mine), batch_size):
        convs = [task[i] for i in mine[b:b + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        logits = model(ids)  # (B, T, V)
        for row, (conv, prompt) in enumerate(zip(convs, prompts)):
            letters = list(conv["letters"])
            scores = logits[row, len(prompt) - 1, [letter_id(x) for x in letters]]
            predicted = letters[int(scores.argmax())]
            correct += int(predicted == conv["messages"][-1]["content"])
            total += 1
            inv_choices += 1.0 / len(letters)
    correct, total, inv_choices = _all_reduce([correct, total, inv_choices], device)
    baseline = inv_choices / total if total else 0.25
    return TaskResult(name or task.name, "categorical", int(correct), int(total), baseline, time.perf_counter() - t0)


def evaluate_chat(model, tokenizer, tasks: dict, *, max_problems: dict | int | None = None, engine=None,
                  batch_size: int = 8, log=print, **generation) -> ChatEvalResult:
    """Every task of {name: Task}; max_problems per task name (or one int for all; None/-1 = all).
    generation: max_new_tokens, temperature, top_k, num_samples, seed for the generative tasks."""
    from core.engine import Engine

    engine = engine or Engine(model, tokenizer)
    opts = {**GENERATIVE_DEFAULTS, **generation}
    results = {}
    for name, task in tasks.items():
        limit = max_problems.get(name) if isinstance(max_problems, dict) else max_problems
        if task.eval_type == "categorical":
            res = evaluate_categorical(task, model, tokenizer, name=name, max_problems=limit, batch_size=batch_size)
        elif task.eval_type == "generative":
            res = evaluate_generative(task, engine, tokenizer, name=name, max_problems=limit, **opts)
        else:
            raise ValueError(f"task {name} ({type(task).__name__}) is not an evaluation task (no eval_type)")
        results[name] = res
        if log:
            log(f"chat eval | {name}: {res.correct}/{res.total} = {100 * res.accuracy:.2f}% ({res.seconds:.1f}s)")
    return ChatEvalResult(results)


def format_table(result: ChatEvalResult) -> str:
    rows = [("task", "kind", "correct", "accuracy", "centered")]
    for name, t in result.tasks.items():
        rows.append((name, t.kind, f"{t.correct}/{t.total}", f"{100 * t.accuracy:.2f}%", f"{t.centered:+.4f}"))
    core = result.chatcore
    rows.append(("ChatCORE", "", "", "", "n/a" if core is None else f"{core:+.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def build_eval_tasks(specs: list[dict], paths: dict) -> dict:
    """{display name: Task} from TaskSpec dicts (core.tasks.mixture) and their local files."""
    from core.tasks.mixture import TaskSpec, build_task

    cache: dict = {}
    tasks = {}
    for d in specs:
        spec = TaskSpec.from_dict(d)
        task = build_task(spec, paths.get(spec.source), cache)
        if task.eval_type is None:
            raise ValueError(f"task {spec.name} ({spec.task}) cannot be evaluated: use gsm8k, spelling_bee or "
                             "multiple_choice")
        if spec.name in tasks:
            raise ValueError(f"two evaluation tasks are named {spec.name!r}: give one a 'name'")
        tasks[spec.name] = task
    return tasks


def main(argv: list[str] | None = None) -> None:
    from core.checkpoint import load_model
    from core.common import cleanup_distributed, init_distributed, print0, set_num_threads
    from core.tokenizer import Tokenizer

    p = argparse.ArgumentParser(prog="python -m core.eval.chat", description="Chat evaluation of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a complete checkpoint directory (step_NNNNNN)")
    p.add_argument("--tokenizer-dir", required=True)
    p.add_argument("--tasks", required=True, help='JSON file: {"tasks": [TaskSpec dicts], "paths": {source: file}, '
                                                  '"max_problems": {name: n}}')
    p.add_argument("--device-type", default="")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--out", default="", help="write the results as JSON here (rank 0)")
    a = p.parse_args(argv)
    info = init_distributed(a.device_type or None)
    if info.device.type == "cpu":
        set_num_threads()
    spec = json.loads(Path(a.tasks).read_text())
    model, _ = load_model(Path(a.checkpoint), info.device)
    tokenizer = Tokenizer.from_directory(a.tokenizer_dir)
    tasks = build_eval_tasks(spec["tasks"], spec.get("paths", {}))
    result = evaluate_chat(model, tokenizer, tasks, max_problems=spec.get("max_problems"), batch_size=a.batch_size,
                           max_new_tokens=a.max_new_tokens, log=print0)
    print0(format_table(result))
    if a.out and info.rank == 0:
        Path(a.out).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
