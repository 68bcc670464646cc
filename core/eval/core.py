"""CORE: the 22-task in-context-learning score of DCLM (arXiv:2406.11794), scored as nanochat does.

    from core.eval.core import evaluate_core, format_table
    result = evaluate_core(model, tokenizer, "../shared/data/eval_bundle", device="cpu", max_per_task=100)
    print(format_table(result))          # per task, side by side with GPT-2 124M and 1.5B
    result.core, result.label            # 0.1234, "CORE over 19/22 tasks"

Benchmark: `python -m bench.core_eval`. Under torchrun every rank calls evaluate_core with its own
rank / world_size; examples are split round-robin and the per-example results are summed with
all_reduce, so every rank returns the same CoreResult.

Scoring (docs/reference.md#core) -- these details decide the numbers, keep them exact:
- a task's rows are shuffled with random.Random(1337) before the max_per_task cut; few-shot
  examples for row i are random.Random(1234 + i).sample(all rows but i, k) of the (cut) task;
- prompts: few-shot blocks joined by a blank line, then the item; BOS prepended to every sequence;
- multiple_choice: one sequence per choice (query + delimiter + choice), scored on the tokens after
  their common token prefix; schema: one sequence per context option, scored on the common token
  suffix (the shared continuation); the choice with the lowest mean cross-entropy wins (ties: the
  first); language_modeling: correct iff the greedy argmax reproduces every continuation token;
- centered = (acc - b/100) / (1 - b/100) with b the random baseline of eval_meta_data.csv;
  CORE = mean centered accuracy over the tasks.
Jeopardy has `has_categories: true` in core.yaml. llm-foundry would split it into one sub-task per
category; the reference (and the published GPT-2 numbers below) scores it as one task with
few-shot examples from any category, each context already starting with its "CATEGORY: " tag.
We do the same, so the numbers stay comparable.

Speed (the reference runs one forward per example): sequences of all examples are sorted by length
and packed into padded batches; for a core.gpt.GPT, an example whose choices share a long token
prefix (few-shot prompts) prefills that prefix once into a KV cache without computing its logits,
copies the cache to one row per choice and runs only the differing tails; losses are computed only
at the scored positions.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from core.eval.bundle import (FEWSHOT_SEED, BundleError, TaskSpec, centered, load_bundle,  # noqa: F401 (re-exported)
                              load_task_data)

log = logging.getLogger("nanorun.core_eval")


# ============================================================================================ prompts


class _AllBut(Sequence):
    """range(n) without `skip`, without building the list: random.sample() only needs len/getitem,
    and this gives exactly the sample of the reference's explicit list (whose O(n) construction per
    row made few-shot selection O(n^2) on the 20k-row tasks)."""

    def __init__(self, n: int, skip: int):
        self.n, self.skip = n, skip

    def __len__(self) -> int:
        return self.n - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i if i < self.skip else i + 1


def fewshot_indices(n: int, idx: int, k: int) -> list[int]:
    """Indices of the k few-shot examples for row idx of an n-row task (never idx itself)."""
    if k <= 0:
        return []
    if k > n - 1:
        raise ValueError(f"{k}-shot needs at least {k + 1} rows, the task has {n}: use a larger max_per_task")
    return random.Random(FEWSHOT_SEED + idx).sample(_AllBut(n, idx), k)


def render_prompts(item: dict, task: TaskSpec, fewshot: list[dict]) -> list[str]:
    """The texts to score: one per choice (multiple_choice), per context option (schema), or
    [prompt without the continuation, prompt with it] (language_modeling)."""
    d = task.continuation_delimiter
    if task.task_type == "multiple_choice":
        head = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{head}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        head = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{head}{ctx}{d}{item['continuation']}" for ctx in item["context_options"]]
    if task.task_type == "language_modeling":
        # Contexts are stripped (some carry trailing spaces), and so is the prompt without the
        # continuation: a trailing space would merge into the continuation's first token, and the
        # shorter prompt would no longer be a token prefix of the longer one.
        head = "".join(f"{str(ex['context']).strip()}{d}{ex['continuation']}\n\n" for ex in fewshot)
        without = f"{head}{str(item['context']).strip()}{d}"
        return [without.strip(), f"{without}{item['continuation']}"]
    raise ValueError(f"unsupported task type {task.task_type!r}")


def common_length(seqs: list[list[int]], direction: str = "left") -> int:
    """Length of the common prefix ('left') or suffix ('right') of token sequences."""
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        j = i if direction == "left" else -1 - i
        if any(s[j] != first[j] for s in seqs[1:]):
            return i
    return n


@dataclass
class Example:
    """Token sequences of one item and, per sequence, the scored span [start, end) of its tokens."""
    seqs: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int | None = None


def spans_for(task_type: str, seqs: list[list[int]]) -> tuple[list[list[int]], list[int], list[int]]:
    if task_type == "multiple_choice":       # same context, choices differ: score after the common prefix
        start = common_length(seqs, "left")
        return seqs, [start] * len(seqs), [len(s) for s in seqs]
    if task_type == "schema":                # contexts differ, continuation shared: score the common suffix
        suffix = common_length(seqs, "right")
        return seqs, [len(s) - suffix for s in seqs], [len(s) for s in seqs]
    without, with_ = seqs                    # language modeling: score the continuation of one sequence
    if not (len(without) < len(with_) and with_[:len(without)] == without):
        raise ValueError("language_modeling: the prompt without the continuation does not tokenize to a "
                         "prefix of the prompt with it; this tokenizer merges across the delimiter")
    return [with_], [len(without)], [len(with_)]


def build_examples(data: list[dict], task: TaskSpec, tokenizer, indices: list[int],
                   max_seq_len: int | None = None) -> list[Example]:
    """Render and tokenize rows `indices` of a task (one batched tokenizer call)."""
    prompts, counts = [], []
    for idx in indices:
        fewshot = [data[i] for i in fewshot_indices(len(data), idx, task.num_fewshot)]
        p = render_prompts(data[idx], task, fewshot)
        prompts.extend(p)
        counts.append(len(p))
    tokens = tokenizer.encode(prompts, prepend=tokenizer.bos_token_id) if prompts else []
    examples, pos = [], 0
    for idx, c in zip(indices, counts):
        seqs, starts, ends = spans_for(task.task_type, tokens[pos:pos + c])
        pos += c
        if max_seq_len is not None:
            # A model with a hard context limit sees the last max_seq_len tokens (the reference's
            # rule for GPT-2): drop from the left and shift the spans.
            crops = [max(0, len(s) - max_seq_len) for s in seqs]
            if any(st - cr < 1 for st, cr in zip(starts, crops)):
                raise ValueError(f"{task.label} row {idx}: the scored continuation alone is longer than "
                                 f"max_seq_len={max_seq_len}")
            seqs = [s[cr:] for s, cr in zip(seqs, crops)]
            starts = [st - cr for st, cr in zip(starts, crops)]
            ends = [en - cr for en, cr in zip(ends, crops)]
        examples.append(Example(seqs, starts, ends, data[idx].get("gold")))
    return examples


# ============================================================================================ scoring


def _scored_stats(logits: torch.Tensor, inputs: torch.Tensor, spans: list[tuple[int, int]]):
    """Per row r with local span (a, b): mean cross-entropy of predicting inputs[r, a+1:b+1] from
    logits[r, a:b], and whether the argmax gets every one of those tokens right."""
    rows = torch.cat([torch.full((b - a,), r, dtype=torch.long) for r, (a, b) in enumerate(spans)])
    pos = torch.cat([torch.arange(a, b) for a, b in spans])
    rows, pos = rows.to(logits.device), pos.to(logits.device)
    sel = logits[rows, pos].float()
    tgt = inputs[rows, pos + 1]
    ce = F.cross_entropy(sel, tgt, reduction="none")
    wrong = (sel.argmax(dim=-1) != tgt).float()
    n = len(spans)
    ce_sum = torch.zeros(n, device=logits.device).index_add_(0, rows, ce)
    wrong_sum = torch.zeros(n, device=logits.device).index_add_(0, rows, wrong)
    counts = torch.tensor([b - a for a, b in spans], device=logits.device, dtype=torch.float32)
    return (ce_sum / counts).tolist(), (wrong_sum == 0).tolist()


def _pad(seqs: list[list[int]], pad_id: int, device) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


def _gpt_class():
    try:
        from core.gpt import GPT, KVCache
        return GPT, KVCache
    except ImportError:
        return None, None


@dataclass
class Scorer:
    """Runs the model over examples: score(examples) -> per sequence (mean CE over its scored
    tokens, whether greedy argmax reproduces all of them). Padded batches of at most batch_size rows
    and max_batch_tokens (rows x longest); with use_kv (a core.gpt.GPT), examples whose sequences
    share an unscored prefix of >= share_prefix_min tokens go through the KV-cache prefill instead."""
    model: Any
    device: torch.device
    pad_id: int
    batch_size: int
    max_batch_tokens: int
    share_prefix_min: int        # shortest shared unscored prefix worth a KV prefill (else padded batches)
    use_kv: bool

    def score(self, examples: list[Example]) -> tuple[list[list[float]], list[list[bool]]]:
        losses = [[math.nan] * len(ex.seqs) for ex in examples]
        exact = [[False] * len(ex.seqs) for ex in examples]
        rows = []  # (example, seq) scored by padded batches
        for i, ex in enumerate(examples):
            shared = min(common_length(ex.seqs, "left"), min(ex.starts)) - 1
            if self.use_kv and shared >= self.share_prefix_min:
                losses[i], exact[i] = self._score_shared_prefix(ex, shared)
            else:
                rows.extend((i, j) for j in range(len(ex.seqs)))
        rows.sort(key=lambda r: -examples[r[0]].ends[r[1]])
        b = 0
        while b < len(rows):
            longest = examples[rows[b][0]].ends[rows[b][1]]
            n = max(1, min(self.batch_size, self.max_batch_tokens // max(longest, 1), len(rows) - b))
            batch = rows[b:b + n]
            b += n
            seqs = [examples[i].seqs[j][:examples[i].ends[j]] for i, j in batch]
            inputs = _pad(seqs, self.pad_id, self.device)
            logits = self.model(inputs)
            spans = [(examples[i].starts[j] - 1, examples[i].ends[j] - 1) for i, j in batch]
            ce, ok = _scored_stats(logits, inputs, spans)
            del logits
            for (i, j), c, o in zip(batch, ce, ok):
                losses[i][j], exact[i][j] = c, o
        return losses, exact

    def _score_shared_prefix(self, ex: Example, shared: int):
        """Prefill the unscored prefix the sequences share once (batch 1, no logits), copy the cache
        to one row per sequence and run only the tails: k sequences cost the transformer
        (k-1)*shared fewer tokens, and the lm_head (which dominates small models: 256 x 32768 at
        d4) runs on the tails alone -- this pays off for a single long sequence too."""
        _, KVCache = _gpt_class()
        cache = KVCache.for_model(self.model, batch_size=1, max_seq_len=max(ex.ends))
        prefix = torch.tensor([ex.seqs[0][:shared]], dtype=torch.long, device=self.device)
        self.model(prefix, kv_cache=cache, last_only=True)
        if len(ex.seqs) > 1:
            cache = cache.expand(len(ex.seqs))
        inputs = _pad([s[shared:e] for s, e in zip(ex.seqs, ex.ends)], self.pad_id, self.device)
        logits = self.model(inputs, kv_cache=cache)
        spans = [(s - 1 - shared, e - 1 - shared) for s, e in zip(ex.starts, ex.ends)]
        return _scored_stats(logits, inputs, spans)


def judge(task_type: str, ex: Example, losses: list[float], exact: list[bool]) -> bool:
    if task_type == "language_modeling":
        return bool(exact[0])
    pred = losses.index(min(losses))   # lowest mean loss wins, the first on ties (as the reference)
    return pred == ex.gold


# ============================================================================================ results


@dataclass
class TaskResult:
    label: str
    task_type: str
    num_fewshot: int
    n_examples: int
    accuracy: float
    random_baseline: float
    centered: float
    seconds: float


@dataclass
class CoreResult:
    tasks: dict[str, TaskResult]                    # evaluated tasks, in core.yaml order
    missing: list[str] = field(default_factory=list)  # tasks whose data file is absent
    total_tasks: int = 22                           # tasks in core.yaml
    max_per_task: int = -1

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def core(self) -> float:
        """Mean centered accuracy over the evaluated tasks (nan when there are none)."""
        if not self.tasks:
            return math.nan
        return sum(t.centered for t in self.tasks.values()) / len(self.tasks)

    @property
    def complete(self) -> bool:
        return self.n_tasks == self.total_tasks and self.max_per_task <= 0

    @property
    def label(self) -> str:
        """"CORE" for the full metric; otherwise says what the number covers."""
        text = "CORE" if self.n_tasks == self.total_tasks else f"CORE over {self.n_tasks}/{self.total_tasks} tasks"
        if self.max_per_task > 0:
            text += f" (<= {self.max_per_task} examples/task)"
        return text

    def to_dict(self) -> dict:
        """JSON form for the manifest metrics (floats rounded to 6 places like the reference CSVs)."""
        return {
            "core": round(self.core, 6) if self.tasks else None, "label": self.label,
            "n_tasks": self.n_tasks, "total_tasks": self.total_tasks, "missing": list(self.missing),
            "max_per_task": self.max_per_task,
            "tasks": {k: {**asdict(t), "accuracy": round(t.accuracy, 6), "centered": round(t.centered, 6),
                          "seconds": round(t.seconds, 3)} for k, t in self.tasks.items()},
        }

    def save(self, directory: str | Path) -> dict[str, Path]:
        """core.json (to_dict) plus the table as core.csv and core.md next to GPT-2: what the
        core_eval stage and the run report keep."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = {"json": d / "core.json", "csv": d / "core.csv", "md": d / "core.md"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        paths["csv"].write_text(format_table(self, fmt="csv"), encoding="utf-8")
        paths["md"].write_text(format_table(self, fmt="md"), encoding="utf-8")
        return paths

    @classmethod
    def load(cls, directory: str | Path) -> "CoreResult":
        return cls.from_dict(json.loads((Path(directory) / "core.json").read_text(encoding="utf-8")))

    @classmethod
    def from_dict(cls, d: dict) -> "CoreResult":
        return cls(tasks={k: TaskResult(**v) for k, v in d["tasks"].items()}, missing=list(d.get("missing", [])),
                   total_tasks=d.get("total_tasks", 22), max_per_task=d.get("max_per_task", -1))


