"""`nanorun chat` and `nanorun serve` through cli.main.main on the tiny speedrun's models: the default
model (export@latest, then sft@latest), refs, bundle folders, an S3 store (pulled and verified),
one-shot and scripted interactive chat with streamed output, the web server as a subprocess, and
one-line exit-2 errors."""
from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

import cli.main as cli
from artifacts import open_store
from core.chat_cli import run_chat
from cli.chat_commands import find_chat_model, load_chat_model
from stages import export
from pipeline.execute import execute
from tests.artifacts import toy_stage
from tests.conftest import REPO, free_port
from tests.cli.test_cli import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)

PROMPT = "What do you like to do on weekends?"
SAMPLING = ["--seed", "7", "--temperature", "0.8", "--top-k", "30", "--max-tokens", "24"]


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---- errors (no model needed) -----------------------------------------------------------------------
def test_errors_are_one_line(tmp_path, nanorun_home, capsys):
    store = open_store(str(tmp_path / "store"))
    url = store.url
    code, _, err = run(capsys, "--store", url, "chat", "-p", "hi")
    one_line_error(code, err, "no model to chat with", "neither export@latest nor sft@latest")
    code, _, err = run(capsys, "--store", url, "chat", "sft@nope", "-p", "hi")
    one_line_error(code, err, "no alias 'sft@nope'")
    code, _, err = run(capsys, "--store", url, "serve", "deadbeef")
    one_line_error(code, err, "unknown ref 'deadbeef'")
    code, _, err = run(capsys, "--store", url, "chat", "./no-such-folder", "-p", "hi")
    one_line_error(code, err, "./no-such-folder is neither a folder nor an artifact ref")
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "chat", str(tmp_path / "empty"), "-p", "hi")
    one_line_error(code, err, "is not an export bundle: it has no config.json")
    toy = execute(toy_stage, toy_stage.Config(n=1, size=10), {}, store)
    code, _, err = run(capsys, "--store", url, "chat", str(toy.ref), "-p", "hi")
    one_line_error(code, err, f"{toy.ref} is a toy artifact, which holds no model")
    code, _, err = run(capsys, "--store", url, "serve", str(toy.ref), "--workers", "0")
    one_line_error(code, err, "--workers 0 (>= 1)")
    # `nanorun chat -p $'\xff'`: Python hands the byte over as U+DCFF; refused before a model is looked for
    code, _, err = run(capsys, "--store", url, "chat", "-p", "hi \udcff")
    one_line_error(code, err, "the prompt (-p) is not valid text", "U+DCFF (the byte 0xff, which is not UTF-8)")


# ---- with the tiny speedrun's models ----------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tiny_run, tmp_path_factory):
    """A store of its own: the tiny sft model (with its lineage) and an export bundle of it."""
    src, run_ = tiny_run
    store = open_store(str(tmp_path_factory.mktemp("chat-store")))
    sft = src.push(run_["sft"].ref, store, with_inputs=True)
    store.set_alias("sft", "latest", sft.ref)
    store.set_alias("pretrain", "latest", run_["base"].ref)
    return store, sft.ref, run_["base"].ref


@pytest.fixture(scope="module")
def bundle(models):
    store, sft, _ = models
    m = execute("export", export.Config(temperature=0.9, top_k=40, max_tokens=20), {"model": sft, "tokenizer":
                store.require(sft).inputs["tokenizer"]}, store)
    return m.ref


def reference_reply(text, store, prompt=PROMPT, seed=7, temperature=0.8, top_k=30, max_tokens=24) -> str:
    engine, tokenizer, _ = load_chat_model(text, store)
    out = io.StringIO()
    run_chat(engine, tokenizer, prompt=prompt, temperature=temperature, top_k=top_k, max_tokens=max_tokens,
             seed=seed, output=out)
    return out.getvalue()


@pytest.mark.slow
def test_default_model_is_sft_then_export(models, capsys):
    store, sft, _ = models
    code, out, err = run(capsys, "--store", store.url, "chat", "-p", PROMPT, *SAMPLING)
    assert code == 0, err
    expected = reference_reply(str(sft), store)
    assert out == expected and len(out.strip()) > 0   # only the reply on stdout, streamed as run_chat does
    # once an export exists it is the default; it is the same weights, so the same reply
    execute("export", export.Config(), {"model": sft, "tokenizer": store.require(sft).inputs["tokenizer"]}, store)
    assert find_chat_model(None, store).name.startswith("export/fp32-")
    code, out2, _ = run(capsys, "--store", store.url, "chat", "-p", PROMPT, *SAMPLING)
    assert code == 0 and out2 == expected


