"""CORE evaluation on real bundle rows: bundle reading, sampling, prompts, token spans, scoring,
the centered formula, the GPT-2 reference numbers, batching invariance and distribution over ranks."""
from __future__ import annotations

import json
import os
import random
import sys

import pytest
import torch

from core.eval.core import (GPT2_REFERENCE, BundleError, CoreResult, Example, Scorer, TaskResult, build_examples,
                            centered, common_length, evaluate_core, evaluate_task, fewshot_indices, format_table,
                            judge, load_bundle, load_task_data, read_reference_csv, render_prompts, spans_for)

MISSING = {"hellaswag_zeroshot", "hellaswag", "squad", "coqa"}  # files not carried in ../shared (README)


@pytest.fixture(scope="module")
def bundle(shared_data):
    return load_bundle(shared_data / "eval_bundle")


def train_tokenizer(texts):
    """The project's byte-level BPE (reference split regex) at a small vocab: real merges across
    spaces and punctuation, so the token-level prefix/suffix rules are exercised as in a speedrun."""
    from core.tokenizer import Tokenizer
    return Tokenizer.train(texts, vocab_size=768)


def corpus_texts(corpus_files, n=200):
    import pyarrow.parquet as pq
    return pq.read_table(corpus_files[0]).column("text").to_pylist()[:n]


@pytest.fixture(scope="module")
def tok(corpus_files):
    return train_tokenizer(corpus_texts(corpus_files))


# ---------------------------------------------------------------------------------------------- bundle


def test_bundle_lists_all_tasks_and_the_missing_ones(bundle):
    assert len(bundle.tasks) == 22
    assert set(bundle.missing) == MISSING
    assert len(bundle.present) == 18
    arc = bundle.task("arc_easy")
    assert (arc.task_type, arc.num_fewshot, arc.continuation_delimiter, arc.random_baseline) == \
        ("multiple_choice", 10, "\nAnswer: ", 25.0)
    assert bundle.task("copa").continuation_delimiter == " "          # the default delimiter
    assert bundle.task("jeopardy").has_categories
    assert bundle.task("boolq").random_baseline == 62.0
    assert bundle.task("bigbench_language_identification").random_baseline == 9.1


def test_not_a_bundle_says_what_is_missing(tmp_path):
    with pytest.raises(BundleError, match="core.yaml is missing"):
        load_bundle(tmp_path)


def test_shuffle_with_1337_before_the_cut(bundle, shared_data):
    task = bundle.task("copa")
    rows = [json.loads(line) for line in open(shared_data / "eval_bundle/eval_data/commonsense_reasoning/copa.jsonl")]
    random.Random(1337).shuffle(rows)
    assert load_task_data(bundle, task, max_per_task=10) == rows[:10]
    assert load_task_data(bundle, task) == rows
    assert rows[:10] != [json.loads(line) for line in
                         open(shared_data / "eval_bundle/eval_data/commonsense_reasoning/copa.jsonl")][:10]


# ---------------------------------------------------------------------------------------------- few-shot


@pytest.mark.parametrize("n", [4, 11, 50, 90, 2000, 20321])
def test_fewshot_selection_matches_the_reference_list_sample(n):
    for idx in {0, 1, n // 2, n - 1}:
        for k in (1, 3, 10):
            if k > n - 1:
                continue
            expect = random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)
            got = fewshot_indices(n, idx, k)
            assert got == expect and idx not in got
    assert fewshot_indices(n, 0, 0) == []


def test_fewshot_needs_enough_rows():
    with pytest.raises(ValueError, match="larger max_per_task"):
        fewshot_indices(5, 0, 10)


# ---------------------------------------------------------------------------------------------- prompts

ARC = [
    {"choices": ["Sunlight is the source of energy for nearly all ecosystems.",
                 "Most ecosystems are found on land instead of in water.",
                 "Carbon dioxide is more available than other gases.", "The producers in all ecosystems are plants."],
     "query": "Question: Which statement best explains why photosynthesis is the foundation of most food webs?",
     "gold": 0},
    {"choices": ["safety goggles", "breathing mask", "rubber gloves", "lead apron"],
     "query": "Question: Which piece of safety equipment is used to keep mold spores from entering the "
              "respiratory system?", "gold": 1},
]


