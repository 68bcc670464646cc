"""core/tasks: every source yields conversations that render with the right loss masks; GSM8K
annotations become calculator calls the real calculator answers; spelling tasks are deterministic
and graded; multiple-choice layouts load; the mixture is data (counts, epochs, order, specs)."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.calculator import use_calculator
from core.tasks.common import extract_answer, render_mc
from core.tasks.customjson import Conversations
from core.tasks.gsm8k import GSM8K, solution_parts
from core.tasks.mixture import TaskSpec, build_mixture, build_task
from core.tasks.multiple_choice import MultipleChoice
from core.tasks.smoltalk import Chitchat, SmolTalk, chitchat_messages
from core.tasks.spelling import SimpleSpelling, SpellingBee, load_words
from tests._tok import small_tokenizer


@pytest.fixture(scope="module")
def tok(shared_data):
    return small_tokenizer(str(shared_data / "corpus"))


@pytest.fixture(scope="module")
def chat(shared_data):
    return shared_data / "chat"


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    f = tmp_path_factory.mktemp("words") / "words.txt"
    f.write_bytes(b"strawberry\r\napple\r\nbanana\r\nMississippi\r\nx-ray\r\nkiwi\r\n")
    return load_words(f)


def spans(tok, ids, mask, name):
    """Indices of the special token `name` in ids, with their mask values."""
    sid = tok.encode_special(name)
    return [(i, mask[i]) for i, t in enumerate(ids) if t == sid]


def test_extract_answer_and_mc_prompt():
    assert extract_answer("so 3+4 = 7\n#### 1,234") == "1234"
    assert extract_answer("#### -5.5 dollars") == "-5.5"
    assert extract_answer("no marker 42") is None
    assert render_mc("2+2?", "AB", ["4", "5"]) == ("Multiple Choice question: 2+2?\n- 4=A\n- 5=B\n\n"
                                                   "Respond only with the letter of the correct answer.")


def test_gsm8k_annotations_become_tool_calls_masked_in_with_outputs_masked_out(tok, chat):
    parts = solution_parts("Half is 48/2 = <<48/2=24>>24 clips.\nSo <<48+24=72>>72 in all.\n#### 72")
    assert parts == [{"type": "text", "text": "Half is 48/2 = "}, {"type": "python", "text": "48/2"},
                     {"type": "python_output", "text": "24"}, {"type": "text", "text": "24 clips.\nSo "},
                     {"type": "python", "text": "48+24"}, {"type": "python_output", "text": "72"},
                     {"type": "text", "text": "72 in all.\n#### 72"}]
    task = GSM8K(chat / "gsm8k_train.jsonl")
    assert len(task) == 7473 and task.eval_type == "generative"
    conv = task[0]
    ids, mask = tok.render_conversation(conv, max_tokens=1 << 30)
    n_calls = sum(p["type"] == "python" for p in conv["messages"][1]["content"])
    assert n_calls >= 1
    starts, ends = spans(tok, ids, mask, "<|python_start|>"), spans(tok, ids, mask, "<|python_end|>")
    outs, out_ends = spans(tok, ids, mask, "<|output_start|>"), spans(tok, ids, mask, "<|output_end|>")
    assert len(starts) == len(ends) == len(outs) == len(out_ends) == n_calls
    assert all(m == 1 for _, m in starts + ends)          # the tool call is trained on
    for (o, m0), (e, m1) in zip(outs, out_ends):          # the tool output is not, tokens inside included
        assert m0 == m1 == 0 and not any(mask[o:e + 1])
    for (s, _), (e, _) in zip(starts, ends):
        assert all(mask[s:e + 1])
    user_end = spans(tok, ids, mask, "<|user_end|>")[0][0]
    assert not any(mask[:user_end + 2])                   # BOS, the question, <|assistant_start|>
    assert mask[-1] == 1 and ids[-1] == tok.encode_special("<|assistant_end|>")
    # grading: the reference's #### number
    gold = conv["messages"][1]["content"][-1]["text"].split("####")[-1].strip()
    assert task.evaluate(conv, f"blah\n#### {gold}") and not task.evaluate(conv, "#### 99999999")
    assert not task.evaluate(conv, gold)                  # no marker, no credit


def test_the_calculator_reproduces_gsm8k_tool_outputs(chat):
    """What training teaches (call -> output) is what the engine's calculator answers at inference."""
    task = GSM8K(chat / "gsm8k_train.jsonl", shuffle_seed=None)
    checked = 0
    for i in range(100):
        parts = task[i]["messages"][1]["content"]
        for call, out in zip(parts, parts[1:]):
            if call["type"] == "python":
                assert out["type"] == "python_output"
                assert float(use_calculator(call["text"])) == pytest.approx(float(out["text"]), rel=1e-6), call
                checked += 1
    assert checked > 250