@pytest.mark.slow
def test_bundle_generation_defaults_and_folder(models, bundle, tmp_path, capsys):
    store, _, _ = models
    found = find_chat_model(str(bundle), store)
    assert found.bundle and found.kind == "sft"
    assert found.generation == {"temperature": 0.9, "top_k": 40, "max_tokens": 20}
    code, out, err = run(capsys, "--store", store.url, "chat", str(bundle)[:-8], "-p", PROMPT, "--seed", "1")
    assert code == 0, err
    assert out == reference_reply(str(bundle), store, seed=1, temperature=0.9, top_k=40, max_tokens=20)
    # pulled into a folder, the bundle needs no store at all
    code, _, err = run(capsys, "--store", store.url, "pull", str(bundle), "--to", str(tmp_path / "my-model"))
    assert code == 0, err
    code, out2, err = run(capsys, "--store", str(tmp_path / "nowhere"), "chat", str(tmp_path / "my-model"),
                          "-p", PROMPT, "--seed", "1")
    assert code == 0 and out2 == out, err
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.slow
def test_base_model_warns(models, capsys, caplog):
    store, _, base = models
    with caplog.at_level(logging.WARNING, logger="nanorun.chat"):
        code, out, err = run(capsys, "--store", store.url, "chat", "pretrain@latest", "-p", PROMPT, *SAMPLING)
    assert code == 0, err
    assert any("is a base model, not chat-tuned" in r.getMessage() and base.fingerprint[:8] in r.getMessage()
               for r in caplog.records)
    assert out == reference_reply(str(base), store)


