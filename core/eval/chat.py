"""Chat evaluation: GSM8K with the calculator tool, HumanEval in the sandbox, multiple choice in
chat form, spelling; ChatCORE as the reference defines it.

    python -m core.eval.chat --checkpoint OUT/checkpoints/step_000100 --tokenizer-dir TOK \\
        --tasks tasks.json                     # {"tasks": [TaskSpec dicts], "paths": {source: file}}
    torchrun --nproc_per_node=8 -m core.eval.chat ...   # problems dealt round-robin over ranks

    from core.eval.chat import evaluate_chat, format_table
    result = evaluate_chat(model, tokenizer, {"GSM8K": gsm8k_task, "ARC-Easy": arc}, max_problems={"GSM8K": 50})
    print(format_table(result)); result.to_dict()

Two kinds of task (the reference's scripts/chat_eval.py):
- generative (GSM8K, HumanEval, SpellingBee): the prompt is the conversation up to
  <|assistant_start|>; the Engine generates the reply (greedy by default), running python tool
  calls through the calculator and injecting their output; the reply is decoded and graded by the
  task (GSM8K: the number after '#### '; HumanEval: the code passes the tests in core/sandbox.py).
  pass@k with num_samples > 1. Grading runs in a thread pool (`grade_workers`) while the next
  problem generates: HumanEval's sandboxed programs overlap with generation.
- categorical (ARC, MMLU): no sampling: one forward pass over the prompt, and the answer is the
  choice letter with the largest logit at the answer position (argmax over the letters only,
  which makes the task easier than free generation, as in the reference).
Scores: accuracy per task, centred on chance ((acc - baseline) / (1 - baseline)). ChatCORE is the
mean centred accuracy over exactly ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval with the
reference's baselines (0.25 for the three multiple-choice tasks, 0 for the two generative ones),
and exists only when all five ran; otherwise the result says "ChatCORE over k/5 tasks" and which
are missing, with the mean over those k beside it (not comparable with the reference's). Other
tasks (spelling, CORE-bundle multiple choice) are reported next to it, never inside it. A task
counts as a ChatCORE task by its name: arc_easy / ARC-Easy, arc_challenge, mmlu, gsm8k, humaneval.
Under torch.distributed each rank takes problems rank, rank + world, ... and the counts are
all-reduced, so every rank returns the same result.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

GENERATIVE_DEFAULTS = dict(max_new_tokens=512, temperature=0.0, top_k=50, num_samples=1)
# nanochat scripts/chat_eval.py: the tasks of ChatCORE and the accuracy of guessing on each
CHATCORE_BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}
CHATCORE_CATEGORICAL = ("ARC-Easy", "ARC-Challenge", "MMLU")  # the reference's chatcore_cat during SFT
TASK_LINE = "chat eval | "  # how evaluate_chat's line per finished task starts (stages/chat_eval.py counts them)
_KEY = {re.sub(r"[^a-z0-9]", "", k.lower()): k for k in CHATCORE_BASELINES}


def chatcore_name(task_name: str) -> str | None:
    """The ChatCORE task a task name stands for ("arc_easy", "ARC-Easy" -> "ARC-Easy"), else None."""
    return _KEY.get(re.sub(r"[^a-z0-9]", "", task_name.lower()))


def chatcore_members(names) -> dict[str, str]:
    """{ChatCORE task: task name} of the names that count in ChatCORE; two names for one slot is an error."""
    out: dict[str, str] = {}
    for name in names:
        core = chatcore_name(name)
        if core is None:
            continue
        if core in out:
            raise ValueError(f"tasks {out[core]!r} and {name!r} both count as {core} in ChatCORE; rename one")
        out[core] = name
    return out


@dataclass
class TaskResult:
    name: str
    kind: str            # generative | categorical
    correct: int
    total: int
    baseline: float      # accuracy of random guessing (the reference's value for ChatCORE tasks)
    seconds: float = 0.0
    samples: list = field(default_factory=list)  # a few (prompt, completion, correct) for the report
    available: int = 0   # problems in the task (total < available: a sample of it was evaluated)
    sandbox: dict = field(default_factory=dict)  # code tasks: {"isolation": one line, "packages": importable}

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def centered(self) -> float:
        return (self.accuracy - self.baseline) / (1.0 - self.baseline)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class ChatEvalResult:
    tasks: dict[str, TaskResult]

    def _core(self) -> dict[str, TaskResult]:
        members = chatcore_members(n for n, t in self.tasks.items() if t.total)
        return {core: self.tasks[name] for core, name in members.items()}

    def _centred(self, names) -> list[float]:
        core = self._core()
        return [(core[n].accuracy - CHATCORE_BASELINES[n]) / (1.0 - CHATCORE_BASELINES[n]) for n in names if n in core]

    @property
    def chatcore_missing(self) -> list[str]:
        core = self._core()
        return [n for n in CHATCORE_BASELINES if n not in core]

    @property
    def chatcore(self) -> float | None:
        """The reference's ChatCORE: only when all five tasks ran."""
        return None if self.chatcore_missing else _mean(self._centred(CHATCORE_BASELINES))

    @property
    def chatcore_partial(self) -> float | None:
        """The mean centred accuracy over the ChatCORE tasks that ran (== chatcore when all did)."""
        return _mean(self._centred(CHATCORE_BASELINES))

    @property
    def chatcore_cat(self) -> float | None:
        cat = self._centred(CHATCORE_CATEGORICAL)
        return _mean(cat) if len(cat) == len(CHATCORE_CATEGORICAL) else None

    @property
    def chatcore_label(self) -> str:
        missing = self.chatcore_missing
        label = "ChatCORE" if not missing else (f"ChatCORE over {len(CHATCORE_BASELINES) - len(missing)}/"
                                                f"{len(CHATCORE_BASELINES)} tasks (missing {', '.join(missing)})")
        sampled = [t for t in self._core().values() if t.available and t.total < t.available]
        return label + (f", sampled (<= {max(t.total for t in sampled)} problems per task)" if sampled else "")

    def to_dict(self) -> dict:
        members = {name: core for core, name in chatcore_members(self.tasks).items()}
        return {"chatcore": self.chatcore, "chatcore_label": self.chatcore_label,
                "chatcore_partial": self.chatcore_partial, "chatcore_cat": self.chatcore_cat,
                "chatcore_missing": self.chatcore_missing,
                "tasks": {k: {"kind": t.kind, "accuracy": t.accuracy, "correct": t.correct, "total": t.total,
                              "available": t.available, "baseline": t.baseline, "centered": t.centered,
                              "chatcore_task": members.get(k), "seconds": round(t.seconds, 3),
                              **({"sandbox": t.sandbox} if t.sandbox else {})}
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
                        context_limit: int | None = None, grade_workers: int = 2) -> TaskResult:
    """Sample replies with `engine` (anything with the Engine's generate_batch) and grade them with
    task.grade in `grade_workers` threads; a problem passes when any of its num_samples replies is correct."""
    rank, world = _dist()
    t0 = time.perf_counter()
    n = _problems(task, max_problems)
    limit = context_limit or _context_limit(engine.model)
    pending = []
    with ThreadPoolExecutor(max_workers=max(1, grade_workers)) as pool:
        for i in range(rank, n, world):
            conv = task[i]
            prompt = tokenizer.render_for_completion(conv)
            budget = min(max_new_tokens, limit - len(prompt))
            completions = []
            if budget >= 1:  # a prompt that fills the model's positions cannot be answered: wrong
                rows, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=budget,
                                                temperature=temperature, top_k=top_k, seed=seed + i)
                completions = [tokenizer.decode(r[len(prompt):]) for r in rows]
            pending.append((i, conv, completions, [pool.submit(task.grade, conv, c) for c in completions]))
        correct = total = 0
        samples = []
        for i, conv, completions, futures in pending:
            grades = [f.result() for f in futures] or [(False, "prompt longer than the model's context")]
            ok = any(g for g, _ in grades)
            correct += int(ok)
            total += 1
            if len(samples) < keep_samples:
                samples.append({"index": i, "question": conv["messages"][0]["content"][:500],
                                "completion": (completions[0] if completions else "")[:2000], "correct": ok,
                                **({} if ok or not grades[0][1] else {"reason": grades[0][1]})})
    device = next(engine.model.parameters()).device
    correct, total = (int(v) for v in _all_reduce([correct, total], device))
    sandbox = task.sandbox() if hasattr(task, "sandbox") else {}
    return TaskResult(name or task.name, "generative", correct, total, 0.0, time.perf_counter() - t0, samples,
                      available=len(task), sandbox=sandbox)


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
    return TaskResult(name or task.name, "categorical", int(correct), int(total), baseline, time.perf_counter() - t0,
                      available=len(task))