def test_spelling_tasks_are_deterministic_correct_and_graded(tok, words):
    assert words == ["strawberry", "apple", "banana", "mississippi", "kiwi"]  # file order, lower, alphabetic only
    bee = SpellingBee(words, size=50)
    assert [bee[i] for i in range(5)] == [SpellingBee(words, size=50)[i] for i in range(5)]
    test = SpellingBee(words, size=50, split="test")
    assert [bee[i]["messages"][0] for i in range(10)] != [test[i]["messages"][0] for i in range(10)]
    for i in range(20):
        conv = bee[i]
        parts = conv["messages"][1]["content"]
        call = next(p for p in parts if p["type"] == "python")
        word, letter = call["text"].split("'")[1], call["text"].split("'")[3]
        count = word.count(letter)
        assert use_calculator(call["text"]) == str(count)      # the tool call the model learns is runnable
        assert next(p for p in parts if p["type"] == "python_output")["text"] == str(count)
        assert parts[-1]["text"].endswith(f"#### {count}")
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
        assert bee.evaluate(conv, f"... #### {count}") and not bee.evaluate(conv, f"#### {count + 1}")
        ids, mask = tok.render_conversation(conv, max_tokens=1 << 30)
        (o, m), = spans(tok, ids, mask, "<|output_start|>")
        assert m == 0 and mask[o - 1] == 1                      # <|python_end|> trained, output not
    simple = SimpleSpelling(words, size=10)
    conv = simple[3]
    word = conv["messages"][0]["content"].removeprefix("Spell the word: ")
    assert word in words and conv["messages"][1]["content"] == f"{word}:{','.join(word)}"
    with pytest.raises(ValueError, match="split must be"):
        SpellingBee(words, split="dev")


def test_english_words_package_list():
    words = load_words("english-words")
    assert len(words) > 200_000 and "strawberry" in words and words == sorted(words)


def test_chitchat_turns_become_alternating_user_assistant():
    conv = {"messages": [[{"text": "hi", "sender": "a"}, {"text": "there", "sender": "a"}],
                         [{"text": "hello", "sender": "b"}], [{"text": "more from b", "sender": "b"}],
                         [{"text": "  ", "sender": "a"}], [{"text": "bye", "sender": "a"}]]}
    assert chitchat_messages(conv) == [{"role": "user", "content": "hi there"},
                                       {"role": "assistant", "content": "hello\nmore from b"}]  # trailing user dropped
    assert chitchat_messages({"messages": [[{"text": "alone", "sender": "a"}]]}) is None
    task = Chitchat()
    assert len(task) == 4017  # the package's conversations with at least one exchange
    for i in (0, len(task) - 1):
        msgs = task[i]["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)


def test_conversation_files_and_smoltalk_parquet(tmp_path, chat):
    ident = Conversations(chat / "identity_conversations.jsonl")
    assert len(ident) == 1000 and ident.name == "identity_conversations"
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) + "\n\n" +
                 json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "c"},
                                          {"role": "assistant", "content": "d"}]}) + "\n")
    assert [len(c["messages"]) for c in Conversations(f)] == [2, 3]
    f.write_text(json.dumps([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) + "\n")
    with pytest.raises(ValueError, match="record 1: message 1 must be a 'assistant' message"):
        Conversations(f)
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "smol.parquet")
    smol = SmolTalk(tmp_path / "smol.parquet", start=1, stop=3, shuffle_seed=None)  # file order
    assert len(smol) == 2 and smol[0]["messages"][0]["content"] == "q1"