def test_multiple_choice_prompts_real_rows(bundle, shared_data):
    with open(shared_data / "eval_bundle/eval_data/world_knowledge/arc_easy.jsonl") as f:
        first, second, third = (json.loads(next(f)) for _ in range(3))
    assert [first, second] == ARC
    prompts = render_prompts(third, bundle.task("arc_easy"), [first, second])
    head = ("Question: Which statement best explains why photosynthesis is the foundation of most food webs?"
            "\nAnswer: Sunlight is the source of energy for nearly all ecosystems.\n\n"
            "Question: Which piece of safety equipment is used to keep mold spores from entering the "
            "respiratory system?\nAnswer: breathing mask\n\n")
    assert prompts == [f"{head}{third['query']}\nAnswer: {c}" for c in third["choices"]]
    copa = {"query": "The man turned on the faucet, therefore", "gold": 1,
            "choices": ["the toilet filled with water.", "water flowed from the spout."]}
    assert render_prompts(copa, bundle.task("copa"), []) == [
        "The man turned on the faucet, therefore the toilet filled with water.",
        "The man turned on the faucet, therefore water flowed from the spout."]


def test_schema_prompts_real_rows(bundle):
    data = load_task_data(bundle, bundle.task("winograd"))
    item = {"context_options": ["The city councilmen refused the demonstrators a permit because the city councilmen",
                                "The city councilmen refused the demonstrators a permit because the demonstrators"],
            "continuation": "feared violence.", "gold": 0}
    assert item in data
    assert render_prompts(item, bundle.task("winograd"), []) == [
        "The city councilmen refused the demonstrators a permit because the city councilmen feared violence.",
        "The city councilmen refused the demonstrators a permit because the demonstrators feared violence."]
    # a few-shot schema block is the gold context, the delimiter and the continuation
    shot = render_prompts(item, bundle.task("winograd"), [data[0]])[1]
    assert shot.startswith(f"{data[0]['context_options'][data[0]['gold']]} {data[0]['continuation']}\n\n")


def test_language_modeling_prompts_strip_and_delimit(bundle):
    lam = {"context": "I don't care about", "continuation": "signs"}
    assert render_prompts(lam, bundle.task("lambada_openai"), []) == ["I don't care about", "I don't care about signs"]
    jeo = bundle.task("jeopardy")
    data = load_task_data(bundle, jeo)
    # the one real row whose context ends in spaces: trimmed, so the delimiter follows the text directly
    idx = next(i for i, r in enumerate(data) if r["context"] != r["context"].strip())
    without, with_ = render_prompts(data[idx], jeo, [])
    assert without == data[idx]["context"].strip() + "\nAnswer:"
    assert with_ == data[idx]["context"].strip() + "\nAnswer: " + data[idx]["continuation"]


def test_jeopardy_categories_few_shot_from_the_whole_task(bundle):
    """Each context carries its "CATEGORY: " tag; few-shot examples come from every category (one
    pool, as the reference that produced the GPT-2 numbers) and never include the item."""
    jeo = bundle.task("jeopardy")
    data = load_task_data(bundle, jeo)
    for r in data[:50]:
        assert r["context"].split(":")[0] == r["category"].replace("_", " ").upper()
    idx = 7
    shots = [data[i] for i in fewshot_indices(len(data), idx, jeo.num_fewshot)]
    assert len(shots) == 10 and data[idx] not in shots
    assert len({s["category"] for s in shots}) > 1
    without, with_ = render_prompts(data[idx], jeo, shots)
    blocks = with_.split("\n\n")
    assert len(blocks) == 11
    for block, shot in zip(blocks, shots):
        assert block == f"{shot['context'].strip()}\nAnswer: {shot['continuation']}"
        assert block.startswith(shot["category"].replace("_", " ").upper() + ": ")
    assert blocks[-1] == f"{data[idx]['context'].strip()}\nAnswer: {data[idx]['continuation']}"
    assert with_.startswith(without) and without.endswith("\nAnswer:")


# ---------------------------------------------------------------------------------------------- token spans


def test_common_length():
    assert common_length([[1, 2, 3], [1, 2, 4], [1, 2]], "left") == 2
    assert common_length([[1, 2, 3], [9, 2, 3]], "right") == 2
    assert common_length([[5, 6], [5, 6]], "left") == 2


