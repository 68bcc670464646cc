"""core/tokenizer.py: training layout, reference split regex, encode/decode, byte table, chat rendering."""
from __future__ import annotations

import json

import numpy as np
import pytest
import regex

from core.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, _merges_from_ranks, bytes_to_unicode
from tests._tok import corpus_texts, small_tokenizer, val_texts

SAMPLES = [
    "Hello world! This is a test.",
    "Numbers: 123, 4567, 89\nContractions: I'm, you're, it's, WE'LL",
    "Unicode: 你好世界 🌍 naïve café — «quotes»\r\n\ttabbed\n\n\n   spaced   ",
    "def f(x):\n    return x ** 2  # comment\n",
    "",
]


@pytest.fixture(scope="module")
def tok(shared_data) -> Tokenizer:
    return small_tokenizer(str(shared_data / "corpus"), 1024)


def test_layout_bytes_then_merges_then_specials(tok):
    V = 1024
    assert tok.vocab_size == V
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(V - 9, V))
    assert tok.bos_token_id == V - 9
    # id b is byte b: a lone byte that no merge covers encodes to its own value
    for ch in "A~\x00\x7f":
        assert tok.encode(ch) == [ord(ch)]
    assert tok.encode("é") == list("é".encode())  # 2-byte char, not merged at this vocab size
    assert tok.decode([200]) == "\ufffd"  # a lone continuation byte


def test_pretokenizer_is_the_reference_regex(tok, shared_data):
    # The HF pipeline (onig Split + ByteLevel) must split exactly like the reference regex does.
    m = bytes_to_unicode()
    for text in SAMPLES + val_texts(shared_data / "corpus")[:30]:
        ours = [w for w, _ in tok.hf.pre_tokenizer.pre_tokenize_str(text)]
        ref = ["".join(m[b] for b in piece.encode()) for piece in regex.findall(SPLIT_PATTERN, text)]
        assert ours == ref


def test_roundtrip_and_byte_table(tok, shared_data):
    tb = tok.token_bytes()
    assert tb.dtype.is_floating_point is False and tb.shape == (tok.vocab_size,) and str(tb.dtype) == "torch.int32"
    assert (tb[tok.vocab_size - 9:] == 0).all() and (tb[:256] == 1).all() and int(tb.max()) > 3
    val_docs = val_texts(shared_data / "corpus")[:50]
    for text in SAMPLES + val_docs:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        # bits-per-byte relies on this: token byte lengths sum to the text's UTF-8 length
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))


def test_specials_are_never_parsed_from_text(tok):
    ids = tok.encode("<|bos|>hi<|assistant_end|>")
    assert tok.bos_token_id not in ids and tok.encode_special("<|assistant_end|>") not in ids
    assert tok.decode(ids) == "<|bos|>hi<|assistant_end|>"
    assert tok.decode([tok.bos_token_id]) == "<|bos|>"
    with pytest.raises(KeyError, match="unknown special token"):
        tok.encode_special("<|eos|>")


def test_batch_encode_prepend_append(tok):
    single = [tok.encode(t) for t in SAMPLES]
    bos, end = tok.bos_token_id, tok.encode_special("<|assistant_end|>")
    assert tok.encode(SAMPLES) == single
    assert tok.encode(SAMPLES, num_threads=1) == single
    assert tok.encode(SAMPLES, prepend="<|bos|>", append=end) == [[bos] + s + [end] for s in single]
    assert tok.encode(SAMPLES[0], prepend=bos) == [bos] + single[0]
    with pytest.raises(TypeError):
        tok.encode(("a", "b"))


def test_save_load_roundtrip(tok, tmp_path):
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    tb = np.load(tmp_path / "token_bytes.npy")
    assert tb.dtype == np.int32 and len(tb) == tok.vocab_size
    again = Tokenizer.from_directory(tmp_path)
    assert again.vocab_size == tok.vocab_size and again.bos_token_id == tok.bos_token_id
    assert again.encode(SAMPLES) == tok.encode(SAMPLES)
    assert again.encode("<|bos|>") == tok.encode("<|bos|>")  # setting restored on load
    # tokenizer.json is plain HF: the specials are registered as special added tokens at the end
    added = json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"]
    assert [(a["id"], a["content"], a["special"]) for a in added] == \
        [(tok.vocab_size - 9 + i, s, True) for i, s in enumerate(SPECIAL_TOKENS)]
    with pytest.raises(FileNotFoundError, match="tokenizer stage"):
        Tokenizer.from_directory(tmp_path / "nowhere")


def test_train_caps_and_errors(shared_data):
    texts = corpus_texts(shared_data / "corpus")
    t = Tokenizer.train(texts, vocab_size=300, doc_cap=100, max_chars=5_000)
    s = t.train_stats
    # documents cropped to 100 chars; stops right after passing 5,000 chars (the reference rule)
    assert 5_000 < s["chars"] <= 5_100 and s["chars"] <= 100 * s["docs"] and t.vocab_size == 300
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(texts, vocab_size=260)
    with pytest.raises(ValueError, match="train on more text"):
        Tokenizer.train(["ab ab ab"], vocab_size=400)


