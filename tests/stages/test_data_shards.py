"""data_shards stage: real shards over HTTP (faults included), S3, local folders, re-sharding, chitchat."""
from __future__ import annotations

import gzip
import os
import json
import shutil

import pyarrow.parquet as pq
import pytest

from core.layouts import shard_files
from stages import data_shards as stage
from stages.base import ConfigError
from stagekit.fetch import FetchError
from tests.stages._http_server import FileServer

FAST = dict(backoff=0.0, timeout=10, workers=3)


@pytest.fixture(scope="module")
def blobs(corpus_files):
    return {f"/data/{f.name}": f.read_bytes() for f in corpus_files}


@pytest.fixture
def server(blobs):
    with FileServer(blobs) as srv:
        yield srv


def _config(**fields) -> stage.Config:
    """A data_shards config as the plan builder makes it: validated, then resolved (listed, digested)."""
    return stage.Config(**fields).resolve()


def texts(files) -> list[str]:
    return [t for f in files for t in pq.read_table(f).column("text").to_pylist()]


def pattern_cfg(srv, **kw):
    return _config(source=srv.base + "/data/shard_{i:05d}.parquet", val_shard=7, **{"train_shards": 3, **FAST, **kw})


def test_http_pattern_downloads_byte_identical_shards(server, blobs, corpus_files, tmp_path):
    cfg = pattern_cfg(server)
    assert cfg.label() == "http_3" and cfg.identity_dict()["val_docs"] == 0
    m = stage.run(cfg, {}, tmp_path)
    train, val = shard_files(tmp_path)
    assert [f.name for f in train] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert [f.name for f in val] == ["shard_00007.parquet"]
    for f in train + val:
        assert f.read_bytes() == blobs[f"/data/{f.name}"]
    # DuckDB statistics agree with pyarrow
    tr = texts(corpus_files[:3])
    assert m["train"]["docs"] == len(tr) and m["train"]["chars"] == sum(map(len, tr))
    assert m["val"]["docs"] == len(texts(corpus_files[7:]))
    assert m["train"]["doc_chars"]["min"] == min(map(len, tr)) and m["train"]["doc_chars"]["max"] == max(map(len, tr))
    assert m["train"]["doc_chars"]["p10"] < m["train"]["doc_chars"]["p50"] < m["train"]["doc_chars"]["p90"]
    assert m["download"]["fetched"] == 4 and m["mode"] == "direct"
    record = json.loads((tmp_path / stage.SOURCES_FILE).read_text())
    assert [r["from"] for r in record["files"]] == [server.url(f"/data/shard_0000{i}.parquet") for i in (0, 1, 2, 7)]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == \
        ["sources.json", "train/shard_00000.parquet", "train/shard_00001.parquet", "train/shard_00002.parquet",
         "val/shard_00007.parquet"]


def test_dropped_connection_resumes_and_failed_run_keeps_finished_shards(server, blobs, tmp_path):
    server.drop["/data/shard_00001.parquet"] = [250_000]
    server.status["/data/shard_00002.parquet"] = [404]  # the first attempt fails for good on this one
    cfg = pattern_cfg(server)
    with pytest.raises(FetchError, match=r"shard_00002\.parquet: HTTP 404"):
        stage.run(cfg, {}, tmp_path)
    assert [r for _, _, r in server.gets("/data/shard_00001.parquet")] == [None, "bytes=250000-"]
    server.requests.clear()
    m = stage.run(cfg, {}, tmp_path)  # the rerun (same work dir) fetches only what is missing
    assert [p for _, p, _ in server.gets()] == ["/data/shard_00002.parquet"]
    assert m["download"]["skipped"] == 3 and m["download"]["fetched"] == 1
    assert (tmp_path / "train" / "shard_00002.parquet").read_bytes() == blobs["/data/shard_00002.parquet"]


def test_corrupt_shard_fails_after_retries_and_nothing_is_committed(server, tmp_path):
    from artifacts import open_store
    from pipeline.execute import artifact_ref, execute

    server.corrupt["/data/shard_00001.parquet"] = 99
    store = open_store(str(tmp_path / "store"), index=False)
    cfg = pattern_cfg(server, retries=2)
    with pytest.raises(FetchError) as ei:
        execute("data_shards", cfg, {}, store)
    assert "shard_00001.parquet" in str(ei.value) and "corrupt" in str(ei.value) and "after 2 attempt(s)" in str(ei.value)
    assert len(server.gets("/data/shard_00001.parquet")) == 2
    ref = artifact_ref("data_shards", cfg, {})
    assert store.manifest(ref) is None
    server.corrupt.clear()
    m = execute("data_shards", cfg, {}, store)  # committed now, with the metrics
    assert m.metrics["train_shards"] == 3 and {f.path for f in m.files} >= {"train/shard_00001.parquet"}
    assert execute("data_shards", cfg, {}, store).fingerprint == m.fingerprint  # cache hit