def test_token_spans_per_task_type(bundle, tok):
    bos = tok.bos_token_id
    for label in ("arc_easy", "winograd", "lambada_openai", "jeopardy"):
        task = bundle.task(label)
        data = load_task_data(bundle, task, max_per_task=40)
        for ex, idx in zip(build_examples(data, task, tok, list(range(40))), range(40)):
            item = data[idx]
            assert all(s[0] == bos for s in ex.seqs)
            if task.task_type == "multiple_choice":
                start = ex.starts[0]
                assert len(set(ex.starts)) == 1 and ex.ends == [len(s) for s in ex.seqs]
                assert len({tuple(s[:start]) for s in ex.seqs}) == 1          # shared context
                assert len({s[start] if start < len(s) else None for s in ex.seqs}) > 1  # maximal
                for s, choice in zip(ex.seqs, item["choices"]):
                    assert choice.endswith(tok.decode(s[start:]).lstrip()) or tok.decode(s[start:]).endswith(choice)
            elif task.task_type == "schema":
                suffix = {tuple(s[st:]) for s, st in zip(ex.seqs, ex.starts)}
                assert len(suffix) == 1                                       # the shared continuation
                assert len({s[st - 1] for s, st in zip(ex.seqs, ex.starts)}) > 1
                assert tok.decode(list(suffix.pop())).endswith(item["continuation"])
            else:
                (seq,), (s,), (e,) = ex.seqs, ex.starts, ex.ends
                without = tok.encode(render_prompts(item, task, [data[i] for i in fewshot_indices(
                    len(data), idx, task.num_fewshot)])[0], prepend=bos)
                assert seq[:s] == without and e == len(seq)
                assert tok.decode(seq[s:]).strip() == item["continuation"].strip()


def test_language_modeling_prefix_violation_is_an_error():
    with pytest.raises(ValueError, match="prefix"):
        spans_for("language_modeling", [[0, 5, 6], [0, 5, 7, 8]])


def test_crop_to_max_seq_len_keeps_the_scored_tokens(bundle, tok):
    task = bundle.task("arc_easy")
    data = load_task_data(bundle, task, max_per_task=20)
    full = build_examples(data, task, tok, [3])[0]
    limit = max(full.ends) - 5
    cut = build_examples(data, task, tok, [3], max_seq_len=limit)[0]
    for s, c, st, cst, e, ce in zip(full.seqs, cut.seqs, full.starts, cut.starts, full.ends, cut.ends):
        assert len(c) <= limit and c == s[-limit:]
        assert c[cst:ce] == s[st:e]
    with pytest.raises(ValueError, match="longer than"):
        build_examples(data, task, tok, [3], max_seq_len=2)


# ---------------------------------------------------------------------------------------------- metric


def test_centered_formula():
    assert centered(0.25, 25) == 0.0 and centered(1.0, 25) == 1.0 and centered(0.3, 0) == 0.3
    # GPT-2 124M on boolq: 1806 of 3270 right (the CSV rounds the accuracy to 0.552294)
    assert centered(1806 / 3270, 62) == pytest.approx(-0.178175, abs=1e-6)
    assert centered(0.5, 50) == 0.0 and centered(0.0, 50) == -1.0


@pytest.mark.parametrize("name,core", [("openai-community-gpt2.csv", 0.113891),
                                       ("openai-community-gpt2-xl.csv", 0.256525)])
def test_gpt2_core_recomputed_from_accuracies(bundle, shared_data, name, core):
    rows, stated = read_reference_csv(shared_data / "eval_bundle" / name)
    assert stated == core and len(rows) == 22
    base = {t.label: t.random_baseline for t in bundle.tasks}
    cents = {k: centered(acc, base[k]) for k, (acc, _) in rows.items()}
    for k, (_, cen) in rows.items():
        assert cents[k] == pytest.approx(cen, abs=2e-6), k
    assert sum(cents.values()) / 22 == pytest.approx(core, abs=1e-6)
    ref = GPT2_REFERENCE["GPT-2 124M" if name == "openai-community-gpt2.csv" else "GPT-2 1.5B"]
    assert ref == {k: acc for k, (acc, _) in rows.items()}