def test_encodes_exactly_like_the_reference_trainer(tok, shared_data):
    # rustbpe (the reference's trainer + encoder) with the same number of merges must produce the
    # same tokens as our HF tokenizer built from the recovered merges.
    import rustbpe

    ref = rustbpe.Tokenizer()
    ref.train_from_iterator(iter(t[:10_000] for t in corpus_texts(shared_data / "corpus")), 1024 - 9,
                            pattern=SPLIT_PATTERN)
    ref_bytes = {i: b for b, i in ref.get_mergeable_ranks()}
    ours_bytes = {i: tok.decode_bytes([i]) for i in range(tok.vocab_size - 9)}
    assert sorted(ref_bytes.values()) == sorted(ours_bytes.values())
    for text in SAMPLES + val_texts(shared_data / "corpus")[:40]:
        assert [ours_bytes[i] for i in tok.encode(text)] == [ref_bytes[i] for i in ref.encode(text)]


def test_merge_recovery_handles_a_token_learned_twice():
    # rustbpe can learn b"abc" twice (ab+c, later a+bc): one HF token, and spare merges fill the vocab
    ranks = [(bytes([b]), b) for b in range(256)] + [
        (b"ab", 256), (b"bc", 257), (b"abc", 258), (b"abc", 259), (b"abcd", 260), (b"xy", 261), (b"zz", 262)]
    tokens, merges = _merges_from_ranks(ranks, 256 + 5)
    assert tokens[256:] == [b"ab", b"bc", b"abc", b"abcd", b"xy"]
    assert merges == [(97, 98), (98, 99), (256, 99), (258, 100), (120, 121)]
    with pytest.raises(RuntimeError, match="cannot recover the merge"):
        _merges_from_ranks([(bytes([b]), b) for b in range(256)] + [(b"abc", 256)], 257)


def test_same_text_same_tokenizer(shared_data):
    texts = corpus_texts(shared_data / "corpus")[:60]
    a, b = Tokenizer.train(texts, vocab_size=600), Tokenizer.train(iter(texts), vocab_size=600)
    assert a.hf.to_str() == b.hf.to_str()


# ---- chat ----------------------------------------------------------------------------------------
def sp(tok, name):
    return tok.encode_special(f"<|{name}|>")


def test_render_conversation_masks(tok):
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "2+3"},
            {"type": "python_output", "text": "5"},
            {"type": "text", "text": "It is 5."},
        ]},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    ids, mask = tok.render_conversation(conv)
    e = tok.encode
    expected = [
        ([tok.bos_token_id], 0),
        ([sp(tok, "user_start")] + e("Be brief.\n\nWhat is 2+3?") + [sp(tok, "user_end")], 0),
        ([sp(tok, "assistant_start")], 0),
        (e("Let me compute. "), 1),
        ([sp(tok, "python_start")] + e("2+3") + [sp(tok, "python_end")], 1),
        ([sp(tok, "output_start")] + e("5") + [sp(tok, "output_end")], 0),
        (e("It is 5.") + [sp(tok, "assistant_end")], 1),
        ([sp(tok, "user_start")] + e("thanks") + [sp(tok, "user_end")], 0),
        ([sp(tok, "assistant_start")], 0),
        (e("You're welcome.") + [sp(tok, "assistant_end")], 1),
    ]
    assert ids == [i for part, _ in expected for i in part]
    assert mask == [m for part, m in expected for _ in part]
    assert conv["messages"][0]["role"] == "system"  # the input is not mutated
    # a bare list of messages is accepted; truncation cuts ids and mask together
    ids2, mask2 = tok.render_conversation(conv["messages"], max_tokens=7)
    assert ids2 == ids[:7] and mask2 == mask[:7]


def test_render_conversation_rejects_bad_shapes(tok):
    with pytest.raises(ValueError, match="must be 'user'"):
        tok.render_conversation([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="must be 'assistant'"):
        tok.render_conversation([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="unknown part type"):
        tok.render_conversation([{"role": "user", "content": "a"},
                                 {"role": "assistant", "content": [{"type": "image", "text": "x"}]}])
    with pytest.raises(ValueError, match="system message must be followed by a user"):
        tok.render_conversation([{"role": "system", "content": "s"}])
    with pytest.raises(ValueError, match="no messages"):
        tok.render_conversation({"messages": []})


def test_render_for_completion(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    prompt = tok.render_for_completion({"messages": msgs})
    assert prompt == [tok.bos_token_id, sp(tok, "user_start"), *tok.encode("Hi"), sp(tok, "user_end"),
                      sp(tok, "assistant_start")]
    assert len(msgs) == 2
    with pytest.raises(ValueError, match="ending with an assistant"):
        tok.render_for_completion(msgs[:1])
