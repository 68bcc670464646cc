"""stagekit/fetch.py against a real HTTP server on loopback (with injected faults) and the test S3 server."""
from __future__ import annotations

import hashlib

import pyarrow.parquet as pq
import pytest

from stagekit.fetch import FetchError, fetch, fetch_many, list_s3
from tests.artifacts.fixtures import store  # noqa: F401 (fixture)
from tests.stages._http_server import FileServer

FAST = dict(backoff=0.0, timeout=10)


def parquet_ok(path):
    pq.read_table(path)


@pytest.fixture(scope="module")
def shards(corpus_files):
    return {f"/data/{f.name}": f.read_bytes() for f in corpus_files}


@pytest.fixture
def server(shards):
    with FileServer(shards) as srv:
        yield srv


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_full_download(server, shards, tmp_path):
    data = shards["/data/shard_00000.parquet"]
    r = fetch(server.url("/data/shard_00000.parquet"), tmp_path / "a.parquet", validate=parquet_ok, **FAST)
    assert (tmp_path / "a.parquet").read_bytes() == data
    assert (r.size, r.sha256, r.skipped, r.resumed_from, r.attempts) == (len(data), sha(data), False, 0, 1)
    assert r.downloaded == len(data) and not (tmp_path / "a.parquet.partial").exists()
    assert server.gets() == [("GET", "/data/shard_00000.parquet", None)]


def test_dropped_connection_resumes_with_range(server, shards, tmp_path):
    path = "/data/shard_00001.parquet"
    data = shards[path]
    server.drop[path] = [300_000, 200_000]  # two attempts die mid-file
    r = fetch(server.url(path), tmp_path / "b.parquet", validate=parquet_ok, retries=4, **FAST)
    assert (tmp_path / "b.parquet").read_bytes() == data and r.attempts == 3 and r.sha256 == sha(data)
    assert [rng for _, _, rng in server.gets(path)] == [None, "bytes=300000-", "bytes=500000-"]


def test_partial_file_from_an_earlier_run_is_continued(server, shards, tmp_path):
    path = "/data/shard_00002.parquet"
    data = shards[path]
    (tmp_path / "c.parquet.partial").write_bytes(data[:12345])
    r = fetch(server.url(path), tmp_path / "c.parquet", validate=parquet_ok, **FAST)
    assert (tmp_path / "c.parquet").read_bytes() == data
    assert r.resumed_from == 12345 and r.downloaded == len(data) - 12345
    assert [rng for _, _, rng in server.gets(path)] == ["bytes=12345-"]


def test_corrupt_file_is_retried_then_fails_naming_it(server, tmp_path):
    path = "/data/shard_00003.parquet"
    server.corrupt[path] = 99
    with pytest.raises(FetchError) as ei:
        fetch(server.url(path), tmp_path / "shard_00003.parquet", validate=parquet_ok, retries=3, **FAST)
    msg = str(ei.value)
    assert "shard_00003.parquet" in msg and "after 3 attempt(s)" in msg and "corrupt" in msg
    assert len(server.gets(path)) == 3
    assert not list(tmp_path.iterdir())  # neither the file nor a partial is left behind


def test_corrupt_once_then_good_restarts_from_zero(server, shards, tmp_path):
    path = "/data/shard_00003.parquet"
    server.corrupt[path] = 1
    fetch(server.url(path), tmp_path / "d.parquet", validate=parquet_ok, retries=3, **FAST)
    assert (tmp_path / "d.parquet").read_bytes() == shards[path]
    assert [rng for _, _, rng in server.gets(path)] == [None, None]


def test_checksums_expected_and_from_hugging_face_header(server, shards, tmp_path):
    path = "/data/shard_00004.parquet"
    with pytest.raises(FetchError, match="sha256 .* does not match"):
        fetch(server.url(path), tmp_path / "e.parquet", sha256="0" * 64, retries=1, **FAST)
    server.headers[path] = {"X-Linked-ETag": '"' + "1" * 64 + '"'}  # HF's LFS sha256 claim, wrong here
    with pytest.raises(FetchError, match="does not match"):
        fetch(server.url(path), tmp_path / "e.parquet", retries=2, **FAST)
    server.headers[path] = {"X-Linked-ETag": f'"{sha(shards[path])}"'}
    assert fetch(server.url(path), tmp_path / "e.parquet", retries=1, **FAST).sha256 == sha(shards[path])


def test_404_fails_at_once_and_5xx_is_retried(server, shards, tmp_path):
    with pytest.raises(FetchError, match=r"nope\.parquet: HTTP 404 .*no such file"):
        fetch(server.url("/data/nope.parquet"), tmp_path / "nope.parquet", retries=5, **FAST)
    assert len(server.gets("/data/nope.parquet")) == 1
    path = "/data/shard_00005.parquet"
    server.status[path] = [503, 500]
    r = fetch(server.url(path), tmp_path / "f.parquet", retries=3, **FAST)
    assert r.attempts == 3 and (tmp_path / "f.parquet").read_bytes() == shards[path]
    with pytest.raises(FetchError, match="cannot fetch"):
        fetch("ftp://x/y", tmp_path / "g")


