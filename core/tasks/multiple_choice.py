"""Multiple choice in chat form (MMLU, ARC, and the CORE bundle's multiple-choice files).

    task = MultipleChoice("mmlu_test.parquet")           # layout detected from the first row
    task[0] -> {"messages": [user: render_mc(...), assistant: "B"], "letters": ("A", "B", "C", "D")}

Layouts (one record per question; .jsonl, .json or .parquet):
- mmlu: {"question", "choices": [...], "answer": int, "subject"?}; the auxiliary_train files wrap
  each row in {"train": {...}}, which is unwrapped.
- arc:  {"question", "choices": {"text": [...], "label": [...]}, "answerKey"} (Hugging Face), or
  the original {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}.
- core: {"query", "choices": [...], "gold": int} (the eval bundle's multiple-choice files, e.g.
  world_knowledge/arc_easy.jsonl); a leading "Question:" and a trailing "Answer:" are stripped.
The assistant answers with the letter alone; evaluation (core.eval.chat) compares the logits of
the choice letters at the answer position instead of sampling, as the reference does.
"""
from __future__ import annotations

import re
import string
from pathlib import Path

from core.tasks.common import SHUFFLE_SEED, Task, read_records, reference_order, render_mc

LAYOUTS = ("auto", "mmlu", "arc", "core")


def detect_layout(row: dict) -> str:
    if "train" in row and isinstance(row["train"], dict):
        row = row["train"]
    if "answerKey" in row:
        return "arc"
    if "query" in row and "gold" in row:
        return "core"
    if "question" in row and "answer" in row and "choices" in row:
        return "mmlu"
    raise ValueError(f"unknown multiple-choice layout (keys {sorted(row)}): expected mmlu "
                     "{question, choices, answer}, arc {question, choices, answerKey} or core {query, choices, gold}")


def _strip_core(query: str) -> str:
    q = query.strip()
    q = re.sub(r"^Question:\s*", "", q)
    return re.sub(r"\s*Answer:\s*$", "", q)


def normalise(row: dict, layout: str) -> tuple[str, list[str], list[str], str]:
    """(question, choices, letters, gold letter) of one record."""
    if layout == "mmlu":
        row = row.get("train", row) if isinstance(row.get("train"), dict) else row
        choices = list(row["choices"])
        letters = list(string.ascii_uppercase[:len(choices)])
        return row["question"], choices, letters, letters[int(row["answer"])]
    if layout == "arc":
        q, ch = row["question"], row["choices"]
        if isinstance(q, dict):  # original ARC jsonl
            ch, q = q["choices"], q["stem"]
        if isinstance(ch, dict):
            choices, letters = list(ch["text"]), [str(x) for x in ch["label"]]
        else:
            choices, letters = [c["text"] for c in ch], [str(c["label"]) for c in ch]
        gold = str(row["answerKey"])
        if gold not in letters:
            raise ValueError(f"ARC answerKey {gold!r} is not one of the labels {letters}")
        return q, choices, letters, gold
    if layout == "core":
        choices = list(row["choices"])
        letters = list(string.ascii_uppercase[:len(choices)])
        return _strip_core(row["query"]), choices, letters, letters[int(row["gold"])]
    raise ValueError(f"layout {layout!r}: use one of {LAYOUTS}")


class MultipleChoice(Task):
    name = "multiple_choice"
    eval_type = "categorical"

    def __init__(self, path: Path | str, layout: str = "auto", name: str | None = None,
                 shuffle_seed: int | None = SHUFFLE_SEED, **kwargs):
        super().__init__(**kwargs)
        if layout not in LAYOUTS:
            raise ValueError(f"MultipleChoice layout {layout!r}: use one of {LAYOUTS}")
        self.path = Path(path)
        self.name = name or self.path.name.split(".")[0]
        rows = read_records(self.path)
        if not rows:
            raise ValueError(f"{self.path}: no questions")
        self.layout = detect_layout(rows[0]) if layout == "auto" else layout
        self.items = []
        for n, row in enumerate(rows, 1):
            try:
                self.items.append(normalise(row, self.layout))
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise ValueError(f"{self.path} record {n}: not a {self.layout} multiple-choice row ({e})") from None
        self.order = reference_order(len(self.items), shuffle_seed)

    def num_examples(self) -> int:
        return len(self.items)

    def get_example(self, index: int) -> dict:
        question, choices, letters, gold = self.items[self.order[index]]
        return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                             {"role": "assistant", "content": gold}],
                "letters": tuple(letters)}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
