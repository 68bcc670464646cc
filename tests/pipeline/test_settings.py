"""Project settings (pipeline/settings.py): one place says where the data lives, for the CLI and the
worker alike; `nanorun config` says what is in effect and why."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline import settings
from cli.main import main
from pipeline.recipes import speedrun_steps
from stages.base import ConfigError
from tests.conftest import REPO


@pytest.fixture
def no_settings(monkeypatch, tmp_path):
    """No settings file, no environment: only what a test writes counts."""
    for key, (env, _) in settings.KEYS.items():
        monkeypatch.delenv(env, raising=False)
    monkeypatch.delenv(settings.CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_layers_file_then_env_then_flag(no_settings, monkeypatch, shared_data):
    (no_settings / "data").mkdir()
    (no_settings / "nanorun.toml").write_text('eval_bundle = "data/bundle"\nchat_data = "data"\n')
    resolved, path = settings.resolve()
    assert path == no_settings / "nanorun.toml"
    # relative to the file, not to wherever the command runs
    assert resolved["eval_bundle"] == settings.Setting(str(no_settings / "data" / "bundle"), str(path))
    assert resolved["store"].source == "default"
    bundle = str(shared_data / "eval_bundle")
    monkeypatch.setenv("NANORUN_EVAL_BUNDLE", bundle)
    assert settings.resolve()[0]["eval_bundle"] == settings.Setting(bundle, "env NANORUN_EVAL_BUNDLE")
    assert settings.value("eval_bundle", "/flag") == "/flag"
    steps = {s.name: s for s in speedrun_steps("tiny")}  # what the CLI and the flow both call
    assert steps["eval_bundle"].cfg.local_path == str((shared_data / "eval_bundle").resolve())
    assert steps["sft"].cfg.data_dir == str(no_settings / "data")


def test_the_settings_file_may_sit_at_the_store_root(no_settings, monkeypatch):
    store = no_settings / "store"
    store.mkdir()
    (store / "nanorun.toml").write_text('chat_data = "/data/chat"\n')
    monkeypatch.chdir(store.parent.parent)  # no nanorun.toml here
    assert settings.value("chat_data") is None
    monkeypatch.setenv("NANORUN_STORE", str(store))
    assert settings.value("chat_data") == "/data/chat"


@pytest.mark.parametrize("text, message", [
    ('eval_bundel = "x"\n', "unknown key(s) ['eval_bundel']"),
    ('store = 3\n', "store must be a non-empty string"),
    ('store = "x\n', "not valid TOML"),
])
def test_a_bad_settings_file_is_one_line_exit_2(no_settings, capsys, text, message):
    (no_settings / "nanorun.toml").write_text(text)
    assert main(["ls"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    with pytest.raises(ConfigError):
        settings.resolve()


def test_config_prints_values_and_sources(no_settings, monkeypatch, capsys):
    monkeypatch.setenv(settings.CONFIG_ENV, str(no_settings / "missing.toml"))
    assert main(["config"]) == 2
    assert "NANORUN_CONFIG=" in capsys.readouterr().err
    monkeypatch.delenv(settings.CONFIG_ENV)
    (no_settings / "nanorun.toml").write_text('store = "runs"\n')
    monkeypatch.setenv("NANORUN_CHAT_DATA", "/chat")
    assert main(["config", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["store"] == {"value": str(no_settings / "runs"), "source": str(no_settings / "nanorun.toml")}
    assert out["chat_data"] == {"value": "/chat", "source": "env NANORUN_CHAT_DATA"}
    assert out["eval_bundle"] == {"value": None, "source": "default"}
    assert main(["--store", "/other", "config"]) == 0
    assert "/other  (--store)" in capsys.readouterr().out


def test_init_names_shared_data_and_keeps_an_existing_file(tmp_path):
    shared = tmp_path / "shared" / "data"
    (shared / "chat").mkdir(parents=True)
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    path, lines = settings.init_file(checkout, shared)
    assert lines == ['chat_data = "../shared/data/chat"']  # no eval_bundle folder: not named
    path.write_text('store = "/kept"\n')
    assert settings.init_file(checkout, shared) == (path, None)
    assert path.read_text() == 'store = "/kept"\n'


def _fingerprints(plan_text: str) -> dict[str, str]:
    rows = [line.split() for line in plan_text.splitlines()[1:] if "/" in line]
    return {r[0]: r[2] for r in rows}


# The flow's side: the deployment's worker environment (deploy/env.sh, sourced as deploy/worker.sh
# does), in the checkout (prefect.yaml's pull step), building the plan as flows/speedrun.py does.
FLOW_PLAN = """
from pipeline.recipes import speedrun_steps
from pipeline.plan import format_plan, plan_rows
from artifacts import open_store
from pipeline import settings
print(format_plan(plan_rows(speedrun_steps("tiny"), open_store(settings.value("store")))))
"""


@pytest.mark.slow
def test_the_ui_and_the_cli_plan_the_same_fingerprints(tmp_path, shared_data):
    """A fresh checkout with ../shared beside it: the worker (deploy/env.sh) and a plain
    `nanorun speedrun --preset tiny --plan` in the checkout plan the same artifacts, the CORE bundle
    and SFT's chat data included."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data)
    env = {k: v for k, v in os.environ.items()
           if k not in (settings.CONFIG_ENV, "NANORUN_EVAL_BUNDLE", "NANORUN_CHAT_DATA", "NANORUN_STORE")}
    env |= {"NANORUN_REPO": str(checkout), "NANORUN_VENV": str(REPO / ".venv"), "HOME": str(tmp_path),
            "NANORUN_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    worker = subprocess.run(["bash", "-c", f'. "{REPO}/deploy/env.sh" && cd "$NANORUN_REPO" && '
                             f'"{sys.executable}" -c "$0"', FLOW_PLAN], env=env, capture_output=True,
                            text=True, timeout=300)
    assert worker.returncode == 0, worker.stderr[-2000:]
    cli = subprocess.run([sys.executable, "-m", "cli.main", "speedrun", "--preset", "tiny", "--plan"], cwd=checkout,
                         env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    ui, cmd = _fingerprints(worker.stdout), _fingerprints(cli.stdout)
    assert set(ui) >= {"eval_bundle", "sft", "chat_eval", "report"} and ui == cmd, (worker.stdout, cli.stdout)
    # and both use the shared data beside the checkout, which deploy/env.sh wrote into its nanorun.toml
    assert (checkout / "nanorun.toml").read_text().splitlines()[1:] == [
        'eval_bundle = "../shared/data/eval_bundle"', 'chat_data = "../shared/data/chat"']
    shared = {s.name: s for s in speedrun_steps("tiny", eval_bundle=str(tmp_path / "shared/data/eval_bundle"),
                                                chat_data=str(tmp_path / "shared/data/chat"))}
    from artifacts import open_store
    from pipeline.plan import plan_rows

    expected = {r.step: str(r.ref) for r in plan_rows(list(shared.values()), open_store(str(tmp_path / "store")))}
    assert cmd == expected
