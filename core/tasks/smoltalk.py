"""General chat: SmolTalk (HuggingFaceTB/smol-smoltalk, Apache-2.0) from its parquet files, and
the chitchat-dataset conversations (PyPI, MIT) as the offline stand-in.

    task = SmolTalk("smoltalk_train.parquet")   # column `messages`: [{"role", "content"}, ...], read in
                                                 # the reference's seeded order (common.reference_order)
    task = Chitchat()                            # 7,168 conversations from the installed package
    task = Chitchat(stop=7000); val = Chitchat(start=7000)   # disjoint train / validation slices

SmolTalk's files are fetched by the sft stage (stagekit.fetch) when a URL is reachable; core only
reads local files. Chitchat conversations are turns of one or more short messages by two people:
the first speaker becomes the user and the other the assistant, a turn's messages are joined with
a space, consecutive turns of the same speaker are merged, and a trailing user turn is dropped (the
assistant must speak last: it is what is trained on).
"""
from __future__ import annotations

import json
from pathlib import Path

from core.tasks.common import SHUFFLE_SEED, Task, check_messages, read_records, reference_order


class SmolTalk(Task):
    name = "smoltalk"

    def __init__(self, path: Path | str, shuffle_seed: int | None = SHUFFLE_SEED, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        self.rows = [r["messages"] if isinstance(r, dict) else r for r in read_records(self.path)]
        self.order = reference_order(len(self.rows), shuffle_seed)
        if self.rows:  # cheap spot checks; every conversation is rendered (and so checked) in training
            check_messages(self.rows[0], f"{self.path} row 1")
            check_messages(self.rows[-1], f"{self.path} row {len(self.rows)}")

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        return {"messages": self.rows[self.order[index]]}


def chitchat_file() -> Path:
    """dataset.json inside the installed chitchat-dataset package."""
    try:
        import chitchat_dataset
    except ImportError:
        raise ImportError("the chitchat task needs the PyPI package chitchat-dataset "
                          "(pip install 'nanorun[demo]')") from None
    return Path(chitchat_dataset.__file__).parent / "dataset.json"


def chitchat_messages(conv: dict) -> list[dict] | None:
    """One chitchat conversation as alternating user/assistant messages (None if too short)."""
    speakers: dict[str, str] = {}
    messages: list[dict] = []
    for turn in conv.get("messages", []):
        text = " ".join(m["text"].strip() for m in turn if m.get("text", "").strip())
        if not text:
            continue
        role = speakers.setdefault(turn[0]["sender"], ("user", "assistant")[len(speakers) % 2])
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    if messages and messages[-1]["role"] == "user":
        messages.pop()
    return messages if len(messages) >= 2 else None


class Chitchat(Task):
    name = "chitchat"

    def __init__(self, path: Path | str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path) if path else chitchat_file()
        data = json.loads(self.path.read_text(encoding="utf-8"))
        # dict order is the file's order: deterministic across runs and machines
        convs = [chitchat_messages(c) for c in (data.values() if isinstance(data, dict) else data)]
        self.conversations = [c for c in convs if c is not None]

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return {"messages": self.conversations[index]}
