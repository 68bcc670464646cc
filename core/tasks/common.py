"""What every task shares: the Task base (a sliceable list of conversations), answer extraction for
generative grading, the multiple-choice prompt format, and file readers.

A conversation is {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...], ...}.
User content is a str; assistant content is a str or a list of parts
{"type": "text"|"python"|"python_output", "text": str} (a python part is a calculator tool call,
python_output its result: core.tokenizer.render_conversation trains on the call, not the output).
Evaluable tasks add what grading needs: multiple choice carries "letters" (the choices' labels)
and the gold letter as the assistant message; generative tasks end with "#### N" (GSM8K style).
"""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Iterator

# GSM8K's final-answer convention (openai/grade-school-math: dataset.py): "#### 72"; commas are
# thousands separators and are dropped before comparing.
ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text: str) -> str | None:
    """The number after '#### ' (commas removed), or None when the text has none."""
    m = ANSWER_RE.search(text)
    if not m:
        return None
    return m.group(1).strip().replace(",", "")


def last_text(message: dict) -> str:
    """The text of an assistant message's last text part (or the whole string content)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    texts = [p.get("text", "") for p in content if p.get("type") == "text"]
    return texts[-1] if texts else ""


def render_mc(question: str, letters, choices) -> str:
    """The chat multiple-choice prompt (the reference's format). The letter comes *after* its choice
    and right after '=' with no space, so that the prompt holds the very token ("A", not " A") the
    assistant answers with: small models bind the letter to the choice much better that way."""
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)


# The reference reads every hub dataset through `shuffle(seed=42)`, so that "the first N problems"
# of an evaluation with a limit (and its validation slices) are a random sample, not a file's head.
SHUFFLE_SEED = 42


def reference_order(n: int, seed: int | None = SHUFFLE_SEED) -> list[int]:
    """Source row of each of `n` rows as the reference reads them: row i is source row
    numpy.random.default_rng(seed).permutation(n)[i], which is exactly the order Hugging Face's
    `datasets.Dataset.shuffle(seed=seed)` yields (docs/nanochat.md). seed None: the file's order.
    The one place a task's rows are permuted."""
    if seed is None:
        return list(range(n))
    import numpy as np

    return np.random.default_rng(seed).permutation(n).tolist()


class Task:
    """A list of conversations with an optional [start:stop:step] view (the reference's slicing).

    Subclasses set `name` and `eval_type` ("generative" | "categorical" | None for train-only) and
    implement num_examples() and get_example(i); evaluable ones implement evaluate()."""

    name = "task"
    eval_type: str | None = None

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"{type(self).__name__}: bad slice start={start} stop={stop} step={step} "
                             "(need 0 <= start <= stop and step >= 1)")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return max(0, -(-(stop - self.start) // self.step))  # ceil: the reference's count

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} examples")
        return self.get_example(self.start + index * self.step)

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Generative tasks: is `completion` (the decoded assistant reply) correct?"""
        raise NotImplementedError(f"{self.name} is not a generative evaluation task")

    def grade(self, conversation: dict, completion: str) -> tuple[bool, str]:
        """evaluate() with a one-line reason for a failure ("" when the task cannot say why);
        tasks that run the reply (HumanEval) override it to say which error or limit stopped it."""
        return self.evaluate(conversation, completion), ""


def answer_matches(conversation: dict, completion: str) -> bool:
    """GSM8K-style grading: the '#### N' of the completion equals the reference's."""
    gold = extract_answer(last_text(conversation["messages"][-1]))
    return gold is not None and extract_answer(completion) == gold


# ---- readers --------------------------------------------------------------------------------------


def read_records(path: Path | str) -> list:
    """Rows of a .jsonl / .jsonl.gz (one JSON value a line), .json (a list, or a dict of records)
    or .parquet file, as Python objects."""
    p = Path(path)
    name = p.name.lower()
    if not p.is_file():
        raise FileNotFoundError(f"task file {p} does not exist")
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if name.endswith(".json"):
        data = json.loads(p.read_text(encoding="utf-8"))
        return list(data.values()) if isinstance(data, dict) else list(data)
    if name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        rows = []
        with opener(p, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{n}: not valid JSON ({e})") from None
        return rows
    raise ValueError(f"task file {p}: unsupported format (use .jsonl, .jsonl.gz, .json or .parquet)")


def check_messages(messages, where: str) -> list[dict]:
    """Validate a message list: optional system first, then user/assistant alternating, ending with
    the assistant, at least one exchange."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    rest = messages[1:] if messages[0].get("role") == "system" else messages
    if len(rest) < 2:
        raise ValueError(f"{where}: a conversation needs at least a user and an assistant message")
    for i, m in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != expected or "content" not in m:
            raise ValueError(f"{where}: message {i} must be a {expected!r} message with content "
                             "(turns alternate user/assistant after an optional system message)")
    if rest[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's (it is what is trained on)")
    return messages
