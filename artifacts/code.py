"""Code identity: a digest of the code that produces an artifact, for its fingerprint.

    from artifacts.code import code_identity
    ci = code_identity("stages.pretrain")      # CodeIdentity(digest, modules, deps)
    ci.version("1")                            # "1+code.3fa9c2e1b07d4a55+torch2.13": what gets hashed

A stage's artifact depends on the stage module and on every project module that runs when it runs:
what it imports, transitively (lazy imports inside functions included), and the modules it starts
in other processes (a trainer launched as `python -m core.train.pretrain` is named by a string
constant equal to that module's dotted name, passed to a call: such arguments count as imports too;
a registry of names that nothing calls with, like stages/registry.py's, does not). Package
`__init__` files on the way are part of it, because importing a module runs them.

One package is left out by rule: `artifacts` (the store: where and how bytes are kept, verified and
leased, never what they are). Every stage imports it for ArtifactRef, so hashing it would turn a
fix to the S3 client or the lease into a rebuild of every artifact in every store.

Each module is hashed in a normalised form: its AST with docstrings removed (comments never reach
the AST), so that editing prose does not invalidate a two-hour GPU artifact while any change to
what runs does. Modules outside the closure (core/web.py for pretraining) cannot change it.

Dependency versions that change numerics belong in the identity too (README, "What a fingerprint
covers"): torch major.minor (kernels, default algorithms, RNG streams) wherever the closure imports
torch, and the tokenizer libraries' major.minor wherever it imports them. Patch releases are left
out: they fix bugs without changing results, and hashing them would make every artifact a miss
after a routine upgrade. Versions are read from package metadata: torch is never imported here.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution whose major.minor is part of the identity when the closure imports it
NUMERIC_DEPS = {"torch": "torch", "tokenizers": "tokenizers", "rustbpe": "rustbpe"}
NOT_CONTENT = ("artifacts",)  # top-level packages that never shape an artifact's bytes (docstring)


@dataclass(frozen=True)
class CodeIdentity:
    digest: str                          # sha256 over (module, normalised-AST hash) pairs
    modules: dict[str, str]              # module name -> 12 hex chars of its normalised hash
    deps: dict[str, str]                 # distribution -> major.minor

    def version(self, code_version: str) -> str:
        """The stage's manual code_version extended with the code digest and the dependency versions:
        the string hashed into fingerprints and recorded in manifests."""
        deps = "".join(f"+{name}{v}" for name, v in sorted(self.deps.items()))
        return f"{code_version}+code.{self.digest[:16]}{deps}"


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@lru_cache(maxsize=None)
def _parse(path: Path, mtime_ns: int, size: int) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(normalised hash, imported names, string constants) of one source file: cached in this
    process by stat, across processes by content (parsing the ~50 modules of a closure costs about
    half a second; a `--plan` should not pay it every time)."""
    source = path.read_bytes()
    key = hashlib.sha256(source).hexdigest()
    cache = _disk_cache()
    if key in cache:
        digest, imports, strings = cache[key]
        return digest, tuple(imports), tuple(strings)
    tree = _strip_docstrings(ast.parse(source, filename=str(path)))
    digest = hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()
    imports: list[str] = []
    strings: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved by the caller, who knows the package
                imports.append("." * node.level + (node.module or "") + "|" + ",".join(a.name for a in node.names))
            else:
                imports += [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call):  # launch("core.train.pretrain", ...): a module run elsewhere
            strings += [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                        and "." in a.value]
    cache[key] = [digest, imports, strings]
    global _DIRTY
    _DIRTY = True
    return digest, tuple(imports), tuple(strings)


_CACHE: dict | None = None
_DIRTY = False
_CACHE_VERSION = 1  # bump when the normalisation changes: old entries then no longer match


def _cache_path() -> Path:
    from artifacts.store import nanorun_home

    return nanorun_home() / f"code-identity-v{_CACHE_VERSION}.json"


