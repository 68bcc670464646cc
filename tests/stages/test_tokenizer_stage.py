"""tokenizer stage: trained on real shards, saved, evaluated; cached through the store like any stage."""
from __future__ import annotations

import numpy as np
import pytest

from artifacts import open_store
from core.tokenizer import SPECIAL_TOKENS, Tokenizer
from stages import data_shards
from stages import tokenizer as stage
from stages.base import ConfigError, Input
from pipeline.execute import execute


@pytest.fixture(scope="module")
def store_with_data(tmp_path_factory, shared_data):
    """A local store holding the shared corpus as a data_shards artifact (7 train shards + val)."""
    store = open_store(str(tmp_path_factory.mktemp("store")), index=False)
    data = execute("data_shards", data_shards.Config(source=str(shared_data / "corpus")), {}, store)
    return store, data


def test_run_trains_saves_and_evaluates(store_with_data, tmp_path):
    store, data = store_with_data
    cfg = stage.Config(vocab_size=2048, max_chars=3_000_000)
    m = stage.run(cfg, {"data": Input(data.ref, store.materialize(data.ref), data)}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token_bytes.npy", "tokenizer.json"]
    tok = Tokenizer.from_directory(tmp_path)
    assert tok.vocab_size == m["vocab_size"] == 2048 and tok.encode_special(SPECIAL_TOKENS[-1]) == 2047
    assert 3_000_000 < m["train_chars"] <= 3_000_000 + 10_000
    assert m["train_chars_per_sec"] > 0 and m["encode_mb_per_sec"] > 0
    comp = m["compression"]
    assert set(comp) == {"train", "val", "code"}
    assert all(2.0 < c["ratio"] < 8.0 for c in comp.values())  # ~4 bytes/token for English at this vocab
    assert comp["train"]["ratio"] > comp["code"]["ratio"] * 0.8
    tb = np.load(tmp_path / "token_bytes.npy")
    assert m["token_bytes"]["min"] == 1 and m["token_bytes"]["max"] == int(tb.max())


@pytest.mark.slow
def test_through_the_store_runtime_fields_do_not_change_the_artifact(store_with_data):
    store, data = store_with_data
    events = []
    a = execute("tokenizer", stage.Config(vocab_size=1024, max_chars=1_000_000, threads=1), {"data": data.ref},
                store, on_event=lambda kind, info: events.append(kind))
    b = execute("tokenizer", stage.Config(vocab_size=1024, max_chars=1_000_000, threads=2), {"data": data.ref},
                store, on_event=lambda kind, info: events.append(kind))
    assert a.ref == b.ref and events == ["running", "committed", "cached"]
    assert a.label == "v1024" and {f.path for f in a.files} == {"tokenizer.json", "token_bytes.npy"}
    assert a.metrics["compression"]["val"]["tokens"] > 0
    c = execute("tokenizer", stage.Config(vocab_size=1024, max_chars=500_000), {"data": data.ref}, store)
    assert c.ref != a.ref
    tok = Tokenizer.from_directory(store.materialize(a.ref))
    assert tok.vocab_size == 1024


def test_config_errors():
    with pytest.raises(ConfigError, match="vocab_size"):
        stage.Config(vocab_size=265)
    with pytest.raises(ConfigError, match="max_chars"):
        stage.Config(max_chars=0)
    assert stage.Config().identity_dict() == {"vocab_size": 32768, "max_chars": 2_000_000_000, "doc_cap": 10_000}
    assert stage.Config().label() == "v32768"
