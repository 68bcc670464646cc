"""The README's main command on a fresh offline machine with nothing beside the checkout: the CORE
bundle cannot be fetched, so CORE is skipped with a warning, everything else is built, the report
says why CORE is missing, and the run exits 0. A rerun with the bundle runs exactly what it adds."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.artifacts.fixtures import REPO

pytestmark = pytest.mark.slow


def _cli(tmp_path, store, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(NANORUN_HOME=str(tmp_path / "home"), NANORUN_PROGRESS_BAR="0", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90", PYTHONPATH=str(REPO))
    env.pop("NANORUN_SHARED_DATA", None)
    return subprocess.run([sys.executable, "-m", "cli.main", "--store", store.url, *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _offline_bundle_args() -> list[str]:
    """Nothing: the default public URL, whose host does not resolve offline. Where this machine can
    resolve it after all, an address under .invalid (RFC 2606: never resolves) takes the same path."""
    from stages.eval_bundle import DEFAULT_URL

    try:
        socket.getaddrinfo(DEFAULT_URL.split("/")[2], 443)
    except OSError:
        return []
    return ["--set", "eval_bundle.url=https://nanorun-offline.invalid/eval_bundle.zip"]


def test_offline_speedrun_skips_core_and_succeeds_then_the_bundle_adds_exactly_core(tiny_run, tmp_path, shared_data):
    from artifacts import open_store

    built, run = tiny_run
    store = open_store(str(tmp_path / "store"))
    for step in ("data", "tokenizer", "base"):  # what does not depend on ../shared: reuse it, train nothing
        built.push(run[step].ref, store)

    r = _cli(tmp_path, store, "speedrun", "--preset", "tiny", *_offline_bundle_args())
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "eval_bundle skipped (optional evidence)" in out and "base_eval not run (needs eval_bundle)" in out
    report_ref = store.resolve("report@latest")
    report = (store.materialize(report_ref) / "report.md").read_text()
    assert "| CORE | not run (no eval bundle) |" in report
    assert store.refs("core_eval") == [] and len(store.refs("sft")) == 1

    # the bundle arrives: exactly the steps that use it (and what consumes them) run
    plan = _cli(tmp_path, store, "speedrun", "--preset", "tiny", "--eval-bundle", str(shared_data / "eval_bundle"),
                "--plan")
    assert plan.returncode == 0, plan.stderr[-3000:]
    status = {line.split()[0]: line.split()[3] for line in plan.stdout.splitlines()[1:-1]}
    assert status == {"data": "cached", "tokenizer": "cached", "eval_bundle": "will", "base": "cached",
                      "base_eval": "will", "sft": "cached", "chat_eval": "will", "export": "will", "report": "will"}
