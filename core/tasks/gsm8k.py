"""GSM8K grade-school math (openai/gsm8k, MIT) with the calculator tool.

    task = GSM8K("gsm8k_train.jsonl")          # {"question", "answer"} per line (or the HF parquet)
    task[0]["messages"][1]["content"] -> [{"type": "text", ...}, {"type": "python", "text": "48/2"},
                                          {"type": "python_output", "text": "24"}, ...]
    task.evaluate(task[0], "... #### 72")       # True when the final numbers agree

The worked solutions carry calculator annotations `<<48/2=24>>`: each becomes a python tool call
(the expression, trained on) and its output (the result, injected by the engine at inference time
and masked out of the loss), so the model learns to call the calculator instead of guessing
arithmetic. The final answer follows '#### '.
"""
from __future__ import annotations

import re
from pathlib import Path

from core.tasks.common import SHUFFLE_SEED, Task, answer_matches, read_records, reference_order

_ANNOTATION = re.compile(r"(<<[^>]+>>)")


def solution_parts(answer: str) -> list[dict]:
    """The assistant parts of a GSM8K solution: text, then python + python_output per annotation."""
    parts = []
    for piece in _ANNOTATION.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):
    name = "gsm8k"
    eval_type = "generative"

    def __init__(self, path: Path | str, shuffle_seed: int | None = SHUFFLE_SEED, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        self.rows = read_records(self.path)
        for n, row in enumerate(self.rows[:1] + self.rows[-1:], 1):
            if not isinstance(row, dict) or "question" not in row or "answer" not in row:
                raise ValueError(f"{self.path}: GSM8K rows need 'question' and 'answer' fields, got {row!r:.200}")
        self.order = reference_order(len(self.rows), shuffle_seed)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[self.order[index]]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": solution_parts(row["answer"])}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return answer_matches(conversation, completion)