# ============================================================================================ evaluate


def _supports_kv(model) -> bool:
    GPT, _ = _gpt_class()
    return GPT is not None and isinstance(model, GPT)


@torch.no_grad()
def evaluate_task(model, tokenizer, data: list[dict], task: TaskSpec, *, device, batch_size: int = 32,
                  max_batch_tokens: int = 4096, share_prefix: bool | None = None, share_prefix_min: int = 32,
                  rank: int = 0, world_size: int = 1, max_seq_len: int | None = None) -> float:
    """Accuracy on one task's (already shuffled and cut) rows, summed over ranks."""
    device = torch.device(device)
    mine = list(range(rank, len(data), world_size))
    examples = build_examples(data, task, tokenizer, mine, max_seq_len=max_seq_len)
    use_kv = _supports_kv(model) if share_prefix is None else share_prefix
    if use_kv and not _supports_kv(model):
        raise ValueError("share_prefix=True needs a core.gpt.GPT (KV cache); pass share_prefix=None or False")
    scorer = Scorer(model, device, tokenizer.bos_token_id, batch_size, max_batch_tokens, share_prefix_min, use_kv)
    losses, exact = scorer.score(examples)
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx, ex, lo, xa in zip(mine, examples, losses, exact):
        correct[idx] = float(judge(task.task_type, ex, lo, xa))
    if world_size > 1:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item() if len(data) else math.nan