def _result(accs: dict[str, float], bundle, missing=(), max_per_task=-1) -> CoreResult:
    tasks = {}
    for t in bundle.tasks:
        if t.label in accs:
            tasks[t.label] = TaskResult(t.label, t.task_type, t.num_fewshot, 100, accs[t.label], t.random_baseline,
                                        centered(accs[t.label], t.random_baseline), 1.0)
    return CoreResult(tasks, list(missing), 22, max_per_task)


def test_table_and_labels(bundle):
    full = _result(GPT2_REFERENCE["GPT-2 124M"], bundle)
    assert full.label == "CORE" and full.complete and full.core == pytest.approx(0.113891, abs=1e-6)
    table = format_table(full)
    lines = table.splitlines()
    assert lines[0].split(",")[0].strip() == "Task" and "GPT-2 124M" in lines[0] and "GPT-2 1.5B" in lines[0]
    last = [c.strip() for c in lines[-1].split(",")]
    assert last[0] == "CORE" and float(last[2]) == pytest.approx(0.113891, abs=1e-6)
    assert float(last[3]) == pytest.approx(0.113891, abs=1e-6) and float(last[4]) == pytest.approx(0.256525, abs=1e-6)
    boolq = next(line for line in lines if line.startswith("boolq "))
    assert [c.strip() for c in boolq.split(",")][1:4] == ["0.552294", "-0.178174", "-0.178174"]

    partial = _result({k: v for k, v in GPT2_REFERENCE["GPT-2 1.5B"].items() if k not in MISSING}, bundle,
                      missing=sorted(MISSING), max_per_task=-1)
    assert partial.label == "CORE over 18/22 tasks" and not partial.complete
    last = [c.strip() for c in format_table(partial).splitlines()[-2].split(",")]
    assert last[0] == "CORE over 18/22 tasks"
    assert float(last[2]) == pytest.approx(float(last[4]), abs=1e-6)   # GPT-2 1.5B over the same 18 tasks
    md = format_table(partial, fmt="md")
    assert md.startswith("| Task | Accuracy | Centered | GPT-2 124M | GPT-2 1.5B |") and "Missing task files" in md
    assert _result({"copa": 0.5}, bundle, max_per_task=100).label == "CORE over 1/22 tasks (<= 100 examples/task)"
    d = partial.to_dict()
    assert d["n_tasks"] == 18 and d["missing"] == sorted(MISSING) and d["label"] == "CORE over 18/22 tasks"
    again = CoreResult.from_dict(json.loads(json.dumps(d)))
    assert again.core == pytest.approx(partial.core, abs=1e-6) and again.label == partial.label


def test_save_and_load(bundle, tmp_path):
    res = _result({"copa": 0.7, "arc_easy": 0.5}, bundle, missing=sorted(MISSING))
    paths = res.save(tmp_path / "core")
    assert sorted(p.name for p in (tmp_path / "core").iterdir()) == ["core.csv", "core.json", "core.md"]
    assert paths["csv"].read_text() == format_table(res) and paths["md"].read_text() == format_table(res, fmt="md")
    back = CoreResult.load(tmp_path / "core")
    assert back.label == "CORE over 2/22 tasks" and back.core == pytest.approx(res.core, abs=1e-6)
    assert back.tasks["copa"].centered == pytest.approx(0.4) and back.missing == sorted(MISSING)


# ---------------------------------------------------------------------------------------------- scoring


class PlantedModel(torch.nn.Module):
    """Knows the gold token sequences: wherever the input so far is a prefix of one of them it puts a
    large logit on that sequence's next token, elsewhere all logits are 0 (uniform)."""

    def __init__(self, gold_seqs, vocab_size):
        super().__init__()
        self.vocab_size, self.trie = vocab_size, {}
        for seq in gold_seqs:
            node = self.trie
            for t in seq:
                node = node.setdefault(t, {})

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b, row in enumerate(idx.tolist()):
            node = self.trie
            for t, tokid in enumerate(row):
                node = node.get(tokid)
                if not node:
                    break
                nxt = next(iter(node)) if len(node) == 1 else None
                if nxt is not None:
                    logits[b, t, nxt] = 30.0
        return logits


