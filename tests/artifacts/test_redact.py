"""Credentials inside URLs never reach a manifest, the run index, provenance, a fingerprint or a log
line."""
from __future__ import annotations

import hashlib
import json
import logging
import sys

import pytest

from artifacts import open_store
from artifacts.index import RunIndex
from artifacts.redact import redact, redact_value
from pipeline.execute import artifact_ref, execute
from stagekit.fetch import FetchError
from tests.artifacts import toy_fetch


@pytest.mark.parametrize("text, clean", [
    ("https://user:pw@host/x.parquet", "https://***@host/x.parquet"),
    ("http://TOKEN@host:8080/a", "http://***@host:8080/a"),
    ("s3://AKIAEXAMPLE:wJal/rXUtn+FEMI@bucket/key", "s3://***@bucket/key"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12&x=1",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&x=1"),
    ("get https://h/f?token=s3cr3t#frag and 'http://u:p@h/'", "get https://h/f?token=***#frag and 'http://***@h/'"),
    ("s3://bucket/key/with@sign", "s3://bucket/key/with@sign"),
    ("https://host:8080/path@x?page=2", "https://host:8080/path@x?page=2"),
    ("step 10 loss=2.5 lr=0.02", "step 10 loss=2.5 lr=0.02"),
])
def test_redact(text, clean):
    assert redact(text) == clean
    assert redact_value({"a": [text, 1, None], "b": (text,)}) == {"a": [clean, 1, None], "b": (clean,)}


def test_no_credentials_in_manifest_index_provenance_or_logs(tmp_path, nanorun_home, monkeypatch, caplog):
    secret_url = "https://alice:HUNTER2@data.example/shard.parquet?X-Amz-Signature=SIGSECRET"
    monkeypatch.setattr(sys, "argv", ["nanorun", "stage", "toy_fetch", "--set", f"url={secret_url}"])
    store = open_store(str(tmp_path / "store"))  # with the run index
    cfg = toy_fetch.Config(url=secret_url, mirror="s3://AKIA:TOPSECRET@bucket/m")
    with caplog.at_level(logging.INFO):
        m = execute(toy_fetch, cfg, {}, store)
    text = store._read(store._manifest_key(m.ref)).decode() + str(RunIndex().artifacts(store=store.url))
    text += "\n".join(r.getMessage() for r in caplog.records)
    assert "fetching https://***@data.example" in text and "HUNTER2" not in text
    assert "SIGSECRET" not in text and "TOPSECRET" not in text and "alice" not in text
    assert m.identity["url"] == "https://***@data.example/shard.parquet?X-Amz-Signature=***"
    # The identity is the redacted URL: other credentials, same artifact.
    other = toy_fetch.Config(url="https://bob:other@data.example/shard.parquet?X-Amz-Signature=x")
    assert artifact_ref(toy_fetch, other, {}) == m.ref == artifact_ref(toy_fetch, toy_fetch.Config(url=m.identity["url"]), {})
    assert artifact_ref(toy_fetch, toy_fetch.Config(url="https://data.example/other.parquet"), {}) != m.ref


def test_fetch_errors_and_tracebacks_are_redacted(caplog):
    e = FetchError("shard_00000.parquet: HTTP 403 for https://u:HUNTER2@h/x")
    assert "HUNTER2" not in str(e) and "https://***@h/x" in str(e)
    with caplog.at_level(logging.ERROR):
        try:
            raise RuntimeError("cannot open s3://AKIA:SEC/RET@bucket/k")
        except RuntimeError:
            logging.getLogger("nanorun.test").exception("failed")
    assert caplog.records[-1].exc_text and "SEC/RET" not in caplog.text


@pytest.mark.slow  # a temporary Prefect server
def test_no_credentials_in_prefect_flow_parameters(tmp_path, nanorun_home, monkeypatch):
    """The server shows a flow run's parameters to everyone: the CLI passes the URL redacted and the
    credentials through its environment, and the stage still gets the whole URL."""
    from prefect.client.orchestration import get_client

    from cli.main import main
    from stages.registry import STAGE_MODULES

    monkeypatch.setitem(STAGE_MODULES, "toy_fetch", "tests.artifacts.toy_fetch")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("NANORUN_SECRETS", "{}")
    secret_url = "https://alice:HUNTER2@data.example/shard.parquet?X-Amz-Signature=SIGSECRET"
    store = open_store(str(tmp_path / "store"))
    assert main(["--store", store.url, "stage", "toy_fetch", "--set", f"url={secret_url}"]) == 0
    with get_client(sync_client=True) as client:
        params = json.dumps([r.parameters for r in client.read_flow_runs() if r.parameters.get("name") == "toy_fetch"])
    assert "data.example/shard.parquet" in params
    assert "HUNTER2" not in params and "alice" not in params and "SIGSECRET" not in params
    data = store.materialize(store.resolve("toy_fetch@latest")) / "data.txt"
    assert data.read_text().strip() == hashlib.sha256(secret_url.encode()).hexdigest()
