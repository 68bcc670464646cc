"""eval_bundle stage: the real bundle from a local directory, from a local zip, and zipped and served
over HTTP on loopback (fresh, resumed, with a bad checksum); identity follows content, not paths."""
from __future__ import annotations

import hashlib
import http.server
import shutil
import threading
import zipfile
from pathlib import Path

import pytest

from stages import eval_bundle as stage
from stages.base import ConfigError

MISSING = ["hellaswag_zeroshot", "hellaswag", "squad", "coqa"]


@pytest.fixture(scope="module")
def bundle_dir(shared_data) -> Path:
    return shared_data / "eval_bundle"


@pytest.fixture(scope="module")
def bundle_zip(bundle_dir, tmp_path_factory) -> Path:
    """The shared bundle zipped like the reference download: everything under eval_bundle/."""
    path = tmp_path_factory.mktemp("zip") / "eval_bundle.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for rel in stage.bundle_files(bundle_dir):
            zf.write(bundle_dir / rel, f"eval_bundle/{rel}")
    return path


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD with single-range support ("bytes=N-"), the way S3 and CDNs answer resumed downloads."""

    def _serve(self, body: bool):
        data = self.server.files.get(self.path)
        rng = self.headers.get("Range")
        self.server.requests.append((self.command, self.path, rng))
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and rng.startswith("bytes=") and rng[6:].split("-")[0]:
            start = int(rng[6:].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if body:
            self.wfile.write(data[start:])

    def do_GET(self):
        self._serve(True)

    def do_HEAD(self):
        self._serve(False)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(bundle_zip):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.files = {"/eval_bundle.zip": bundle_zip.read_bytes()}
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _check_output(out: Path, metrics: dict, bundle_dir: Path):
    assert stage.bundle_files(out) == stage.bundle_files(bundle_dir)
    assert metrics["missing"] == MISSING and metrics["n_present"] == 18 and metrics["n_tasks"] == 22
    assert "arc_easy" in metrics["present"] and "hellaswag" not in metrics["present"]
    assert metrics["content_digest"] == stage.content_digest(bundle_dir)
    assert not (out / ".download").exists() and not (out / ".extract").exists()


# ---------------------------------------------------------------------------------------------- config


def test_local_identity_is_the_content_not_the_path(bundle_dir, tmp_path):
    cfg = stage.Config(local_path=str(bundle_dir)).resolve()
    assert cfg.url == "" and cfg.content_digest.startswith("dir:") and cfg.label() == "local"
    assert "local_path" not in cfg.identity_dict() and cfg.runtime_dict()["local_path"] == str(bundle_dir.resolve())
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    (copy / ".DS_Store").write_bytes(b"junk")                       # hidden files are not content
    same = stage.Config(local_path=str(copy)).resolve()
    assert same.identity_dict() == cfg.identity_dict()
    with open(copy / "eval_data/commonsense_reasoning/copa.jsonl", "a") as f:
        f.write("\n")
    stale = stage.Config.from_dict({"local_path": str(copy), "content_digest": cfg.content_digest})
    assert stale.resolve() is stale  # a given digest is taken as it is (no I/O); run() refuses changed files
    assert stage.Config(local_path=str(copy)).resolve().content_digest != cfg.content_digest


def test_config_errors_say_what_to_do(tmp_path, bundle_dir):
    with pytest.raises(ConfigError, match="does not exist"):
        stage.Config(local_path=str(tmp_path / "nope")).resolve()
    with pytest.raises(ConfigError, match="no core.yaml"):
        stage.Config(local_path=str(tmp_path)).resolve()
    with pytest.raises(ConfigError, match="set local_path instead"):
        stage.Config(url=str(bundle_dir))
    with pytest.raises(ConfigError, match="64 lowercase hex"):
        stage.Config(sha256="abc")
    with pytest.raises(ConfigError, match="sha256 applies to a zip"):
        stage.Config(local_path=str(bundle_dir), sha256="0" * 64).resolve()
    default = stage.Config()
    assert default.url == stage.DEFAULT_URL and default.label() == "download" and default.content_digest == ""


# ---------------------------------------------------------------------------------------------- local


def test_run_from_a_local_directory(bundle_dir, tmp_path):
    cfg = stage.Config(local_path=str(bundle_dir)).resolve()
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("left by a failed attempt")
    metrics = stage.run(cfg, {}, out)
    _check_output(out, metrics, bundle_dir)
    assert metrics["content_digest"] == cfg.content_digest


def test_run_from_a_local_zip(bundle_dir, bundle_zip, tmp_path):
    sha = hashlib.sha256(bundle_zip.read_bytes()).hexdigest()
    cfg = stage.Config(local_path=str(bundle_zip), sha256=sha).resolve()
    assert cfg.content_digest == "zip:" + sha
    _check_output(tmp_path, stage.run(cfg, {}, tmp_path), bundle_dir)
    with pytest.raises(ConfigError, match="expected"):
        stage.Config(local_path=str(bundle_zip), sha256="f" * 64).resolve()


def test_unsafe_zip_is_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("eval_bundle/core.yaml", "icl_tasks: []\n")
        zf.writestr("../escaped.txt", "gotcha")
    with pytest.raises(RuntimeError, match="unsafe member"):
        stage.run(stage.Config(local_path=str(evil)).resolve(), {}, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_changed_after_config_is_refused(bundle_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    cfg = stage.Config(local_path=str(copy)).resolve()
    (copy / "core.yaml").write_text((copy / "core.yaml").read_text() + "\n")
    with pytest.raises(RuntimeError, match="changed since the config was built"):
        stage.run(cfg, {}, tmp_path / "out")


# ---------------------------------------------------------------------------------------------- download


def test_download_over_http(bundle_dir, bundle_zip, http_server, tmp_path):
    server, base = http_server
    sha = hashlib.sha256(bundle_zip.read_bytes()).hexdigest()
    cfg = stage.Config(url=f"{base}/eval_bundle.zip", sha256=sha)
    _check_output(tmp_path, stage.run(cfg, {}, tmp_path), bundle_dir)


def test_download_resumes_a_partial_file(bundle_dir, bundle_zip, http_server, tmp_path):
    server, base = http_server
    data = bundle_zip.read_bytes()
    part = tmp_path / ".download" / "eval_bundle.zip.partial"
    part.parent.mkdir()
    part.write_bytes(data[: len(data) // 2])          # what an interrupted attempt leaves behind
    cfg = stage.Config(url=f"{base}/eval_bundle.zip", sha256=hashlib.sha256(data).hexdigest())
    _check_output(tmp_path, stage.run(cfg, {}, tmp_path), bundle_dir)
    ranges = [r for method, _, r in server.requests if method == "GET"]
    assert ranges == [f"bytes={len(data) // 2}-"]


def test_bad_checksum_and_missing_url_fail_loudly(http_server, tmp_path):
    from stagekit.fetch import FetchError
    server, base = http_server
    with pytest.raises(FetchError, match="eval_bundle.zip"):
        stage.run(stage.Config(url=f"{base}/eval_bundle.zip", sha256="0" * 64, retries=1), {}, tmp_path / "a")
    assert not (tmp_path / "a" / "core.yaml").exists()
    with pytest.raises(FetchError, match="404"):
        stage.run(stage.Config(url=f"{base}/nope.zip", retries=1), {}, tmp_path / "b")


def test_committed_through_the_store_and_copies_hit_the_cache(bundle_dir, tmp_path):
    from artifacts import open_store
    from core.eval.core import load_bundle
    from pipeline.execute import execute

    store = open_store(str(tmp_path / "store"), index=False)
    m = execute("eval_bundle", stage.Config(local_path=str(bundle_dir)), {}, store)
    assert m.ref.label == "local" and m.metrics["missing"] == MISSING
    assert sorted(f.path for f in m.files) == stage.bundle_files(bundle_dir)
    assert [t.label for t in load_bundle(store.materialize(m.ref)).present] == m.metrics["present"]
    copy = tmp_path / "elsewhere"
    shutil.copytree(bundle_dir, copy)
    events = []
    again = execute("eval_bundle", stage.Config(local_path=str(copy)), {}, store,
                    on_event=lambda kind, info: events.append(kind))
    assert again.ref == m.ref and events == ["cached"]


# ---------------------------------------------------------------------------------------------- hostile input


def test_zip_bomb_is_refused_before_it_unpacks(bundle_dir, tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in ("core.yaml", "eval_meta_data.csv"):
            zf.write(bundle_dir / name, f"eval_bundle/{name}")
        with zf.open("eval_bundle/eval_data/padding.jsonl", "w") as f:
            zeros = bytes(1 << 20)
            for _ in range(stage.MIN_ALLOWANCE // len(zeros) + 1):
                f.write(zeros)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(RuntimeError, match="zip bomb"):
        stage.run(stage.Config(local_path=str(bomb)).resolve(), {}, tmp_path / "out")
    assert not any((tmp_path / "out").rglob("*.jsonl"))


def test_a_bundle_without_task_files_is_refused(bundle_dir, tmp_path):
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        for name in ("core.yaml", "eval_meta_data.csv"):
            zf.write(bundle_dir / name, f"eval_bundle/{name}")
    with pytest.raises(RuntimeError, match="none of the 22 task files"):
        stage.run(stage.Config(local_path=str(empty)).resolve(), {}, tmp_path / "out")


@pytest.mark.parametrize("uri", ["ABSOLUTE", "../../outside.jsonl", "../../../../../../../../etc/hostname"])
def test_core_yaml_cannot_name_files_outside_the_bundle(bundle_dir, tmp_path, uri):
    from core.eval.bundle import BundleError, load_bundle

    outside = tmp_path / "outside.jsonl"
    shutil.copy(bundle_dir / "eval_data/commonsense_reasoning/copa.jsonl", outside)
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    text = (copy / "core.yaml").read_text()
    assert "commonsense_reasoning/copa.jsonl" in text
    (copy / "core.yaml").write_text(text.replace("commonsense_reasoning/copa.jsonl",
                                                 str(outside) if uri == "ABSOLUTE" else uri))
    with pytest.raises(BundleError, match="copa"):
        load_bundle(copy)
    with pytest.raises(BundleError):
        stage.run(stage.Config(local_path=str(copy)).resolve(), {}, tmp_path / "out")
