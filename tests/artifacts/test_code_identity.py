"""Fingerprints cover the code that runs: its normalised AST, over the stage's import closure."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from artifacts.code import closure, code_identity

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "stagekit", "stages", "pipeline", "artifacts", "flows", "cli")


@pytest.fixture()
def tree(tmp_path) -> Path:
    """A copy of the project's packages that a test may edit."""
    root = tmp_path / "src"
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_comments_and_docstrings_do_not_count_code_does(tree):
    before = code_identity("stages.pretrain", tree)
    gpt = tree / "core" / "gpt.py"
    _edit(gpt, '"""', '"""An edited docstring line.\n')
    text = gpt.read_text()
    gpt.write_text(text.replace("\n", "  # an edited comment\n", 3))
    assert code_identity("stages.pretrain", tree).digest == before.digest
    # a change to what runs, however small: a different constant
    _edit(gpt, "1e-6", "1e-7") if "1e-6" in gpt.read_text() else _edit(gpt, "return ", "return  0 or ")
    after = code_identity("stages.pretrain", tree)
    assert after.digest != before.digest
    assert after.modules["core.gpt"] != before.modules["core.gpt"]
    assert {k for k in after.modules if after.modules[k] != before.modules[k]} == {"core.gpt"}


def test_modules_outside_the_closure_do_not_count(tree):
    before = code_identity("stages.pretrain", tree)
    assert "core.web" not in before.modules and "cli.main" not in before.modules
    with open(tree / "core" / "web.py", "a") as f:
        f.write("\nEXTRA = 1\n")
    assert code_identity("stages.pretrain", tree).digest == before.digest
    # ...while the trainer it launches as a subprocess (named by a string) does
    assert "core.train.pretrain" in before.modules
    with open(tree / "core" / "train" / "pretrain.py", "a") as f:
        f.write("\nEXTRA = 1\n")
    assert code_identity("stages.pretrain", tree).digest != before.digest


def test_closure_follows_lazy_and_relative_imports_and_records_numeric_deps(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from . import b\n    import torch\n    return b\n")
    (pkg / "sub" / "b.py").write_text("from ..c import x\n")
    (pkg / "c.py").write_text("x = 1\n")
    (pkg / "unused.py").write_text("y = 2\n")
    files, external = closure("pkg.sub.a", tmp_path)
    assert set(files) == {"pkg", "pkg.sub", "pkg.sub.a", "pkg.sub.b", "pkg.c"}
    assert "torch" in external
    ci = code_identity("pkg.sub.a", tmp_path)
    assert re.fullmatch(r"7\+code\.[0-9a-f]{16}\+torch\d+\.\d+", ci.version("7"))
    assert "torch" not in code_identity("pkg.c", tmp_path).deps


def _plan(tree: Path, home: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "NANORUN_HOME": str(home), "NANORUN_STORE": ""}
    r = subprocess.run([sys.executable, "-m", "cli.main", "speedrun", "--preset", "tiny", "--plan"],
                       cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line and not line.startswith(("STEP", " "))]
    return {row[0]: row[2] for row in rows if len(row) >= 3 and "/" in row[2]}


@pytest.mark.slow
def test_plan_fingerprints_follow_code_edits(tree, tmp_path):
    """`nanorun speedrun --preset tiny --plan`: a comment edit changes no row; a code edit in
    core/gpt.py changes exactly the rows that run it or consume what it made."""
    home = tmp_path / "home"
    before = _plan(tree, home)
    assert set(before) >= {"data", "tokenizer", "base", "sft", "export", "report"}
    gpt = tree / "core" / "gpt.py"
    gpt.write_text(gpt.read_text().replace("\n", "  # comment\n", 5))
    assert _plan(tree, home) == before
    with open(gpt, "a") as f:
        f.write("\n_EDITED = True\n")
    after = _plan(tree, home)
    changed = {step for step in before if after[step] != before[step]}
    assert {"base", "sft", "export", "report"} <= changed
    assert not {"data", "tokenizer", "eval_bundle"} & changed


def test_the_store_package_is_not_part_of_any_artifact(tree):
    before = code_identity("stages.pretrain", tree)
    assert not any(m.startswith("artifacts") for m in before.modules)
    with open(tree / "artifacts" / "store.py", "a") as f:
        f.write("\nEXTRA = 1\n")
    assert code_identity("stages.pretrain", tree).digest == before.digest


def test_registering_a_stage_leaves_every_other_artifact_as_it_was(tree):
    """The registry of stage names is not in any stage's closure (stages/__init__.py is, being the
    package's init, and is empty on purpose): adding a stage rebuilds nothing else."""
    before = {s: code_identity(f"stages.{s}", tree).digest for s in ("tokenizer", "pretrain", "report")}
    assert all("stages.registry" not in code_identity(f"stages.{s}", tree).modules for s in before)
    assert "stagekit.training" in code_identity("stages.pretrain", tree).modules  # the kit a stage uses counts
    _edit(tree / "stages" / "registry.py", '    "sweep_report": "stages.sweep_report",',
          '    "sweep_report": "stages.sweep_report",\n    "new_stage": "stages.new_stage",')
    assert {s: code_identity(f"stages.{s}", tree).digest for s in before} == before