def evaluate_core(model, tokenizer, bundle_dir: str | Path, *, device, max_per_task: int = -1,
                  batch_size: int = 32, max_batch_tokens: int = 4096, rank: int = 0, world_size: int = 1,
                  tasks: list[str] | None = None, share_prefix: bool | None = None, share_prefix_min: int = 32,
                  max_seq_len: int | None = None,
                  on_progress: Callable[[int, int, dict], None] | None = None) -> CoreResult:
    """Score `model` on the bundle's tasks (all present ones, or the labels in `tasks`).

    model(idx) -> logits (B, T, vocab); tokenizer: encode(list, prepend=id) and bos_token_id.
    batch_size / max_batch_tokens bound one padded forward (rows, rows x longest). share_prefix:
    None = KV-cache prefill of shared unscored prefixes (>= share_prefix_min tokens) when the model
    is a core.gpt.GPT; on a d4 on CPU it makes few-shot tasks 4-10x faster. max_seq_len: crop sequences
    from the left to this length (models with a hard context limit). on_progress(done, total, info)
    after each task. With world_size > 1 the default process group must be initialised.
    """
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"world_size={world_size} but torch.distributed is not initialised: "
                         "call core.common.init_distributed() under torchrun first")
    bundle = load_bundle(bundle_dir)
    if tasks is not None:
        unknown = sorted(set(tasks) - {t.label for t in bundle.tasks})
        if unknown:
            raise ValueError(f"unknown CORE task(s) {unknown}; tasks in {bundle.root / 'core.yaml'}: "
                             f"{[t.label for t in bundle.tasks]}")
        absent = [t for t in tasks if t in bundle.missing]
        if absent:
            raise BundleError(f"requested task(s) {absent} have no data file in {bundle.root / 'eval_data'}")
    todo = [t for t in bundle.present if tasks is None or t.label in tasks]
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    results: dict[str, TaskResult] = {}
    try:
        for n, task in enumerate(todo, 1):
            t0 = time.perf_counter()
            data = load_task_data(bundle, task, max_per_task)
            acc = evaluate_task(model, tokenizer, data, task, device=device, batch_size=batch_size,
                                max_batch_tokens=max_batch_tokens, share_prefix=share_prefix,
                                share_prefix_min=share_prefix_min, rank=rank,
                                world_size=world_size, max_seq_len=max_seq_len)
            res = TaskResult(task.label, task.task_type, task.num_fewshot, len(data), acc, task.random_baseline,
                             centered(acc, task.random_baseline), time.perf_counter() - t0)
            results[task.label] = res
            if rank == 0:
                log.info("%-34s %2d-shot %-17s n=%5d  accuracy %.4f  centered %+.4f  %6.1fs", task.label,
                         task.num_fewshot, task.task_type, res.n_examples, acc, res.centered, res.seconds)
            if on_progress is not None:
                on_progress(n, len(todo), {"task": task.label, "accuracy": acc, "centered": res.centered})
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return CoreResult(tasks=results, missing=list(bundle.missing), total_tasks=len(bundle.tasks),
                      max_per_task=max_per_task)