def evaluate_chat(model, tokenizer, tasks: dict, *, max_problems: dict | int | None = None, engine=None,
                  batch_size: int = 8, grade_workers: int = 2, log=print, **generation) -> ChatEvalResult:
    """Every task of {name: Task}; max_problems per task name (or one int for all; None/-1 = all).
    generation: max_new_tokens, temperature, top_k, num_samples, seed for the generative tasks.
    ChatCORE tasks (by name, see chatcore_name) are centred on the reference's baselines."""
    from core.engine import Engine

    members = {name: core for core, name in chatcore_members(tasks).items()}
    engine = engine or Engine(model, tokenizer)
    opts = {**GENERATIVE_DEFAULTS, **generation}
    results = {}
    for name, task in tasks.items():
        limit = max_problems.get(name) if isinstance(max_problems, dict) else max_problems
        if task.eval_type == "categorical":
            res = evaluate_categorical(task, model, tokenizer, name=name, max_problems=limit, batch_size=batch_size)
        elif task.eval_type == "generative":
            res = evaluate_generative(task, engine, tokenizer, name=name, max_problems=limit,
                                      grade_workers=grade_workers, **opts)
        else:
            raise ValueError(f"task {name} ({type(task).__name__}) is not an evaluation task (no eval_type)")
        if name in members:
            res.baseline = CHATCORE_BASELINES[members[name]]
        results[name] = res
        if log:
            log(f"{TASK_LINE}{name}: {res.correct}/{res.total} = {100 * res.accuracy:.2f}% ({res.seconds:.1f}s)"
                + (f" | {res.sandbox['isolation']}" if res.sandbox else ""))
    return ChatEvalResult(results)