def _disk_cache() -> dict:
    global _CACHE
    if _CACHE is None:
        try:
            _CACHE = json.loads(_cache_path().read_text())
        except (OSError, ValueError):
            _CACHE = {}
        if not isinstance(_CACHE, dict):
            _CACHE = {}
    return _CACHE


def _save_disk_cache() -> None:
    """Best effort, atomic (a rename): a reader sees the old file or the new one, never half."""
    global _DIRTY
    if not _DIRTY:
        return
    _DIRTY = False
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_disk_cache()))
        os.replace(tmp, path)
    except OSError:
        pass


def _module_file(name: str, root: Path) -> Path | None:
    parts = name.split(".")
    if not parts or not all(p.isidentifier() for p in parts):
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _packages(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _resolve_relative(spec: str, module: str, is_package: bool) -> list[str]:
    dots_mod, _, names = spec.partition("|")
    level = len(dots_mod) - len(dots_mod.lstrip("."))
    pkg = module.split(".") if is_package else module.split(".")[:-1]
    base = pkg[: len(pkg) - (level - 1)] if level > 1 else pkg
    target = ".".join(base + ([dots_mod.lstrip(".")] if dots_mod.lstrip(".") else []))
    return [target] + [f"{target}.{n}" for n in names.split(",") if n]


def closure(root_module: str, root: Path = PROJECT_ROOT) -> tuple[dict[str, Path], set[str]]:
    """({project module: file}, top-level names of the non-project modules it imports)."""
    found: dict[str, Path] = {}
    external: set[str] = set()
    todo = [root_module]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = _module_file(name, root)
        if path is None or name.split(".")[0] in NOT_CONTENT:
            continue
        found[name] = path
        todo += [p for p in _packages(name) if p not in found]
        st = path.stat()
        _, imports, strings = _parse(path, st.st_mtime_ns, st.st_size)
        for imp in imports:
            targets = _resolve_relative(imp, name, path.name == "__init__.py") if imp.startswith(".") else [imp]
            for t in targets:
                if _module_file(t, root) is not None:
                    todo.append(t)
                elif t and not t.startswith("."):
                    external.add(t.split(".")[0])
        todo += [s for s in strings if _module_file(s, root) is not None]
    return found, external


def _major_minor(dist: str) -> str | None:
    try:
        v = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    return ".".join(v.split("+")[0].split(".")[:2])


def code_identity(root_module: str, root: Path | None = None) -> CodeIdentity:
    """The identity of the code that runs for `root_module` (a dotted name under root)."""
    root = Path(root) if root is not None else PROJECT_ROOT
    files, external = closure(root_module, root)
    if root_module not in files:
        raise ValueError(f"{root_module}: no such module under {root}")
    modules = {}
    for name, path in sorted(files.items()):
        st = path.stat()
        modules[name] = _parse(path, st.st_mtime_ns, st.st_size)[0]
    _save_disk_cache()
    h = hashlib.sha256("".join(f"{n}={d}\n" for n, d in modules.items()).encode()).hexdigest()
    deps = {dist: v for mod, dist in NUMERIC_DEPS.items() if mod in external and (v := _major_minor(dist))}
    return CodeIdentity(h, {n: d[:12] for n, d in modules.items()}, deps)


def module_root(module) -> Path:
    """The project root a loaded module lives under (its top-level package's parent)."""
    depth = module.__name__.count(".") + (1 if Path(module.__file__).name == "__init__.py" else 0)
    return Path(module.__file__).resolve().parents[depth]


UNHASHED = CodeIdentity("unhashed", {}, {})


def stage_code_identity(mod) -> CodeIdentity:
    """code_identity() of a loaded stage module, read from the tree it was loaded from. A module
    built in memory (types.ModuleType in a test) has no source to hash: UNHASHED, and only its
    manual code_version speaks for its code."""
    if not getattr(mod, "__file__", None) or sys.modules.get(mod.__name__) is not mod:
        return UNHASHED
    return code_identity(mod.__name__, module_root(mod))