class Recorder(io.StringIO):
    """stdout that remembers every write (to see the reply arrive in pieces)."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


@pytest.mark.slow
def test_interactive_session_streams(models, monkeypatch, capsys):
    store, sft, _ = models
    capsys.readouterr()
    out = Recorder()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there!\nclear\nTell me a story.\nquit\n"))
    monkeypatch.setattr(sys, "stdout", out)
    code = cli.main(["--store", store.url, "chat", str(sft), "--seed", "3", "--max-tokens", "16", "--temperature", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    text = out.getvalue()
    assert f"sft/{sft.label}-{sft.fingerprint[:8]} (sft, " in err  # what we are talking to, on stderr
    assert "Type `quit` to leave" in text and text.count("User: ") == 4 and text.count("Assistant: ") == 2
    assert "(new conversation)" in text
    expected = reference_reply(str(sft), store, prompt="Hello there!", seed=3, temperature=1, top_k=50, max_tokens=16)
    assert len(expected) > 5 and "\nAssistant: " + expected in text
    # the reply arrived as several writes (streamed, not printed at the end)
    start, pieces = out.writes.index("\nAssistant: ") + 1, []
    while len("".join(pieces)) < len(expected):
        pieces.append(out.writes[start + len(pieces)])
    assert "".join(pieces) == expected and len(pieces) >= 3, pieces


@pytest.mark.slow
def test_chat_from_s3(models, bundle, s3_bucket, nanorun_home, monkeypatch, capsys):
    store, sft, _ = models
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("NANORUN_S3_ENDPOINT_URL", endpoint)
    s3 = open_store(f"s3://{bucket}/runs")
    store.push(bundle, s3)
    store.push(sft, s3, with_inputs=True)
    s3.set_alias("export", "latest", bundle)
    expected = reference_reply(str(bundle), store)
    code, out, err = run(capsys, "--store", s3.url, "chat", "-p", PROMPT, *SAMPLING)   # export@latest
    assert code == 0 and out == expected, err
    cached = s3.materialize(bundle)
    assert str(cached).startswith(str(nanorun_home)) and (cached / "model.safetensors").is_file()
    code, out, err = run(capsys, "--store", s3.url, "chat", str(sft), "-p", PROMPT, *SAMPLING)  # checkpoint + tokenizer
    assert code == 0 and out == reference_reply(str(sft), store), err

    # a damaged object in the bucket is caught by the sha256 check on download, before any loading
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    key = f"runs/{bundle.key}/model.safetensors"
    size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    client.put_object(Bucket=bucket, Key=key, Body=b"\0" * size)
    import shutil

    shutil.rmtree(cached)
    code, _, err = run(capsys, "--store", s3.url, "chat", str(bundle), "-p", PROMPT)
    one_line_error(code, err, "sha256", "model.safetensors")


def _wait_ready(base: str, proc, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"nanorun serve exited with {proc.returncode}: {proc.stderr.read()}"
        try:
            health = httpx.get(f"{base}/health", timeout=2).json()
            if health["ready"]:
                return health
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"nanorun serve not ready after {timeout}s")


@pytest.mark.slow
def test_serve_subprocess(models, bundle, capsys):
    store, _, _ = models
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "--store", store.url, "serve", str(bundle),
                             "--port", str(port), "--max-queue", "2"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        health = _wait_ready(base, proc)
        name = f"export/{bundle.label}-{bundle.fingerprint[:8]}"
        assert health["model"] == name and health["devices"] == ["cpu"] and health["max_queue"] == 2
        assert name in httpx.get(base + "/", timeout=10).text
        body = {"messages": [{"role": "user", "content": PROMPT}], "seed": 7, "temperature": 0.8, "top_k": 30,
                "max_tokens": 24}
        events = []
        with httpx.stream("POST", base + "/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert events[-1] == {"done": True} and len(events) > 2
        text = "".join(e["token"] for e in events[:-1])
        assert text == reference_reply(str(bundle), store)[:-1].rstrip("\ufffd")  # run_chat ends with a newline
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()


def test_serve_refuses_a_port_in_use_before_loading_a_model(capsys, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # the store is empty: the port is checked first, so the error is about the port, not the model
        code, _, err = run(capsys, "--store", str(tmp_path / "empty"), "serve", "--port", str(port))
    one_line_error(code, err, f"cannot listen on 127.0.0.1:{port}", "--port")


def test_serve_refuses_a_non_loopback_host_without_a_token(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("NANORUN_SERVE_TOKEN", raising=False)
    empty = str(tmp_path / "empty")
    for host in ("0.0.0.0", "::", "192.0.2.7"):
        code, _, err = run(capsys, "--store", empty, "serve", "--host", host, "--port", "1")
        one_line_error(code, err, f"--host {host} lets other machines reach the model", "--token")
    code, _, err = run(capsys, "--store", empty, "serve", "--host", "0.0.0.0", "--token", "  ")
    one_line_error(code, err, "give a token")
    code, _, err = run(capsys, "--store", empty, "serve", "--max-body", "0")
    one_line_error(code, err, "--max-body 0 (>= 1)")
    # with a token (flag or environment) the host is accepted: the next error is the empty store's
    monkeypatch.setenv("NANORUN_SERVE_TOKEN", "t0ken")
    code, _, err = run(capsys, "--store", empty, "serve", "--host", "0.0.0.0", "--port", str(free_port()))
    one_line_error(code, err, "no model to chat with")


@pytest.mark.slow
def test_a_pulled_sft_folder_chats_like_its_ref(models, tmp_path, capsys):
    """`nanorun pull sft@... --to DIR` then `nanorun chat DIR`: the tokenizer comes from the store
    (its manifest names it), or from --tokenizer when the store does not have it."""
    store, sft, _ = models
    expected = reference_reply(str(sft), store)
    assert run(capsys, "--store", store.url, "pull", str(sft), "--to", str(tmp_path / "sft"))[0] == 0
    code, out, err = run(capsys, "--store", store.url, "chat", str(tmp_path / "sft"), "-p", PROMPT, *SAMPLING)
    assert code == 0 and out == expected, err
    tok = store.require(sft).inputs["tokenizer"]
    assert run(capsys, "--store", store.url, "pull", str(tok), "--to", str(tmp_path / "tok"))[0] == 0
    elsewhere = ["--store", str(tmp_path / "empty-store")]
    code, _, err = run(capsys, *elsewhere, "chat", str(tmp_path / "sft"), "-p", PROMPT, *SAMPLING)
    one_line_error(code, err, "pulled sft artifact whose tokenizer", "--tokenizer DIR")
    code, out, err = run(capsys, *elsewhere, "chat", str(tmp_path / "sft"), "--tokenizer", str(tmp_path / "tok"),
                         "-p", PROMPT, *SAMPLING)
    assert code == 0 and out == expected, err
