"""Candidates: their command-line forms refused in one line when wrong; a code candidate's checkout
made once, reused, and made again when half made; a patch that does not apply; a code candidate
fingerprinting its own code (in a subprocess that imports the checkout's modules) and sharing the
baseline's artifacts wherever that code is the same; (slow) `nanorun compare` of two commits.

Code candidates need a git repository to take refs from. The tests never touch this checkout's own:
they copy its files into a fresh repository (`repo` below) and make branches there."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.candidates import (Candidate, CandidateFailed, arm_candidate, candidate_sweep, checkout, checkout_env,
                                 checkouts_dir, in_checkout, parse_candidate, plan_rows, point_rows)
from pipeline.sweep import preset
from stages.base import ConfigError

REPO = Path(__file__).resolve().parents[2]
GIT = ["git", "-c", "user.name=nanorun-tests", "-c", "user.email=tests@nanorun.invalid", "-c", "commit.gpgsign=false"]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run([*GIT, "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def _branch(repo: Path, name: str, path: str, edit) -> None:
    """A branch off main whose one commit rewrites `path` with edit(text)."""
    _git(repo, "checkout", "-q", "-b", name, "main")
    f = repo / path
    f.write_text(edit(f.read_text()))
    _git(repo, "commit", "-q", "-am", f"{name}: edit {path}")
    _git(repo, "checkout", "-q", "main")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git repository whose main commit holds exactly this working tree's files (uncommitted edits
    included, so its code is the code this test process runs), with branches:
    gpt-code: core/gpt.py gains a function nothing calls (a code change that changes no number);
    gpt-doc: core/gpt.py's module docstring changes (prose: not part of any code identity);
    broken: core/gpt.py does not parse."""
    repo = tmp_path_factory.mktemp("candidate-repo")
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"], check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, repo / rel)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "this working tree")
    _branch(repo, "gpt-code", "core/gpt.py", lambda t: t + "\n\ndef _unused_by_anything():\n    return 0\n")
    _branch(repo, "gpt-doc", "core/gpt.py", lambda t: t.replace('"""', '"""Candidate prose. ', 1))
    _branch(repo, "broken", "core/gpt.py", lambda t: t + "\ndef (:\n")
    return repo


# ---- forms --------------------------------------------------------------------------------------------
def test_candidate_forms(tmp_path, monkeypatch):
    assert parse_candidate("baseline") == Candidate("baseline", "baseline")
    assert parse_candidate("wd=base.weight_decay=0.1") == Candidate("wd", "config", {"base": {"weight_decay": 0.1}})
    lr = parse_candidate("lr=base.matrix_lr=0.4,base.embedding_lr=2,tokenizer.vocab_size=1088")
    assert lr.overrides == {"base": {"matrix_lr": 0.4, "embedding_lr": 2}, "tokenizer": {"vocab_size": 1088}}
    # a value may hold commas (JSON): only a comma before the next STEP.FIELD= separates overrides
    assert parse_candidate("w=base.window=[1, 2],base.x=a").overrides == {"base": {"window": [1, 2], "x": "a"}}
    assert parse_candidate("backout=git:feature/x") == Candidate("backout", "git", {}, "feature/x")
    (tmp_path / "smear.diff").write_text("")
    monkeypatch.chdir(tmp_path)
    smear = parse_candidate("smear=patch:smear.diff")
    assert (smear.kind, smear.source) == ("patch", str(tmp_path / "smear.diff")) and Path(smear.source).is_absolute()
    assert lr.describe() == "base.matrix_lr=0.4, base.embedding_lr=2, tokenizer.vocab_size=1088"
    both = Candidate("b", "git", {"base": {"matrix_lr": 0.4}}, "main")
    assert both.describe() == "git:main + base.matrix_lr=0.4" and both.code and not lr.code