def test_doc_filters_rewrite_shards(server, corpus_files, tmp_path):
    cfg = pattern_cfg(server, train_shards=2, min_doc_chars=3000)
    assert cfg.identity_dict() != pattern_cfg(server, train_shards=2).identity_dict()
    m = stage.run(cfg, {}, tmp_path)
    train, val = shard_files(tmp_path)
    kept = texts(train)
    assert kept == [t for t in texts(corpus_files[:2]) if len(t) >= 3000] and m["mode"] == "filter"
    assert m["docs_dropped"] > 0 and not (tmp_path / "raw").exists()
    assert all(len(t) >= 3000 for t in texts(val))


@pytest.mark.s3
def test_s3_pattern_and_listing(s3_bucket, blobs, corpus_files, tmp_path, monkeypatch):
    import boto3

    endpoint, bucket = s3_bucket
    monkeypatch.setenv("NANORUN_S3_ENDPOINT_URL", endpoint)
    client = boto3.client("s3", endpoint_url=endpoint)
    for p, data in blobs.items():
        client.put_object(Bucket=bucket, Key="corpus/" + p.rsplit("/", 1)[1], Body=data)
    cfg = _config(source=f"s3://{bucket}/corpus/shard_{{i:05d}}.parquet", train_shards=2, val_shard=7, **FAST)
    stage.run(cfg, {}, tmp_path / "a")
    train, val = shard_files(tmp_path / "a")
    assert [f.read_bytes() for f in train + val] == [blobs[f"/data/shard_0000{i}.parquet"] for i in (0, 1, 7)]
    listed = _config(source=f"s3://{bucket}/corpus", train_shards=0, **FAST)  # all files, the last is val
    assert listed.train_shards == 7 and listed.content_digest and listed.label().startswith("s3_")
    m = stage.run(listed, {}, tmp_path / "b")
    train, val = shard_files(tmp_path / "b")
    assert len(train) == 7 and val[0].read_bytes() == corpus_files[7].read_bytes() and m["download"]["fetched"] == 8


def local_copy(files, tmp_path):
    """A writable local source folder holding copies of `files`."""
    src = tmp_path / "corpus"
    src.mkdir()
    for f in files:
        shutil.copy(f, src / f.name)
        (src / f.name).chmod(0o644)
    return src


def test_local_folder_is_copied_and_identified_by_content(corpus_files, tmp_path):
    src = local_copy(corpus_files[:4], tmp_path)
    other = tmp_path / "copy"
    shutil.copytree(src, other)
    a, b = _config(source=str(src)), _config(source=str(other))
    assert a.source == "local" and a.local_path == str(src) and a.train_shards == 3  # at most 8: all 3
    assert a.identity_dict() == b.identity_dict() and a.label() == "local_3"  # same files, same artifact
    m = stage.run(a, {}, tmp_path / "out")
    train, val = shard_files(tmp_path / "out")
    assert [f.read_bytes() for f in train + val] == [f.read_bytes() for f in corpus_files[:4]]
    assert m["download"]["files"] == 0 and m["mode"] == "direct"
    # a changed file is a new artifact; a config holding the old digest is refused
    (other / "shard_00001.parquet").write_bytes(corpus_files[5].read_bytes())
    changed = _config(source=str(other))
    assert changed.content_digest != a.content_digest
    stale = _config(source=str(other), content_digest=a.content_digest)  # taken as given: no listing
    with pytest.raises(RuntimeError, match="changed since the config was built"):
        stage.run(stale, {}, tmp_path / "out3")
    with pytest.raises(RuntimeError, match="changed since the config was built"):
        stage.run(b, {}, tmp_path / "out2")
    glob_cfg = _config(source=str(src / "shard_0000[0-2].parquet"))
    assert glob_cfg.train_shards == 2 and glob_cfg.content_digest != a.content_digest


def test_jsonl_and_txt_are_resharded(corpus_files, tmp_path):
    docs = texts(corpus_files[:1])
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs[:100])))
    with gzip.open(src / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(t) for t in docs[100:200]) + "\n")
    (src / "c.txt").write_text(docs[200])
    (src / "d.txt").write_text(docs[201])
    (src / "notes.md").write_text("ignored: not a text-data extension")
    cfg = _config(source=str(src), val_docs=30, shard_chars=100_000, min_doc_chars=50, train_shards=0)
    assert cfg.label() == "local" and cfg.val_docs == 30
    m = stage.run(cfg, {}, tmp_path / "out")
    train, val = shard_files(tmp_path / "out")
    expected = [t for t in docs[:202] if len(t) >= 50]
    assert texts(train) + texts(val) == expected and len(texts(val)) == 30
    assert len(train) > 2 and val[0].name == f"shard_{len(train):05d}.parquet"
    assert all(sum(map(len, texts([f]))) >= 100_000 for f in train[:-1])
    assert m["mode"] == "reshard" and m["docs_read"] == 202 and m["docs_dropped"] == 202 - len(expected)
    capped = _config(source=str(src), val_docs=30, shard_chars=100_000, min_doc_chars=50, train_shards=2)
    stage.run(capped, {}, tmp_path / "capped")
    train2, val2 = shard_files(tmp_path / "capped")
    assert len(train2) == 2 and texts(val2) == texts(val)  # validation = the source's last documents
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "fine"}\n{"body": 1}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: expected a string"):
        stage.run(_config(source=str(bad), val_docs=1), {}, tmp_path / "bad_out")


