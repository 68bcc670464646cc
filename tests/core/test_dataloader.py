"""core/dataloader.py: the reference's best-fit packing, DDP dealing, and exact resume."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.dataloader import LoaderStateError, PackingLoader
from tests._tok import corpus_texts, small_tokenizer


@pytest.fixture(scope="module")
def tok(shared_data):
    return small_tokenizer(str(shared_data / "corpus"), 1024)


def write_shards(tmp_path, texts, n_files, rows_per_file, row_group):
    """Small shards of real corpus documents (cut to 1,500 chars so a pass takes few batches)."""
    files = []
    for i in range(n_files):
        docs = [t[:1500] for t in texts[i * rows_per_file:(i + 1) * rows_per_file]]
        f = tmp_path / f"shard_{i:05d}.parquet"
        pq.write_table(pa.table({"text": docs}), f, row_group_size=row_group)
        files.append(f)
    return files


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_data):
    # 3 files x 90 docs in row groups of 40 (40, 40, 10): 9 row groups, a pass of 270 documents
    return write_shards(tmp_path_factory.mktemp("shards"), corpus_texts(shared_data / "corpus"), 3, 90, 40)


def reference_batches(files, tok, B, T, n, buffer_size, chunk=128):
    """The reference algorithm written out naively (one rank): linear scans over a list buffer."""
    def docs():
        while True:
            for f in files:
                pf = pq.ParquetFile(f)
                for rg in range(pf.num_row_groups):
                    texts = pf.read_row_group(rg).column("text").to_pylist()
                    for i in range(0, len(texts), chunk):
                        yield texts[i:i + chunk]
    stream, buf, out = docs(), [], []
    for _ in range(n):
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buf) < buffer_size:
                    buf += tok.encode(next(stream), prepend=tok.bos_token_id)
                remaining = T + 1 - len(row)
                best, best_len = -1, 0
                for i, d in enumerate(buf):
                    if best_len < len(d) <= remaining:
                        best, best_len = i, len(d)
                if best >= 0:
                    row += buf.pop(best)
                else:
                    shortest = min(range(len(buf)), key=lambda i: len(buf[i]))
                    row += buf.pop(shortest)[:remaining]
            rows.append(row)
        t = torch.tensor(rows)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def take(loader, n):
    got = []
    for _ in range(n):
        got.append(next(loader))
    return got


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


@pytest.mark.parametrize("B,T,buffer_size,n", [(2, 64, 20, 140), (3, 300, 50, 100), (1, 2000, 30, 90)])
def test_matches_the_reference_algorithm(shards, tok, B, T, buffer_size, n):
    # n batches cross the end of the pass (270 docs) into the next epoch
    ours = PackingLoader(shards, tok, B, T, buffer_size=buffer_size, tokenizer_batch_size=16)
    got = take(ours, n)
    assert ours.stats()["epoch"] == 2
    assert same(got, reference_batches(shards, tok, B, T, n, buffer_size, chunk=16))
    x, y = got[0]
    assert x.dtype == torch.int64 and x.shape == (B, T) and torch.equal(x[:, 1:], y[:, :-1])
    assert all((x[:, 0] == tok.bos_token_id).all() for x, _ in got)
    s = ours.stats()
    assert s["utilisation"] == 1.0 and 0 < s["cropped_frac"] < 1 and s["rows"] == n * B
    ours.close()


@pytest.mark.parametrize("world_size", [1, 2])
def test_exact_resume_mid_shard_and_across_epochs(shards, tok, world_size):
    B, T = 2, 96  # rows of 97 tokens take ~one document each: N batches reach into epoch 2
    N = 160 // world_size + 20
    for rank in range(world_size):
        kw = dict(rank=rank, world_size=world_size, buffer_size=12, tokenizer_batch_size=8)
        loader = PackingLoader(shards, tok, B, T, **kw)
        states, batches = [], []
        for _ in range(N):
            states.append(json.loads(json.dumps(loader.state_dict())))  # must survive JSON
            batches.append(next(loader))
        loader.close()
        epochs = [s["epoch"] for s in states]
        assert epochs[0] == 1 and epochs[-1] >= 2
        crossing = epochs.index(2)
        mid_unit = next(i for i, s in enumerate(states) if i > 3 and s["doc"] != 0)  # inside a row group
        for k in sorted({0, 5, mid_unit, crossing - 1, crossing, crossing + 1, N - 6}):
            resumed = PackingLoader(shards, tok, B, T, state=states[k], **kw)
            assert same(take(resumed, 5), batches[k:k + 5]), f"rank {rank}: batches differ after resuming at {k}"
            assert resumed.stats()["rows"] == (k + 5) * B  # statistics carry over too
            resumed.close()


def test_ranks_take_disjoint_row_groups(shards, tok):
    r0 = PackingLoader(shards, tok, 2, 64, rank=0, world_size=2, buffer_size=10)
    r1 = PackingLoader(shards, tok, 2, 64, rank=1, world_size=2, buffer_size=10)
    assert r0.unit_kind == "row_group" and len(r0.units) == 5 and len(r1.units) == 4
    assert not set(r0.units) & set(r1.units)
    assert not torch.equal(next(r0)[0], next(r1)[0])
    r0.close(), r1.close()


def test_fewer_row_groups_than_ranks_deals_chunks(tmp_path, shared_data, tok):
    (f,) = write_shards(tmp_path, corpus_texts(shared_data / "corpus"), 1, 100, 1024)  # a single row group
    loaders = [PackingLoader([f], tok, 1, 64, rank=r, world_size=3, tokenizer_batch_size=16, buffer_size=10)
               for r in range(3)]
    assert [l.unit_kind for l in loaders] == ["chunk"] * 3
    assert sorted(u[2] for l in loaders for u in l.units) == list(range(0, 100, 16))
    assert all(next(l)[0].shape == (1, 64) for l in loaders)
    for l in loaders:
        l.close()


def test_finite_validation_loader(shards, tok):
    full = list(PackingLoader(shards, tok, 2, 128, infinite=False, buffer_size=10))
    assert 5 < len(full) < 200
    again = PackingLoader(shards, tok, 2, 128, infinite=False, buffer_size=10)
    assert same(list(again), full) and again.stats()["epoch"] == 1
    capped = PackingLoader(shards, tok, 2, 128, infinite=False, buffer_size=10, max_batches=3)
    assert same(list(capped), full[:3])


def test_state_from_other_data_or_ranks_is_refused(shards, tok, shared_data):
    loader = PackingLoader(shards, tok, 2, 64, buffer_size=10)
    take(loader, 3)
    state = loader.state_dict()
    loader.close()
    with pytest.raises(LoaderStateError, match="world_size"):
        PackingLoader(shards, tok, 2, 64, rank=0, world_size=2, state=state)
    with pytest.raises(LoaderStateError, match="files"):
        PackingLoader(shards[:2], tok, 2, 64, state=state)
    other = small_tokenizer(str(shared_data / "corpus"), 512)
    resumed = PackingLoader(shards, other, 2, 64, state=state)
    with pytest.raises(LoaderStateError, match="tokenizer or the data changed"):
        next(resumed)


def test_bad_arguments(shards, tok, tmp_path):
    with pytest.raises(ValueError, match="rank"):
        PackingLoader(shards, tok, 2, 64, rank=2, world_size=2)
    with pytest.raises(ValueError, match="at least one"):
        PackingLoader([], tok, 2, 64)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"content": ["x"]}), bad)
    with pytest.raises(ValueError, match="no 'text' column"):
        PackingLoader([bad], tok, 2, 64)