# ============================================================================================ tables

# Accuracies of GPT-2 124M and 1.5B from the reference (eval_bundle/openai-community-gpt2{,-xl}.csv,
# CORE 0.113891 and 0.256525); kept here because the downloadable bundle does not carry them.
# tests/core/test_core_eval.py checks them against the CSVs.
GPT2_REFERENCE: dict[str, dict[str, float]] = {
    "GPT-2 124M": dict(hellaswag_zeroshot=0.308504, jeopardy=0.001889, bigbench_qa_wikidata=0.282663,
                       arc_easy=0.412458, arc_challenge=0.221843, copa=0.6, commonsense_qa=0.224406,
                       piqa=0.62296, openbook_qa=0.278, lambada_openai=0.322919, hellaswag=0.307907,
                       winograd=0.578755, winogrande=0.486188, bigbench_dyck_languages=0.155,
                       agi_eval_lsat_ar=0.226087, bigbench_cs_algorithms=0.419697, bigbench_operators=0.085714,
                       bigbench_repeat_copy_logic=0.03125, squad=0.058278, coqa=0.133659, boolq=0.552294,
                       bigbench_language_identification=0.2566),
    "GPT-2 1.5B": dict(hellaswag_zeroshot=0.502, jeopardy=0.092, bigbench_qa_wikidata=0.531, arc_easy=0.595,
                       arc_challenge=0.299, copa=0.67, commonsense_qa=0.227, piqa=0.725, openbook_qa=0.346,
                       lambada_openai=0.523, hellaswag=0.512, winograd=0.714286, winogrande=0.569,
                       bigbench_dyck_languages=0.247, agi_eval_lsat_ar=0.273913, bigbench_cs_algorithms=0.417,
                       bigbench_operators=0.157143, bigbench_repeat_copy_logic=0.09375, squad=0.309, coqa=0.28,
                       boolq=0.619, bigbench_language_identification=0.25),
}