def test_chitchat_conversations_become_documents(tmp_path):
    cfg = _config(source="chitchat")
    assert cfg.label() == "chitchat" and cfg.content_digest
    m = stage.run(cfg, {}, tmp_path)
    train, val = shard_files(tmp_path)
    assert m["train"]["docs"] == 7168 - 1024 and m["val"]["docs"] == 1024
    pf = pq.ParquetFile(train[0])
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)] == [1024] * 6
    first = texts(train)[0]
    assert first.startswith("A: Hello") and "\nB: " in first


def test_config_errors():
    with pytest.raises(ConfigError, match="pattern with"):
        _config(source="https://example.com/data.parquet")
    with pytest.raises(ConfigError, match="needs the validation shard"):
        _config(source="https://example.com/shard_{i:05d}.parquet")
    with pytest.raises(ConfigError, match="also a train shard"):
        _config(source="climbmix", shard_indices=[1, 6542])
    with pytest.raises(ConfigError, match="no .parquet"):
        _config(source="/no/such/dir")
    with pytest.raises(ConfigError, match="train_shards must be >= 1"):
        _config(source="fineweb-edu", train_shards=0)
    with pytest.raises(ConfigError, match="unknown field"):
        stage.Config.from_dict({"shards": 3})
    c = stage.Config.from_dict({"source": "fineweb-edu", "shard_indices": [5, 2]})
    assert (c.val_shard, c.train_shards, c.shard_indices, c.label()) == (1822, 2, (2, 5), "fineweb_edu_2")
    assert _config().identity_dict() == {"source": "climbmix", "train_shards": 8, "shard_indices": (),
                                              "val_shard": 6542, "min_doc_chars": 0, "max_doc_chars": 0,
                                              "val_docs": 0, "shard_chars": 0, "content_digest": ""}


# ---- bad source files are refused up front, naming the source ------------------------------------
def _damage(kind: str, good: bytes) -> bytes:
    import io

    import pyarrow as pa

    if kind == "zero-byte":
        return b""
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "not parquet":
        return b"PAR1 this is not a parquet file at all"
    buf = io.BytesIO()
    table = pa.table({"body": ["a", "b"]}) if kind == "wrong schema" else pa.table({"text": pa.array([], pa.string())})
    pq.write_table(table, buf)
    return buf.getvalue()


@pytest.mark.parametrize("kind, why", [("zero-byte", "0 bytes"), ("truncated", "magic bytes"),
                                       ("not parquet", "not usable"), ("wrong schema", "no string column 'text'"),
                                       ("no rows", "no rows")])
def test_a_bad_local_parquet_is_refused_before_any_work_naming_the_source(kind, why, corpus_files, tmp_path,
                                                                         capsys, nanorun_home):
    import cli.main as cli
    from tests.cli.test_cli import one_line_error

    src = local_copy(corpus_files[:3], tmp_path)
    bad = src / "shard_00001.parquet"
    bad.write_bytes(_damage(kind, bad.read_bytes()))
    with pytest.raises(ConfigError, match=why) as err:
        _config(source=str(src))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=why):      # a single file (re-sharded) too
        _config(source=str(bad))
    code = cli.main(["stage", "data_shards", "--set", f"source={src}"])   # no Prefect, no staging copy
    one_line_error(code, capsys.readouterr().err, f"data source {bad} is not usable", why)


def test_a_damaged_page_is_refused_by_run_before_anything_is_copied(corpus_files, tmp_path):
    src = local_copy(corpus_files[:3], tmp_path)
    bad = src / "shard_00002.parquet"
    data = bytearray(bad.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])   # same size, footer intact
    bad.write_bytes(bytes(data))
    cfg = _config(source=str(src))                  # footers are fine: the config builds
    with pytest.raises(ConfigError, match=f"data source {bad} is not usable: Corrupt"):
        stage.run(cfg, {}, tmp_path / "out")
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_source_file_is_refused_naming_it(corpus_files, tmp_path):
    src = local_copy(corpus_files[:3], tmp_path)
    (src / "shard_00000.parquet").chmod(0)
    with pytest.raises(ConfigError, match=f"data source {src / 'shard_00000.parquet'} is not usable"):
        _config(source=str(src))
