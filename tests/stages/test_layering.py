"""The shape of the code base: no stage imports another stage (shared pieces live in non-stage
modules: core/layouts.py, stages/sources.py, stages/reporting.py, stages/training.py), and stages
never import the Prefect layer (flows/)."""
from __future__ import annotations

import ast
from pathlib import Path

from stages import STAGE_MODULES

REPO = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_no_stage_imports_another_stage_or_flows():
    stage_modules = set(STAGE_MODULES.values())
    for name, module in STAGE_MODULES.items():
        imports = _imports(REPO / (module.replace(".", "/") + ".py"))
        assert not (imports & (stage_modules - {module})), f"{module} imports {sorted(imports & stage_modules)}"
        assert not any(i == "flows" or i.startswith(("flows.", "prefect")) for i in imports), module


def test_core_imports_nothing_above_it_nor_scipy():
    # core/ runs on the GPU image (torch, numpy, pyarrow, tokenizers...; no scipy) and under torchrun,
    # where the orchestration layers must not load: statistics live in stages/stats.py.
    banned = ("scipy", "prefect", "stages", "flows", "artifacts")
    for path in sorted((REPO / "core").rglob("*.py")):
        bad = sorted(i for i in _imports(path) if i.split(".")[0] in banned)
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"