def test_present_valid_file_is_not_fetched_again(server, shards, tmp_path):
    path = "/data/shard_00006.parquet"
    dest = tmp_path / "h.parquet"
    dest.write_bytes(shards[path])
    r = fetch(server.url(path), dest, validate=parquet_ok, **FAST)
    assert r.skipped and r.sha256 == sha(shards[path]) and server.gets() == []
    dest.write_bytes(b"not parquet at all")  # present but broken: replaced
    r = fetch(server.url(path), dest, validate=parquet_ok, **FAST)
    assert not r.skipped and dest.read_bytes() == shards[path]


def test_fetch_many_parallel_reports_every_failure(server, shards, tmp_path):
    jobs = [(server.url(p), tmp_path / p.rsplit("/", 1)[1]) for p in sorted(shards)]
    jobs.append((server.url("/data/missing.parquet"), tmp_path / "missing.parquet"))
    server.drop["/data/shard_00007.parquet"] = [1000]
    done = []
    with pytest.raises(FetchError, match=r"1 of 9 download\(s\) failed: missing.parquet: HTTP 404"):
        fetch_many(jobs, workers=4, validate=parquet_ok, retries=2, on_done=done.append, **FAST)
    assert len(done) == 8  # every good file arrived and stays for the next attempt
    for p, data in shards.items():
        assert (tmp_path / p.rsplit("/", 1)[1]).read_bytes() == data
    rs = fetch_many(jobs[:-1], workers=4, validate=parquet_ok, **FAST)
    assert all(r.skipped for r in rs) and [r.path for r in rs] == [d for _, d in jobs[:-1]]


@pytest.mark.s3
def test_s3_download_resume_and_listing(s3_bucket, shards, tmp_path, monkeypatch):
    import boto3

    endpoint, bucket = s3_bucket
    monkeypatch.setenv("NANORUN_S3_ENDPOINT_URL", endpoint)
    client = boto3.client("s3", endpoint_url=endpoint)
    for p, data in list(shards.items())[:3]:
        client.put_object(Bucket=bucket, Key="corpus" + p[5:], Body=data)
    data = shards["/data/shard_00001.parquet"]
    url = f"s3://{bucket}/corpus/shard_00001.parquet"
    r = fetch(url, tmp_path / "s.parquet", validate=parquet_ok, **FAST)
    assert (tmp_path / "s.parquet").read_bytes() == data and r.sha256 == sha(data)
    (tmp_path / "t.parquet.partial").write_bytes(data[:5000])
    r = fetch(url, tmp_path / "t.parquet", validate=parquet_ok, **FAST)
    assert r.resumed_from == 5000 and r.downloaded == len(data) - 5000 and (tmp_path / "t.parquet").read_bytes() == data
    with pytest.raises(FetchError, match="NoSuchKey|no such object"):
        fetch(f"s3://{bucket}/corpus/nope.parquet", tmp_path / "u.parquet", retries=3, **FAST)
    assert [(o["key"], o["size"]) for o in list_s3(f"s3://{bucket}/corpus")] == \
        [(f"corpus/shard_0000{i}.parquet", len(shards[f"/data/shard_0000{i}.parquet"])) for i in range(3)]


def test_a_url_source_is_trusted_on_first_use_then_enforced(store, tmp_path):
    """A URL carries no digest: its first fetch into a store records the sha256 (in the manifest too),
    a later build whose download differs fails naming the URL instead of committing other bytes under
    the old fingerprint; a sha256 given in the config pins the content by itself."""
    from artifacts.source_pins import SourceChangedError
    from pipeline.execute import execute
    from tests.artifacts import toy_fetch

    with FileServer({"/data.bin": b"version 1"}) as srv:
        cfg = toy_fetch.Config(url=srv.url("/data.bin"), download=True)
        m = execute(toy_fetch, cfg, {}, store)
        assert m.provenance["url_sources"] == {cfg.url: {"sha256": sha(b"version 1"), "pin": "recorded now"}}
        again = execute(toy_fetch, cfg, {}, store, force=True)  # the same content: built again
        assert again.provenance["url_sources"][cfg.url]["pin"].startswith("matches the record of ")
        srv.files["/data.bin"] = b"version 2, changed upstream"
        with pytest.raises(SourceChangedError, match=r"/data.bin changed upstream: sha256 .* when first fetched"):
            execute(toy_fetch, cfg, {}, store, force=True)
        assert (store.materialize(m.ref) / "data.bin").read_bytes() == b"version 1"
        pinned = toy_fetch.Config(url=cfg.url, download=True, sha256=sha(b"version 2, changed upstream"))
        assert execute(toy_fetch, pinned, {}, store).provenance["url_sources"][cfg.url]["pin"] == "config"
