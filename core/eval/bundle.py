"""The CORE eval bundle on disk: core.yaml (tasks), eval_meta_data.csv (random baselines) and
eval_data/ (one jsonl per task). Reading it needs no torch: the eval_bundle stage validates a bundle
with this module alone, so a change to the scoring code (core/eval/core.py) does not change that
artifact's code identity.

    from core.eval.bundle import load_bundle, load_task_data
    bundle = load_bundle("../shared/data/eval_bundle")       # Bundle(root, tasks, missing)
    rows = load_task_data(bundle, bundle.task("copa"), max_per_task=100)
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from core.layouts import LayoutError, inside

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234
DEFAULT_DELIMITER = " "


class BundleError(ValueError):
    """The eval bundle is unreadable or inconsistent; the message names the file and the problem."""


@dataclass(frozen=True)
class TaskSpec:
    label: str
    dataset_uri: str           # relative to eval_data/
    task_type: str             # multiple_choice | schema | language_modeling
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float     # percent, from eval_meta_data.csv
    has_categories: bool = False


@dataclass(frozen=True)
class Bundle:
    root: Path
    tasks: tuple[TaskSpec, ...]          # every task of core.yaml, in its order
    missing: tuple[str, ...]             # labels whose data file is absent

    @property
    def present(self) -> tuple[TaskSpec, ...]:
        return tuple(t for t in self.tasks if t.label not in self.missing)

    def data_path(self, task: TaskSpec) -> Path:
        return self.root / "eval_data" / task.dataset_uri

    def task(self, label: str) -> TaskSpec:
        for t in self.tasks:
            if t.label == label:
                return t
        raise KeyError(f"no task {label!r} in {self.root / 'core.yaml'}; tasks: {[t.label for t in self.tasks]}")


def read_baselines(path: Path) -> dict[str, float]:
    """eval_meta_data.csv -> {task label: random baseline in percent}."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "Eval Task" not in rows[0] or "Random baseline" not in rows[0]:
        raise BundleError(f"{path}: expected columns 'Eval Task' and 'Random baseline'")
    return {r["Eval Task"].strip(): float(r["Random baseline"]) for r in rows}


def load_bundle(bundle_dir: str | Path) -> Bundle:
    """Read core.yaml and eval_meta_data.csv; tasks whose data file is absent are listed as missing."""
    root = Path(bundle_dir)
    for name in ("core.yaml", "eval_meta_data.csv"):
        if not (root / name).is_file():
            raise BundleError(f"{root} is not an eval bundle: {name} is missing (expected core.yaml, "
                              "eval_meta_data.csv and eval_data/, e.g. from the eval_bundle stage)")
    try:
        config = yaml.safe_load((root / "core.yaml").read_text(encoding="utf-8"))
        entries = config["icl_tasks"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise BundleError(f"{root / 'core.yaml'}: cannot read the icl_tasks list ({e})") from e
    baselines = read_baselines(root / "eval_meta_data.csv")
    tasks, missing = [], []
    for entry in entries:
        label = entry.get("label")
        if entry.get("icl_task_type") not in TASK_TYPES:
            raise BundleError(f"{root / 'core.yaml'}: task {label!r} has icl_task_type "
                              f"{entry.get('icl_task_type')!r}; supported: {', '.join(TASK_TYPES)}")
        if label not in baselines:
            raise BundleError(f"{root / 'eval_meta_data.csv'}: no random baseline for task {label!r}")
        try:  # the file read must be one the bundle's manifest covers
            inside(root / "eval_data", entry.get("dataset_uri"), f"{root / 'core.yaml'}: task {label!r}: dataset_uri")
        except LayoutError as e:
            raise BundleError(str(e)) from None
        shots = entry.get("num_fewshot", [0])
        task = TaskSpec(label=label, dataset_uri=entry["dataset_uri"], task_type=entry["icl_task_type"],
                        num_fewshot=int(shots[0] if isinstance(shots, list) else shots),
                        continuation_delimiter=entry.get("continuation_delimiter", DEFAULT_DELIMITER),
                        random_baseline=baselines[label], has_categories=bool(entry.get("has_categories", False)))
        tasks.append(task)
        if not (root / "eval_data" / task.dataset_uri).is_file():
            missing.append(label)
    return Bundle(root=root, tasks=tuple(tasks), missing=tuple(missing))


def load_task_data(bundle: Bundle, task: TaskSpec, max_per_task: int = -1) -> list[dict]:
    """The task's rows, shuffled with Random(1337), then cut to max_per_task (-1: all)."""
    path = bundle.data_path(task)
    with open(path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    # The files are often ordered (by category, difficulty...): shuffle so that a cut is a fair sample.
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def centered(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so that chance is 0 and perfect is 1 (baseline in percent)."""
    b = 0.01 * random_baseline
    return (accuracy - b) / (1.0 - b)
