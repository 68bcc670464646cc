"""The nanorun CLI: store subcommands, plan, and one-line exit-2 errors for user mistakes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import cli.main as cli
from artifacts import ArtifactRef, Manifest, open_store
from pipeline.execute import execute
from tests.artifacts import toy_consumer, toy_stage
from tests.artifacts.fixtures import REPO, put, subprocess_env, tamper
from tests.conftest import free_port


@pytest.fixture
def built(tmp_path, nanorun_home):
    """A local store holding toy -> toy_sum, built through execute (so the index is fed)."""
    store = open_store(str(tmp_path / "store"))
    up = execute(toy_stage, toy_stage.Config(n=2, size=100), {}, store)
    down = execute(toy_consumer, toy_consumer.Config(scale=2), {"src": up.ref}, store)
    return store, up, down


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("nanorun")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_ls_show_verify(built, capsys):
    store, up, down = built
    code, out, err = run(capsys, "--store", store.url, "ls")
    assert code == 0 and str(up.ref) in out and str(down.ref) in out and "@latest" in out
    assert "total=400" in out and "2 artifact(s)" in err
    code, out, _ = run(capsys, "--store", store.url, "ls", "toy_sum", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["ref"] for r in rows] == [str(down.ref)] and rows[0]["metrics"] == {"total": 400}
    code, out, _ = run(capsys, "--store", store.url, "show", down.ref.fingerprint[:6])
    assert code == 0
    for needle in ("scale = 2", f"src <- {up.ref}", "sum.json", "total = 400", "git_commit", "aliases    latest"):
        assert needle in out, needle
    code, out, _ = run(capsys, "--store", store.url, "show", "toy@latest", "--json")
    assert Manifest.from_json(out) == up
    code, out, _ = run(capsys, "--store", store.url, "verify", str(up.ref), "--deep")
    assert code == 0 and "OK (2 files, 200 bytes, size and sha256 checked)" in out
    tamper(store, up.ref, "part0.bin", b"x")
    code, out, _ = run(capsys, "--store", store.url, "verify", str(up.ref))
    assert code == 1 and "size mismatch part0.bin" in out


def test_pull_push_alias_gc_index(built, capsys, tmp_path, s3_bucket, monkeypatch):
    store, up, down = built
    code, out, _ = run(capsys, "--store", store.url, "pull", str(down.ref), "--to", str(tmp_path / "out"))
    assert code == 0 and json.loads((tmp_path / "out" / "sum.json").read_text())["total"] == 400
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("NANORUN_S3_ENDPOINT_URL", endpoint)
    code, out, _ = run(capsys, "--store", store.url, "push", "toy_sum@latest", "--to", f"s3://{bucket}/p", "--with-inputs")
    assert code == 0 and f"-> s3://{bucket}/p" in out
    code, out, _ = run(capsys, "--store", f"s3://{bucket}/p", "verify", str(up.ref), "--deep")
    assert code == 0
    code, out, _ = run(capsys, "--store", store.url, "alias", "toy@leaderboard-2026-11-23", up.ref.fingerprint[:8])
    assert code == 0 and f"toy@leaderboard-2026-11-23 -> {up.ref}" in out
    code, out, _ = run(capsys, "--store", store.url, "alias")
    assert "toy@leaderboard-2026-11-23" in out and "toy_sum@latest" in out
    old = execute(toy_stage, toy_stage.Config(n=1), {}, store)  # becomes toy@latest
    code, out, _ = run(capsys, "--store", store.url, "alias", "toy@latest", str(up.ref))
    code, out, _ = run(capsys, "--store", store.url, "gc", "--dry-run", "--grace", "0")
    assert code == 0 and "unreferenced" in out and old.ref.key in out and "would delete 1 item(s)" in out
    code, out, _ = run(capsys, "--store", store.url, "gc", "--grace", "0")
    assert code == 0 and "deleted 1 item(s)" in out and store.manifest(old.ref) is None
    code, out, _ = run(capsys, "--store", store.url, "index", "--rebuild")
    assert code == 0 and "2 artifact(s)" in out
    code, out, _ = run(capsys, "--store", store.url, "index")
    assert code == 0 and "2 artifact(s)" in out


def test_plan_command(built, capsys, tmp_path, toy_stages):
    store, up, _ = built
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"steps": [
        {"name": "a", "stage": "toy", "config": {"n": 2, "size": 100}},
        {"name": "b", "stage": "toy_sum", "config": {"scale": 9}, "inputs": {"src": "a"}}]}))
    code, out, _ = run(capsys, "--store", store.url, "plan", str(f))
    assert code == 0 and "cached" in out and "will run" in out and "2 steps: 1 cached, 1 to run" in out
    f.write_text(json.dumps({"steps": [{"name": "a", "stage": "toy", "config": {"n": -1}}]}))
    one_line_error(*run(capsys, "--store", store.url, "plan", str(f))[::2], "n must be >= 1")
    one_line_error(*run(capsys, "--store", store.url, "plan", str(tmp_path / "missing.yaml"))[::2], "cannot read plan file")


def test_user_errors_are_one_line_exit_2(built, capsys, monkeypatch):
    store, up, _ = built
    one_line_error(*run(capsys, "--store", store.url, "show", "ffffffff")[::2], "unknown ref")
    one_line_error(*run(capsys, "--store", store.url, "show", "toy@nope")[::2], "no alias 'toy@nope'")
    for fp in ("abcd000000000001", "abcd000000000002"):
        put(store, ArtifactRef("toy", "x", fp), {"f": b"1"})
    one_line_error(*run(capsys, "--store", store.url, "verify", "abcd")[::2], "ambiguous", "toy/x-abcd000000000001")
    store._write(store._manifest_key(up.ref), b"{not json")
    one_line_error(*run(capsys, "--store", store.url, "show", str(up.ref))[::2], "corrupt manifest")
    one_line_error(*run(capsys, "--store", "gs://bucket", "ls")[::2], "unsupported store URL")
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("NANORUN_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("NANORUN_S3_MAX_ATTEMPTS", "1")
    one_line_error(*run(capsys, "--store", "s3://bkt/x", "ls")[::2], "cannot reach S3 endpoint", endpoint)


def test_missing_credentials_and_fast_startup(s3_server, tmp_path):
    env = subprocess_env(NANORUN_HOME=tmp_path / "home", NANORUN_S3_ENDPOINT_URL=s3_server,
                         AWS_CONFIG_FILE=tmp_path / "none", AWS_SHARED_CREDENTIALS_FILE=tmp_path / "none",
                         AWS_EC2_METADATA_DISABLED="true")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "cli.main", "--store", "s3://bkt/x", "ls"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    one_line_error(r.returncode, r.stderr, "no usable credentials", "AWS_ACCESS_KEY_ID")
    code = ("import sys; from cli.main import main; rc = main(['--store', sys.argv[1], 'ls']); "
            "print(rc, sorted(m for m in ('torch', 'prefect', 'boto3') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "0 []", r.stderr  # `nanorun ls` on a local store imports none of them


class Hello:
    @staticmethod
    def add_arguments(p):
        p.add_argument("--name", default="world")

    @staticmethod
    def run(args):
        print(f"hello {args.name}")
        return 0


def test_commands_can_be_registered(capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", list(cli.COMMANDS))
    cli.register("hello", "tests.cli.test_cli:Hello", "say hello")
    assert run(capsys, "hello", "--name", "nanorun")[:2] == (0, "hello nanorun\n")
    with pytest.raises(ValueError, match="already registered"):
        cli.register("ls", "x", "y")
    code, out, _ = run(capsys)
    assert code == 2 and "hello" in out and "plan" in out


def test_a_failed_flow_run_is_one_line_exit_1(built, capsys, monkeypatch):
    import flows.speedrun
    from core.checkpoint import TokenizerMismatchError

    store, _, _ = built
    monkeypatch.setenv("NANORUN_PROGRESS_BAR", "0")  # the command would set it for the rest of the session

    def crashed(**params):
        raise RuntimeError("pretrain: torchrun exited with code 1; last lines: CUDA out of memory")

    monkeypatch.setattr(flows.speedrun, "speedrun", crashed)
    code, out, err = run(capsys, "--store", store.url, "speedrun", "--preset", "tiny")
    lines = [line for line in err.strip().splitlines() if line.startswith("nanorun")]
    assert code == 1 and out == "" and len(lines) == 1 and "Traceback" not in err, err
    assert "speedrun tiny failed: RuntimeError: pretrain: torchrun exited with code 1" in lines[0]
    assert "run the same command again to resume" in lines[0]

    def verbose(**params):  # the details belong in the log above; the last line stays short
        raise RuntimeError("pretrain failed; last lines: " + "x" * 2000)

    monkeypatch.setattr(flows.speedrun, "speedrun", verbose)
    code, out, err = run(capsys, "--store", store.url, "speedrun", "--preset", "tiny")
    last = err.strip().splitlines()[-1]
    assert code == 1 and len(last) <= 200 + len("nanorun speedrun: ") and last.endswith("run the same command again to resume")

    def mismatched(**params):  # an error the user fixes by changing the command: exit 2
        raise TokenizerMismatchError("core_eval: tokenizer/model mismatch: pass the tokenizer it was trained with")

    monkeypatch.setattr(flows.speedrun, "speedrun", mismatched)
    one_line_error(*run(capsys, "--store", store.url, "speedrun", "--preset", "tiny")[::2], "tokenizer/model mismatch")


def test_global_options_go_before_or_after_the_subcommand(built, capsys, monkeypatch):
    store, up, down = built
    monkeypatch.delenv("NANORUN_STORE", raising=False)
    before = run(capsys, "--store", store.url, "show", str(up.ref))
    after = run(capsys, "show", str(up.ref), "--store", store.url, "-q")
    assert before[0] == after[0] == 0 and before[1] == after[1] and str(up.ref) in after[1]
    code, _, err = run(capsys, "show", str(up.ref), "--store", str(store.root / "elsewhere"))
    one_line_error(code, err, "elsewhere")  # the option after the subcommand is the one used


def test_a_configured_prefect_server_that_is_down_is_one_line(built, capsys, monkeypatch):
    from tests.conftest import free_port

    store, _, _ = built
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    code, out, err = run(capsys, "--store", store.url, "stage", "eval_bundle", "--set", "url=https://example.invalid/b.zip")
    one_line_error(code, err, "Prefect server at PREFECT_API_URL=http://127.0.0.1:", "does not answer",
                   "unset PREFECT_API_URL")


def test_prefect_run_log_lines_name_their_step():
    import logging

    record = logging.LogRecord("prefect.task_runs", logging.INFO, __file__, 1, "Finished in state Cached()", None, None)
    record.task_run_name = "base"
    assert cli._name_the_run(record) and cli._name_the_run(record)  # a second handler: named once
    assert record.name == "prefect.task_runs base"