def _gold_sequences(bundle, tok, labels, n):
    seqs = []
    for label in labels:
        task = bundle.task(label)
        data = load_task_data(bundle, task, n)
        for idx, item in enumerate(data):
            fewshot = [data[i] for i in fewshot_indices(len(data), idx, task.num_fewshot)]
            prompts = render_prompts(item, task, fewshot)
            gold = prompts[-1] if task.task_type == "language_modeling" else prompts[item["gold"]]
            seqs.append(tok.encode(gold, prepend=tok.bos_token_id))
    return seqs


PLANT_TASKS = ["copa", "arc_easy", "commonsense_qa", "winograd", "winogrande", "lambada_openai", "jeopardy",
               "bigbench_operators"]


def test_planted_gold_model_scores_one(bundle, tok, shared_data):
    n = 11   # the fewest rows a 10-shot task can have
    model = PlantedModel(_gold_sequences(bundle, tok, PLANT_TASKS, n), tok.vocab_size)
    seen = []
    res = evaluate_core(model, tok, shared_data / "eval_bundle", device="cpu", max_per_task=n, tasks=PLANT_TASKS,
                        batch_size=5, max_batch_tokens=4000, on_progress=lambda i, k, info: seen.append((i, k)))
    assert list(res.tasks) == [t.label for t in bundle.tasks if t.label in PLANT_TASKS]   # core.yaml order
    for label, t in res.tasks.items():
        assert t.accuracy == 1.0 and t.n_examples == n, label
    assert res.core == pytest.approx(1.0) and res.label == f"CORE over {len(PLANT_TASKS)}/22 tasks (<= 11 examples/task)"
    assert seen == [(i, len(PLANT_TASKS)) for i in range(1, len(PLANT_TASKS) + 1)]


class UniformModel(torch.nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab_size)


def test_lowest_mean_loss_wins_first_on_ties_and_lm_needs_every_token(bundle, tok):
    ex = Example(seqs=[[0, 1], [0, 2], [0, 3]], starts=[1, 1, 1], ends=[2, 2, 2], gold=1)
    assert judge("multiple_choice", ex, [2.0, 1.0, 3.0], [False] * 3)
    assert not judge("multiple_choice", ex, [1.0, 1.0, 1.0], [False] * 3)       # a tie goes to choice 0
    assert judge("schema", Example(ex.seqs, ex.starts, ex.ends, gold=0), [1.0, 1.0, 1.0], [False] * 3)
    assert judge("language_modeling", ex, [9.0], [True]) and not judge("language_modeling", ex, [0.0], [False])
    lm = bundle.task("bigbench_operators")   # uniform logits: argmax is token 0 everywhere, never the answer
    assert evaluate_task(UniformModel(tok.vocab_size), tok, load_task_data(bundle, lm, 20), lm, device="cpu") == 0.0