def test_multiple_choice_layouts(tmp_path, tok):
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text("\n".join(json.dumps({"question": f"Q{i}?", "choices": ["w", "x", "y", "z"], "answer": i % 4,
                                          "subject": "s"}) for i in range(8)))
    arc = tmp_path / "arc.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "Sky?", "choices": {"text": ["red", "blue"], "label": ["1", "2"]},
                                          "answerKey": "2"}]), arc)
    core = tmp_path / "arc_easy.jsonl"
    core.write_text(json.dumps({"query": "Question: Which is hot?\nAnswer:", "choices": ["ice", "fire", "snow"],
                                "gold": 1}) + "\n")
    aux = tmp_path / "aux.jsonl"
    aux.write_text(json.dumps({"train": {"question": "Q", "choices": ["a", "b"], "answer": 1}}) + "\n")
    t = MultipleChoice(mmlu)
    assert t.layout == "mmlu" and len(t) == 8 and t.eval_type == "categorical"
    golds = sorted(c["messages"][1]["content"] for c in t)
    assert golds == ["A", "A", "B", "B", "C", "C", "D", "D"] and t[0]["letters"] == ("A", "B", "C", "D")
    c = MultipleChoice(arc)[0]
    assert c["letters"] == ("1", "2") and c["messages"][1]["content"] == "2"
    assert c["messages"][0]["content"].startswith("Multiple Choice question: Sky?\n- red=1\n- blue=2\n")
    c = MultipleChoice(core, name="arc_easy")[0]
    assert c["messages"][0]["content"].startswith("Multiple Choice question: Which is hot?\n- ice=A\n")
    assert c["messages"][1]["content"] == "B"
    assert MultipleChoice(aux)[0]["messages"][1]["content"] == "B"  # auxiliary_train's 'train' wrapper
    ids, mask = tok.render_conversation(c, max_tokens=1 << 30)
    assert sum(mask) == 2  # the letter and <|assistant_end|>
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="unknown multiple-choice layout"):
        MultipleChoice(bad)


def test_mixture_counts_epochs_order_and_specs(chat, words, tmp_path):
    wl = tmp_path / "w.txt"
    wl.write_text("\n".join(words))
    specs = [{"task": "conversations", "source": "identity_conversations.jsonl", "stop": 10, "epochs": 2,
              "name": "identity"},
             {"task": "gsm8k", "source": "gsm8k_train.jsonl", "start": 100, "stop": 105},
             {"task": "spelling_bee", "source": "w.txt", "size": 7}]
    paths = {"identity_conversations.jsonl": chat / "identity_conversations.jsonl",
             "gsm8k_train.jsonl": chat / "gsm8k_train.jsonl", "w.txt": wl}
    mix = build_mixture(specs, paths)
    assert len(mix) == 32 and mix.counts == {"identity": 20, "gsm8k": 5, "spelling_bee": 7}
    assert sorted(mix.task_of(i) for i in range(len(mix))).count("identity") == 20
    again = build_mixture(specs, paths)
    assert [again[i] for i in range(len(mix))] == [mix[i] for i in range(len(mix))]
    other = build_mixture(specs, paths, seed=1)
    assert [other.task_of(i) for i in range(len(mix))] != [mix.task_of(i) for i in range(len(mix))]
    assert mix.task_of(0) != mix.task_of(1) or mix.task_of(1) != mix.task_of(2)  # interleaved, not blocks
    # specs: canonical short form, validation with the reason
    assert TaskSpec.from_dict({"task": "chitchat"}).to_dict() == {"task": "chitchat", "source": "chitchat-dataset"}
    assert TaskSpec.from_dict({"task": "spelling_bee", "size": 3}).source == "english-words"
    for bad, msg in [({"task": "nope"}, "unknown task"), ({"task": "gsm8k"}, "needs a source"),
                     ({"task": "spelling_bee"}, "size >= 1"), ({"task": "gsm8k", "source": "g", "size": 3}, "synthetic"),
                     ({"task": "gsm8k", "source": "g", "epochs": 0}, "epochs >= 1"),
                     ({"task": "gsm8k", "source": "g", "colour": 1}, "unknown key"),
                     ({"task": "gsm8k", "source": "english-words"}, "package for another task")]:
        with pytest.raises(ValueError, match=msg):
            TaskSpec.from_dict(bad)
    with pytest.raises(ValueError, match="no local file for source 'missing.jsonl'"):
        build_mixture([{"task": "gsm8k", "source": "missing.jsonl"}], paths)
    with pytest.raises(ValueError, match="have no examples"):
        build_mixture([{"task": "gsm8k", "source": "gsm8k_train.jsonl", "start": 10_000}], paths)
    task = build_task(TaskSpec.from_dict({"task": "chitchat", "start": 4000}))
    assert len(task) == 17 and task.name == "chitchat"
