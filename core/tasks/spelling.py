"""Synthetic spelling tasks from a word list: they teach a small model what letters its tokens are
made of (a BPE token hides its characters) and to count letters with the calculator tool.

    words = load_words("words_alpha.txt")                  # or load_words("english-words")
    SimpleSpelling(words, size=200_000)[0]  -> "Spell the word: apple" / "apple:a,p,p,l,e"
    SpellingBee(words, size=80_000)[0]      -> "How many r are in strawberry?" / a worked answer that
        spells the word, counts hit by hit, checks with the tool call 'strawberry'.count('r') and
        ends "#### 3"
    SpellingBee(words, size=256, split="test").evaluate(conv, completion)

Every example is a pure function of (word list, split, index): example i draws from
random.Random(i) (train) or random.Random(10_000_000 + i) (test, so the splits never share a
seed), so a mixture is reproducible without storing anything. The word list: dwyl's
words_alpha.txt (the reference's; a copy sits in the shared chat data) or the `english-words`
package's web2 list (offline, from PyPI).
"""
from __future__ import annotations

import random
import string
from pathlib import Path

from core.tasks.common import Task, answer_matches

LETTERS = string.ascii_lowercase
TEST_SEED_OFFSET = 10_000_000  # larger than any train size: train and test seeds never meet

# Ways people ask (data augmentation); {letter} and {word} may get quoted below.
QUESTION_TEMPLATES = (
    "How many {letter} are in the word {word}", "How many {letter} are in {word}",
    "Count the number of {letter} in {word}", "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}", "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}", "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}", "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}", "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}", "Number of {letter} in {word}", "How many {letter} does {word} have",
    "{word} has how many {letter}", "In {word}, count the {letter}", "Give me the count of {letter} in {word}",
    "Calculate the number of {letter} in {word}", "What is the frequency of {letter} in {word}",
    "¿Cuántas {letter} hay en {word}?", "Combien de {letter} dans {word}", "Wie viele {letter} sind in {word}",
    "{word}中有多少个{letter}", "{word}に{letter}は何個ありますか",
)


def load_words(source: Path | str) -> list[str]:
    """Lower-case alphabetic words, de-duplicated, from a text file with one word a line (CRLF ok),
    in the file's order as the reference reads it (words_alpha.txt is not quite sorted, and the
    order decides which word random.Random(i).choice picks), or from 'english-words' (the
    package's set, sorted so that the order does not depend on the platform)."""
    if str(source) == "english-words":
        try:
            from english_words import get_english_words_set
        except ImportError:
            raise ImportError("the word list 'english-words' needs the PyPI package english-words "
                              "(pip install 'nanorun[demo]')") from None
        words = sorted(get_english_words_set(["web2"], alpha=True, lower=True))
    else:
        p = Path(source)
        if not p.is_file():
            raise FileNotFoundError(f"word list {p} does not exist (one word a line, e.g. words_alpha.txt)")
        words = list(dict.fromkeys(w.strip().lower() for w in p.read_text(encoding="utf-8").splitlines()))
    words = [w for w in words if w.isalpha() and w.isascii()]
    if not words:
        raise ValueError(f"word list {source}: no alphabetic words found")
    return words


class _WordTask(Task):
    def __init__(self, words: list[str], size: int = 1000, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"{self.name}: split must be 'train' or 'test', got {split!r}")
        if size < 1:
            raise ValueError(f"{self.name}: size must be >= 1, got {size}")
        self.words, self.size, self.split = words, size, split

    def num_examples(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        return random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)


class SimpleSpelling(_WordTask):
    """"Spell the word: apple" -> "apple:a,p,p,l,e": the condensed hard part of letter counting."""

    name = "simple_spelling"

    def __init__(self, words: list[str], size: int = 1000, split: str = "train", **kwargs):
        super().__init__(words, size, split, **kwargs)
        self.words = list(words)
        random.Random(42).shuffle(self.words)  # another word order than SpellingBee's

    def get_example(self, index: int) -> dict:
        word = self._rng(index).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}


class SpellingBee(_WordTask):
    """How many times a letter occurs in a word, answered by spelling, counting, then the tool."""

    name = "spelling_bee"
    eval_type = "generative"

    def get_example(self, index: int) -> dict:
        rng = self._rng(index)
        word = rng.choice(self.words)
        # mostly a letter of the word; sometimes one it may not contain (answer 0)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        count = word.count(letter)
        template = rng.choice(QUESTION_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        lq, wq = rng.choice(("", "'", '"')), rng.choice(("", "'", '"'))
        question = template.format(letter=f"{lq}{letter}{lq}", word=f"{wq}{word}{wq}")
        if rng.random() < 0.5:
            question += "?"
        lines = [f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual "
                 f"approach first.\n\nFirst spell the word out:\n{word}:{','.join(word)}\n\n"
                 f"Then count the occurrences of '{letter}':\n"]
        running = 0
        for i, ch in enumerate(word, 1):
            # "3:r" with no space: " r" would be another token than the "r" of the spelling
            if ch == letter:
                running += 1
                lines.append(f"{i}:{ch} hit! count={running}\n")
            else:
                lines.append(f"{i}:{ch}\n")
        lines.append(f"\nThis gives us {running}.")
        parts = [{"type": "text", "text": "".join(lines)},
                 {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
                 {"type": "python", "text": f"'{word}'.count('{letter}')"},
                 {"type": "python_output", "text": str(count)},
                 {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"}]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return answer_matches(conversation, completion)