@pytest.mark.parametrize("spec, message", [
    ("", "expected baseline, NAME=STEP.FIELD=VALUE"),
    ("wd", "expected baseline, NAME="),
    ("=base.x=1", "expected baseline"),
    ("wd=", "expected baseline"),
    ("base.matrix_lr=0.4", "'0.4' is not STEP.FIELD=VALUE"),   # an arm's override, not a candidate
    ("wd=weight_decay=0.1", "'weight_decay=0.1' is not STEP.FIELD=VALUE"),
    ("wd=base.=0.1", "'base.=0.1' is not STEP.FIELD=VALUE"),
    ("bad name=base.x=1", "a name is letters, digits"),
    ("baseline=base.x=1", "'baseline' is reserved"),
    ("x=git:", "git: needs a ref"),
    ("x=patch:/no/such.diff", "patch file '/no/such.diff' not found"),
])
def test_bad_candidates_are_one_line(spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_candidate(spec)
    assert "\n" not in str(e.value)


# ---- checkouts ------------------------------------------------------------------------------------------
def test_checkout_is_made_once_reused_and_remade_when_half_made(repo, nanorun_home):
    c = parse_candidate("code=git:gpt-code")
    assert checkout(parse_candidate("lr=base.matrix_lr=0.4"), repo=repo) == repo  # config: this tree
    path = checkout(c, repo=repo)
    sha = _git(repo, "rev-parse", "gpt-code")
    assert path == checkouts_dir() / f"git-{sha[:16]}" and (path.parent / f"{path.name}.complete").is_file()
    assert "_unused_by_anything" in (path / "core" / "gpt.py").read_text()
    assert _git(path, "rev-parse", "HEAD") == sha
    (path / "kept").write_text("")  # reused as it is, not made again
    assert checkout(Candidate("again", "git", {}, sha), repo=repo) == path and (path / "kept").exists()

    # interrupted before its marker: removed and made again
    (path.parent / f"{path.name}.complete").unlink()
    assert checkout(c, repo=repo) == path and not (path / "kept").exists()
    assert (path.parent / f"{path.name}.complete").is_file()
    assert (path / "core" / "gpt.py").read_text() == _git(repo, "show", "gpt-code:core/gpt.py") + "\n"

    with pytest.raises(ConfigError, match=r"candidate x: git ref 'no-such-branch' does not resolve to a commit"):
        checkout(parse_candidate("x=git:no-such-branch"), repo=repo)


def test_patches_apply_to_head_or_are_refused(repo, nanorun_home, tmp_path):
    diff = subprocess.run(["git", "-C", str(repo), "diff", "main", "gpt-code"], check=True, capture_output=True,
                          text=True).stdout
    (tmp_path / "good.diff").write_text(diff)
    path = checkout(parse_candidate(f"p=patch:{tmp_path / 'good.diff'}"), repo=repo)
    assert path.name.startswith(f"patch-{_git(repo, 'rev-parse', 'HEAD')[:12]}-")
    assert (path / "core" / "gpt.py").read_text() == _git(repo, "show", "gpt-code:core/gpt.py") + "\n"

    (tmp_path / "bad.diff").write_text("--- a/core/gpt.py\n+++ b/core/gpt.py\n@@ -1,1 +1,1 @@\n"
                                       "-a line core/gpt.py does not have\n+another\n")
    bad = parse_candidate(f"q=patch:{tmp_path / 'bad.diff'}")
    with pytest.raises(ConfigError, match=r"candidate q: patch .*bad.diff does not apply to [0-9a-f]{12} \(error: "):
        checkout(bad, repo=repo)
    assert [p.name for p in checkouts_dir().iterdir() if p.is_dir()] == [path.name]  # nothing half made is left


# ---- fingerprints -----------------------------------------------------------------------------------------
def test_code_candidates_fingerprint_their_own_code(repo, nanorun_home, tmp_path, shared_data):
    """Which steps a code change reaches is the code-identity closure (artifacts/code.py): core/gpt.py
    is imported by the pretraining trainer and by the CORE evaluation, not by the data or tokenizer
    stages nor by the bundle fetch. So a candidate whose only change is a function in core/gpt.py
    that nothing calls gets new pretrain and core_eval artifacts (code that runs changed) and shares
    data, tokenizer and eval_bundle with the baseline; one that edits only the docstring shares
    everything (prose is not code). Each plan of a code candidate comes from a process in its
    checkout, which in_checkout() checks imported that checkout's modules."""
    sw = preset("tiny", grid={"depth": (1,), "target_flops": (2.5e9,)}, seeds=(1, 2))
    kw = dict(store=str(tmp_path / "store"), eval_bundle=str(shared_data / "eval_bundle"), repo=repo)
    base = {r["step"]: r["ref"] for r in plan_rows(parse_candidate("baseline"), sw, **kw)}
    code = {r["step"]: r["ref"] for r in plan_rows(parse_candidate("code=git:gpt-code"), sw, **kw)}
    doc = {r["step"]: r["ref"] for r in plan_rows(parse_candidate("doc=git:gpt-doc"), sw, **kw)}
    same = {r["step"]: r["ref"] for r in plan_rows(parse_candidate("main=git:main"), sw, **kw)}
    assert list(base) == ["data", "tokenizer", "eval_bundle", "pretrain d1-F2.5e09-s1", "pretrain d1-F2.5e09-s2",
                          "core d1-F2.5e09-s1", "core d1-F2.5e09-s2"]
    assert same == base and doc == base
    assert list(code) == list(base)
    differ = sorted(step for step in base if code[step] != base[step])
    assert differ == sorted(step for step in base if step.startswith(("pretrain ", "core ")))

    # overrides on top of code: the config layer still reaches only the steps it configures
    lr_on_main = Candidate("lr", "git", {"base": {"matrix_lr": 0.4}}, "main")
    lr = {r["step"]: r["ref"] for r in plan_rows(lr_on_main, sw, **kw)}
    assert [s for s in base if lr[s] == base[s]] == ["data", "tokenizer", "eval_bundle"]


def test_the_subprocess_imports_the_checkout_not_the_installed_tree(repo, nanorun_home, tmp_path):
    """The venv has this checkout installed editable: a candidate's process, and the trainers it starts
    from another directory, must still import the candidate's checkout."""
    c = parse_candidate("code=git:gpt-code")
    sw = preset("tiny", grid={"depth": (1,)}, seeds=(1,), core=False)
    answer = in_checkout(c, "plan", sw, store=str(tmp_path / "store"), repo=repo)
    path = checkout(c, repo=repo)
    assert answer["roots"] == {pkg: str(path) for pkg in ("pipeline", "stages", "stagekit", "core")}
    probe = ("import importlib.util as u; "
             "print(*(u.find_spec(m).origin for m in ('core.gpt', 'stages.pretrain', 'stagekit.launch')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd="/", env=checkout_env(path), capture_output=True,
                         text=True, check=True).stdout.split()
    assert len(out) == 3 and all(Path(f).is_relative_to(path) for f in out), out


def test_a_candidate_whose_code_fails_fails_alone(repo, nanorun_home, tmp_path):
    """Code that does not even parse: its process fails as a whole, and each of its points is a failed
    row saying why, so a search records the candidate as failed and goes on with the others."""
    sw = preset("tiny", grid={"depth": (1,), "target_flops": (2.5e9,)}, seeds=(1, 2), core=False)
    broken = parse_candidate("broken=git:broken")
    rows = point_rows(broken, sw, store=str(tmp_path / "store"), repo=repo)
    assert [(r["point"], r["val_bpb"]) for r in rows] == [("d1-F2.5e09-s1", None), ("d1-F2.5e09-s2", None)]
    assert all(r["status"].startswith("failed: candidate broken (git:broken) failed: ") for r in rows)
    assert all("SyntaxError" in r["status"] for r in rows), rows[0]["status"]
    with pytest.raises(CandidateFailed, match="SyntaxError"):
        plan_rows(broken, sw, store=str(tmp_path / "store"), repo=repo)


# ---- nanorun compare ------------------------------------------------------------------------------------
def test_compare_arms_take_candidates_and_overrides():
    assert arm_candidate("A", []) == Candidate("baseline", "baseline")
    assert arm_candidate("B", ["base.matrix_lr=0.4"]) == Candidate("B", "config", {"base": {"matrix_lr": 0.4}})
    assert arm_candidate("B", ["lr=base.matrix_lr=0.4,base.embedding_lr=2"]).name == "lr"
    on_code = arm_candidate("B", ["x=git:main", "base.matrix_lr=0.4"])
    assert on_code == Candidate("x", "git", {"base": {"matrix_lr": 0.4}}, "main")
    with pytest.raises(ConfigError, match="arm B: one candidate per arm, got x, y"):
        arm_candidate("B", ["x=git:a", "y=base.q=1"])

    # two config arms stay one sweep with two arms (the Prefect flow's); a code arm makes it two candidates
    import cli.main as cli
    from cli.sweep_commands import build_sweep

    def sweep(*argv):
        return build_sweep(cli.build_parser(["compare"]).parse_args(["compare", "--depths", "1", *argv]), compare=True)
    assert sweep("--b", "base.matrix_lr=0.4").arms == {"A": {}, "B": {"base": {"matrix_lr": 0.4}}}
    assert sweep("--a", "wd=base.weight_decay=0.1", "--b", "lr=base.matrix_lr=0.4").arms == {
        "A": {"base": {"weight_decay": 0.1}}, "B": {"base": {"matrix_lr": 0.4}}}
    assert sweep("--b", "x=git:main").arms == {}
    with pytest.raises(ConfigError, match="candidate x: sweep tiny-compare has arms"):  # a candidate is one arm
        candidate_sweep(parse_candidate("x=git:main"), sweep("--b", "base.matrix_lr=0.4"))


def test_compare_refuses_bad_candidates_in_one_line(capsys):
    import cli.main as cli

    for argv, message in ((["--b", "x=git:a", "--b", "y=git:b"], "arm B: one candidate per arm"),
                          (["--b", "x=git:no-such-ref-anywhere"], "git ref 'no-such-ref-anywhere' does not resolve"),
                          (["--a", "baseline"], "A and B are the same recipe")):
        assert cli.main(["compare", "--depths", "1", "--seeds", "1", "2", "--no-core", *argv, "--plan"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("nanorun compare: error:") and message in err[0], err


@pytest.mark.slow
def test_compare_two_commits_in_one_command(repo, tmp_path):
    """`nanorun compare --a baseline --b doc=git:gpt-doc`, run from `repo` as a user runs it from their
    checkout: B's commit differs from A's in prose only, so its process plans the same fingerprints
    and A's two models serve both arms (two pretrain artifacts in the store, not four); the rerun is
    answered from the store."""
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(repo), "NANORUN_HOME": str(tmp_path / "home"), "NANORUN_PROGRESS_BAR": "0"}
    cmd = [sys.executable, "-m", "cli.main", "--store", str(store), "compare", "--preset", "tiny", "--depths", "1",
           "--flops", "2.5e9", "--seeds", "1", "2", "--no-core", "--a", "baseline", "--b", "doc=git:gpt-doc"]
    plan = subprocess.run([*cmd, "--plan"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "arm A = baseline: the recipe unchanged" in plan.stdout and "arm B = doc: git:gpt-doc" in plan.stdout
    assert plan.stdout.count("4 steps: 0 cached, 4 to run") == 2 and not (store / "pretrain").exists()
    first = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    assert "# Compare tiny-compare: B vs A" in out and "- **A**: baseline: the recipe unchanged" in out
    assert f"- **B**: doc: git:gpt-doc (checkout git-{_git(repo, 'rev-parse', 'gpt-doc')[:16]})" in out
    assert "| d1-F2.5e09 | val_bpb | 2 / 2 |" in out and "- d1-F2.5e09: val_bpb: no detectable difference" in out
    assert len(list((store / "pretrain").glob("d1-*"))) == 2

    t0 = time.monotonic()
    again = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == out and time.monotonic() - t0 < 20
    assert "committed" not in again.stderr
