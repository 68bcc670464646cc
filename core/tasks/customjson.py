"""Conversations from a file: the identity conversations (and any custom chat data).

    task = Conversations("identity_conversations.jsonl")       # a JSON list of messages per line
    task[0] -> {"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}

Each line/record is either a list of messages or {"messages": [...]} (SmolTalk's layout). Every
conversation is validated on load (alternating user/assistant after an optional system message,
ending with the assistant), so a broken file fails before training, naming the line.
"""
from __future__ import annotations

from pathlib import Path

from core.tasks.common import Task, check_messages, read_records


class Conversations(Task):
    name = "conversations"

    def __init__(self, path: Path | str, name: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        self.name = name or self.path.name.split(".")[0]
        self.conversations = []
        for n, rec in enumerate(read_records(self.path), 1):
            messages = rec.get("messages") if isinstance(rec, dict) else rec
            self.conversations.append(check_messages(messages, f"{self.path} record {n}"))

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return {"messages": self.conversations[index]}