class BigramModel(torch.nn.Module):
    """A deterministic causal model (logits from the current and previous token): its scores cannot
    depend on how rows are batched or padded, so any difference is a bookkeeping bug."""

    def __init__(self, vocab_size, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.cur = torch.randn(vocab_size, vocab_size, generator=g)
        self.prev = torch.randn(vocab_size, vocab_size, generator=g)

    def forward(self, idx):
        prev = torch.cat([idx[:, :1], idx[:, :-1]], dim=1)
        return self.cur[idx] + self.prev[prev]


def test_batching_does_not_change_results(bundle, tok):
    model = BigramModel(tok.vocab_size)
    for label in ("arc_easy", "winogrande", "bigbench_operators"):
        task = bundle.task(label)
        data = load_task_data(bundle, task, 16)
        accs = {evaluate_task(model, tok, data, task, device="cpu", batch_size=bs, max_batch_tokens=mbt)
                for bs, mbt in ((1, 10**9), (5, 10**9), (64, 2000))}
        assert len(accs) == 1, (label, accs)


def test_world_size_without_process_group_is_refused(shared_data, tok):
    with pytest.raises(ValueError, match="not initialised"):
        evaluate_core(UniformModel(tok.vocab_size), tok, shared_data / "eval_bundle", device="cpu", rank=0,
                      world_size=2, tasks=["copa"])


def test_unknown_or_missing_tasks_are_named(shared_data, tok):
    with pytest.raises(ValueError, match="unknown CORE task"):
        evaluate_core(UniformModel(tok.vocab_size), tok, shared_data / "eval_bundle", device="cpu", tasks=["nope"])
    with pytest.raises(BundleError, match="no data file"):
        evaluate_core(UniformModel(tok.vocab_size), tok, shared_data / "eval_bundle", device="cpu", tasks=["squad"])


@pytest.fixture(scope="module")
def tiny_gpt(tok):
    """A real 2-layer GPT (GQA, sliding windows of 256 at seq 1024). The reference init makes every
    choice look alike (zero output projections, lm_head ~0): perturb it so that they differ."""
    from core.gpt import GPT, GPTConfig
    model = GPT(GPTConfig(sequence_len=1024, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1,
                          n_embd=64)).init_weights(seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.lm_head.weight.normal_(0.0, 0.5, generator=g)
    return model.eval()


def test_kv_prefix_sharing_matches_the_padded_forward(bundle, tok, tiny_gpt):
    cpu = torch.device("cpu")
    for label, n in (("arc_easy", 4), ("winograd", 8), ("lambada_openai", 8), ("jeopardy", 4)):
        task = bundle.task(label)
        data = load_task_data(bundle, task, 11)
        examples = build_examples(data, task, tok, list(range(n)))
        padded = Scorer(tiny_gpt, cpu, tok.bos_token_id, 8, 4096, share_prefix_min=1, use_kv=False).score(examples)
        shared = Scorer(tiny_gpt, cpu, tok.bos_token_id, 8, 4096, share_prefix_min=1, use_kv=True).score(examples)
        for lp, ls in zip(padded[0], shared[0]):
            assert lp == pytest.approx(ls, abs=1e-4), label
        assert padded[1] == shared[1], label
        assert len({tuple(lo) for lo in padded[0]}) > 1, "the perturbed model must tell the examples apart"


@pytest.mark.slow
def test_evaluate_core_with_a_real_gpt(shared_data, tok, tiny_gpt):
    kw = dict(device="cpu", max_per_task=11, tasks=["copa", "arc_easy", "bigbench_operators"])
    auto = evaluate_core(tiny_gpt, tok, shared_data / "eval_bundle", **kw)
    plain = evaluate_core(tiny_gpt, tok, shared_data / "eval_bundle", share_prefix=False, **kw)
    assert auto.to_dict()["tasks"].keys() == plain.to_dict()["tasks"].keys()
    for label in auto.tasks:
        assert auto.tasks[label].accuracy == plain.tasks[label].accuracy
        assert 0.0 <= auto.tasks[label].accuracy <= 1.0
    assert not tiny_gpt.training
    with pytest.raises(ValueError, match="needs a core.gpt.GPT"):
        evaluate_core(UniformModel(tok.vocab_size), tok, shared_data / "eval_bundle", share_prefix=True, **kw)


def _rank_worker(rank, world, init_file, bundle_dir, out_dir, vocab_texts):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tok = train_tokenizer(vocab_texts)
        res = evaluate_core(BigramModel(tok.vocab_size), tok, bundle_dir, device="cpu", max_per_task=25,
                            tasks=["copa", "winograd", "bigbench_operators"], rank=rank, world_size=world)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res.to_dict(), f)
    finally:
        dist.destroy_process_group()
    # The results are on disk: leave without C++ static destructors. A spawned worker that trained
    # a tokenizer and ran gloo sometimes aborted at interpreter exit ("terminate called without an
    # active exception", SIGABRT: seen twice in 6 full runs here), failing a test whose work was done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.slow
def test_two_ranks_give_the_single_process_result(tmp_path, shared_data, corpus_files):
    import torch.multiprocessing as mp
    texts = corpus_texts(corpus_files)
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(shared_data / "eval_bundle"), str(tmp_path), texts),
             nprocs=2, join=True)
    tok = train_tokenizer(texts)
    single = evaluate_core(BigramModel(tok.vocab_size), tok, shared_data / "eval_bundle", device="cpu",
                           max_per_task=25, tasks=["copa", "winograd", "bigbench_operators"]).to_dict()
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for label, t in single["tasks"].items():
            assert got["tasks"][label]["accuracy"] == t["accuracy"], (rank, label)
        assert got["core"] == single["core"]