def chatcore_metrics(model, tokenizer, tasks: dict, *, max_cat: int = -1, max_sample: int = 24, **kwargs) -> dict:
    """The reference's ChatCORE estimate during SFT (scripts/chat_sft.py --chatcore-every, with
    --chatcore-max-cat / --chatcore-max-sample): greedy, each categorical task capped at max_cat
    problems and each generative one at max_sample (-1 = all). Returns the wandb record:
    chatcore_metric (None unless all five tasks ran), chatcore_partial, chatcore_cat,
    chatcore/<task> accuracies. kwargs go to evaluate_chat (engine, batch_size, log, ...)."""
    limits = {n: max_cat if t.eval_type == "categorical" else max_sample for n, t in tasks.items()}
    r = evaluate_chat(model, tokenizer, tasks, max_problems=limits, **kwargs)
    return {"chatcore_metric": r.chatcore, "chatcore_partial": r.chatcore_partial, "chatcore_cat": r.chatcore_cat,
            **{f"chatcore/{n}": t.accuracy for n, t in r.tasks.items()}}


def format_table(result: ChatEvalResult) -> str:
    """Per-task rows (tasks outside ChatCORE marked), the sandbox of code tasks, then the ChatCORE
    line with its label."""
    members = {name for name in chatcore_members(result.tasks).values()}
    rows = [("task", "kind", "correct", "accuracy", "centered")]
    for name, t in result.tasks.items():
        label = name if name in members else f"{name} (not in ChatCORE)"
        rows.append((label, t.kind, f"{t.correct}/{t.total}", f"{100 * t.accuracy:.2f}%", f"{t.centered:+.4f}"))
    core = result.chatcore_partial
    rows.append((result.chatcore_label, "", "", "", "n/a" if core is None else f"{core:+.4f}"))
    widths = [max(len(r[i]) for r in rows[:-1]) for i in range(5)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows[:-1]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    notes = [f"{name}: {t.sandbox['isolation']}" for name, t in result.tasks.items() if t.sandbox]
    return "\n".join(lines + notes + [f"{rows[-1][0]}: {rows[-1][4]}"])


def build_eval_tasks(specs: list[dict], paths: dict) -> dict:
    """{display name: Task} from TaskSpec dicts (core.tasks.mixture) and their local files."""
    from core.tasks.mixture import TaskSpec, build_task

    cache: dict = {}
    tasks = {}
    for d in specs:
        spec = TaskSpec.from_dict(d)
        task = build_task(spec, paths.get(spec.source), cache)
        if task.eval_type is None:
            raise ValueError(f"task {spec.name} ({spec.task}) cannot be evaluated: use gsm8k, humaneval, "
                             "spelling_bee or multiple_choice")
        if spec.name in tasks:
            raise ValueError(f"two evaluation tasks are named {spec.name!r}: give one a 'name'")
        tasks[spec.name] = task
    return tasks


def main(argv: list[str] | None = None) -> None:
    from core.checkpoint import load_model
    from core.common import cleanup_distributed, init_distributed, print0, set_num_threads
    from core.engine import inference_weights
    from core.tokenizer import Tokenizer

    p = argparse.ArgumentParser(prog="python -m core.eval.chat", description="Chat evaluation of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a complete checkpoint directory (step_NNNNNN)")
    p.add_argument("--tokenizer-dir", required=True)
    p.add_argument("--tasks", required=True, help='JSON file: {"tasks": [TaskSpec dicts], "paths": {source: file}, '
                                                  '"max_problems": {name: n}}')
    p.add_argument("--device-type", default="")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--grade-workers", type=int, default=2, help="replies graded at once (HumanEval sandboxes)")
    p.add_argument("--out", default="", help="write the results as JSON here (rank 0)")
    a = p.parse_args(argv)
    info = init_distributed(a.device_type or None)
    if info.device.type == "cpu":
        set_num_threads()
    spec = json.loads(Path(a.tasks).read_text())
    model, _ = load_model(Path(a.checkpoint), info.device)
    inference_weights(model)  # generation only: one cast now, not one per decode step
    tokenizer = Tokenizer.from_directory(a.tokenizer_dir)
    tasks = build_eval_tasks(spec["tasks"], spec.get("paths", {}))
    result = evaluate_chat(model, tokenizer, tasks, max_problems=spec.get("max_problems"), batch_size=a.batch_size,
                           grade_workers=a.grade_workers, max_new_tokens=a.max_new_tokens, log=print0)
    print0(format_table(result))
    if a.out and info.rank == 0:
        Path(a.out).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