def read_reference_csv(path: str | Path) -> tuple[dict[str, tuple[float, float]], float]:
    """A reference table (Task, Accuracy, Centered; last row CORE) -> ({task: (acc, centered)}, core)."""
    rows, core = {}, math.nan
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        for cells in reader:
            cells = [c.strip() for c in cells]
            if not cells or not cells[0]:
                continue
            if cells[0] == "CORE":
                core = float(cells[2])
            else:
                rows[cells[0]] = (float(cells[1]), float(cells[2]))
    return rows, core


def reference_core(reference: dict[str, float], baselines: dict[str, float]) -> float | None:
    """A reference model's CORE over exactly the tasks in `baselines` (task -> random baseline): the
    mean of its centered accuracies there, None when it lacks one of them. A partial run's CORE is
    comparable only with this, not with the reference's CORE over all tasks."""
    vals = [centered(reference[k], b) for k, b in baselines.items() if k in reference]
    return sum(vals) / len(vals) if vals and len(vals) == len(baselines) else None


def format_table(result: CoreResult, references: dict[str, dict[str, float]] | None = None,
                 baselines: dict[str, float] | None = None, fmt: str = "csv") -> str:
    """Per-task accuracy and centered score next to the references' centered scores, in the layout
    of the reference CSVs (fmt="csv") or as a Markdown table (fmt="md"). The last row is CORE; for a
    partial run the references' CORE is taken over the same tasks, so the columns stay comparable."""
    references = GPT2_REFERENCE if references is None else references
    base = {t.label: t.random_baseline for t in result.tasks.values()} | (baselines or {})
    names = list(references)
    header = ["Task", "Accuracy", "Centered"] + names
    lines = []
    for label, t in result.tasks.items():
        refs = [references[n].get(label) for n in names]
        lines.append([label, f"{t.accuracy:.6f}", f"{t.centered:.6f}"]
                     + ["" if a is None else f"{centered(a, base[label]):.6f}" for a in refs])
    ref_cores = [reference_core(references[n], {k: base[k] for k in result.tasks}) for n in names]
    ref_cores = ["" if c is None else f"{c:.6f}" for c in ref_cores]
    core = f"{result.core:.6f}" if result.tasks else ""
    lines.append([result.label, "", core] + ref_cores)
    if fmt == "md":
        out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in lines]
        if result.missing:
            out.append(f"\nMissing task files: {', '.join(result.missing)}")
        return "\n".join(out) + "\n"
    if fmt != "csv":
        raise ValueError(f"fmt={fmt!r}: use 'csv' or 'md'")
    width = max(35, max(len(r[0]) for r in lines) + 1)
    out = [", ".join([f"{header[0]:<{width}}"] + [f"{h:<10}" for h in header[1:]])]
    out += [", ".join([f"{r[0]:<{width}}"] + [f"{c:<10}" for c in r[1:]]) for r in lines]
    if result.missing:
        out.append(f"# missing task files: {', '.join(result.missing)}")
    return "\n".join(out) + "\n"
