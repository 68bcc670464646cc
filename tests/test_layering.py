"""The shape of the code base, one floor per folder, each importing only the floors below it:

    cli/  ->  flows/  ->  pipeline/  ->  stages/  ->  stagekit/  ->  core/, artifacts/

cli/ the `nanorun` command modules; flows/ the Prefect flows and their one task; pipeline/ the
recipes compiled into plans and the executor that runs them (no Prefect); stages/ one module per
stage plus their contract (stages/base.py); stagekit/ what stages share (launching trainers,
fetching, task sources, report content, statistics), which may use the contract and nothing else
of stages/; core/ plain PyTorch. No stage imports another stage."""
from __future__ import annotations

import ast
from pathlib import Path

from stages.registry import STAGE_MODULES

REPO = Path(__file__).resolve().parents[1]
FLOORS = ["cli", "flows", "pipeline", "stages", "stagekit", "core"]  # highest first; artifacts sits beside core
PROJECT = set(FLOORS) | {"artifacts"}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def _modules(folder: str):
    for path in sorted((REPO / folder).rglob("*.py")):
        yield path, _imports(path)


def test_each_floor_imports_only_the_floors_below():
    for i, floor in enumerate(FLOORS):
        above = set(FLOORS[:i + 1]) - {floor}
        for path, imports in _modules(floor):
            bad = sorted(m for m in imports if m.split(".")[0] in above)
            if floor == "stagekit":  # the stage contract (StageConfig, progress, ConfigError) is allowed
                bad = [m for m in bad if m != "stages" and not m.startswith("stages.base")]
            assert not bad, f"{path.relative_to(REPO)} imports {bad}, a floor above {floor}/"


def test_artifacts_is_below_every_floor_but_core():
    for path, imports in _modules("artifacts"):
        bad = sorted(m for m in imports if m.split(".")[0] in set(FLOORS) - {"core"})
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_prefect_only_in_flows_and_cli():
    for floor in ("pipeline", "stages", "stagekit", "core", "artifacts"):
        for path, imports in _modules(floor):
            assert not any(m.split(".")[0] == "prefect" for m in imports), f"{path.relative_to(REPO)} imports prefect"


def test_no_stage_imports_another_stage():
    stage_modules = set(STAGE_MODULES.values())
    for module in STAGE_MODULES.values():
        imports = _imports(REPO / (module.replace(".", "/") + ".py"))
        assert not (imports & (stage_modules - {module})), f"{module} imports {sorted(imports & stage_modules)}"


def test_stages_holds_only_stages_and_their_contract():
    registered = {m.split(".")[1] for m in STAGE_MODULES.values()}
    extra = sorted(p.stem for p in (REPO / "stages").glob("*.py"))
    extra = [n for n in extra if n not in registered | {"__init__", "base", "registry"}]
    assert not extra, f"stages/ holds modules that are not stages: {extra} (shared code goes in stagekit/)"
    assert not [p for p in (REPO / "stages").iterdir() if p.is_dir() and p.name != "__pycache__"]


def test_core_imports_nothing_above_it_nor_scipy():
    # core/ runs on the GPU image (torch, numpy, pyarrow, tokenizers...; no scipy) and under torchrun,
    # where the orchestration layers must not load: statistics live in stagekit/stats.py.
    banned = PROJECT - {"core"} | {"scipy", "prefect"}
    for path, imports in _modules("core"):
        bad = sorted(i for i in imports if i.split(".")[0] in banned)
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_no_module_over_600_lines():
    for folder in sorted(PROJECT | {"bench", "deploy", "scripts"}):
        for path in sorted((REPO / folder).rglob("*.py")):
            n = len(path.read_text().splitlines())
            assert n <= 600, f"{path.relative_to(REPO)}: {n} lines (split it by concern)"
