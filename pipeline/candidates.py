"""Candidates: named changes to a baseline recipe, as config overrides or as code (a git ref, a patch),
each run over a sweep's points with its own code so that its artifacts fingerprint that code.

    nanorun compare --preset tiny --depths 1 2 --seeds 1 2 3 --a baseline --b backout=git:my-branch
    nanorun compare --preset tiny --depths 1 2 --seeds 1 2 3 --b lr=base.matrix_lr=0.4,base.embedding_lr=2
    nanorun compare --preset tiny --depths 1 --seeds 1 2 --b smear=patch:smear.diff --plan

    c = parse_candidate("backout=git:feature-branch")     # Candidate(name, kind, overrides, source)
    rows = point_rows(c, preset("tiny", grid={"depth": (1, 2)}, seeds=(1, 2, 3)), store="/tmp/store")

Forms: `baseline` (the recipe), `NAME=STEP.FIELD=VALUE[,STEP.FIELD=VALUE...]` (config), `NAME=git:REF`
and `NAME=patch:FILE` (code). The baseline's and config candidates' points run in this process from
this checkout. A code candidate's run from a checkout of its code (checkout(): a git worktree under
$NANORUN_HOME/checkouts named by content, valid once its marker is written), in a subprocess
`python -m pipeline.candidates REQUEST ANSWER` whose working directory and PYTHONPATH are that
checkout: every project module it imports, and so the code identity of each stage it plans
(artifacts/code.py), is the candidate's. It writes into the same store, so steps whose code the
candidate leaves alone (data, tokenizer, ...) have the baseline's fingerprints and are shared, and
the others are the candidate's own and cached like any artifact (docs/research.md#candidates).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.recipes import merge, parse_set
from pipeline.sweep import Sweep, point_row, sweep_rows, sweep_steps
from stages.base import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KINDS = ("baseline", "config", "git", "patch")
CODE_KINDS = ("git", "patch")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# a comma that starts the next STEP.FIELD=VALUE (a value may hold commas: a JSON list)
_NEXT_OVERRIDE = re.compile(r",(?=\s*[A-Za-z_]\w*\.[A-Za-z_]\w*=)")
FORMS = "baseline, NAME=STEP.FIELD=VALUE[,STEP.FIELD=VALUE...], NAME=git:REF or NAME=patch:FILE"


@dataclass(frozen=True)
class Candidate:
    name: str                      # [A-Za-z0-9_.-]+, "baseline" reserved
    kind: str                      # "baseline" | "config" | "git" | "patch"
    overrides: dict = field(default_factory=dict)  # {step: {field: value}}; may be set for code kinds too
    source: str = ""               # git: the ref as given; patch: the absolute path of the patch file

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"candidate {self.name!r}: unknown kind {self.kind!r}; kinds: {', '.join(KINDS)}")
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigError(f"candidate {self.name!r}: a name is letters, digits, '_', '.' and '-'")
        if (self.name == "baseline") != (self.kind == "baseline"):
            raise ConfigError(f"candidate {self.name!r}: the name 'baseline' is reserved for the recipe itself")
        if self.kind == "baseline" and (self.overrides or self.source):
            raise ConfigError("candidate 'baseline' is the recipe unchanged: it takes no overrides and no source")
        if not isinstance(self.overrides, dict) or not all(
                isinstance(s, str) and isinstance(f, dict) for s, f in self.overrides.items()):
            raise ConfigError(f"candidate {self.name!r}: overrides are {{step: {{field: value}}}}")
        if self.kind == "config" and not any(self.overrides.values()):
            raise ConfigError(f"candidate {self.name!r}: a config candidate changes at least one field")
        if (self.kind in CODE_KINDS) != bool(self.source):
            raise ConfigError(f"candidate {self.name!r}: a source (git ref or patch file) goes with kinds git and "
                              "patch only, and they need one")

    @property
    def code(self) -> bool:
        """Whether its points run from a checkout of other code than this one."""
        return self.kind in CODE_KINDS

    def describe(self) -> str:
        """What it changes, as the command line writes it: "git:my-branch + base.matrix_lr=0.4"."""
        sets = ", ".join(f"{s}.{k}={json.dumps(v)}" for s, fs in self.overrides.items() for k, v in fs.items())
        code = f"{self.kind}:{self.source}" if self.code else ""
        return " + ".join(x for x in (code, sets) if x) or "the recipe unchanged"


def parse_candidate(spec: str) -> Candidate:
    """A candidate from its command-line form (FORMS); a bad one is a ConfigError of one line."""
    spec = str(spec).strip()
    if spec == "baseline":
        return Candidate("baseline", "baseline")
    name, eq, rest = spec.partition("=")
    name, rest = name.strip(), rest.strip()
    if not eq or not name or not rest:
        raise ConfigError(f"candidate {spec!r}: expected {FORMS}")
    if rest.startswith("git:"):
        if not rest[4:].strip():
            raise ConfigError(f"candidate {spec!r}: git: needs a ref (a branch, tag or commit)")
        return Candidate(name, "git", {}, rest[4:].strip())
    if rest.startswith("patch:"):
        path = Path(rest[6:].strip()).expanduser().absolute()
        if not rest[6:].strip() or not path.is_file():
            raise ConfigError(f"candidate {spec!r}: patch file {str(path)!r} not found")
        return Candidate(name, "patch", {}, str(path))
    items = [s.strip() for s in _NEXT_OVERRIDE.split(rest)]
    bad = [s for s in items if not re.fullmatch(r"[A-Za-z_]\w*\.[A-Za-z_]\w*=.*", s, re.S)]
    if bad:
        raise ConfigError(f"candidate {spec!r}: {bad[0]!r} is not STEP.FIELD=VALUE; expected {FORMS}")
    return Candidate(name, "config", parse_set(items))


def _is_candidate(item: str) -> bool:
    """Whether a `compare --a/--b` item is a candidate rather than an arm's STEP.FIELD=VALUE override:
    "baseline", NAME=git:/patch:, or NAME=STEP.FIELD=VALUE (a second '=')."""
    _, _, rest = item.strip().partition("=")
    return item.strip() == "baseline" or rest.startswith(("git:", "patch:")) or "=" in rest


def arm_candidate(arm: str, items: list[str]) -> Candidate:
    """One arm of a comparison from its command-line items: at most one candidate (FORMS), and any
    STEP.FIELD=VALUE overrides layered on it; no candidate is the baseline, named `arm` once overridden."""
    found = [parse_candidate(i) for i in items if _is_candidate(i)]
    if len(found) > 1:
        raise ConfigError(f"arm {arm}: one candidate per arm, got {', '.join(c.name for c in found)}")
    c = found[0] if found else Candidate("baseline", "baseline")
    sets = parse_set([i for i in items if not _is_candidate(i)])
    if not sets:
        return c
    if c.kind == "baseline":
        return Candidate(arm, "config", sets)
    return dataclasses.replace(c, overrides=merge(c.overrides, sets))


# ---- checkouts: the code a candidate runs -------------------------------------------------------------
def _git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {cwd}: {' '.join(proc.stderr.split())[:300]}")
    return proc


def _commit(repo: Path, ref: str, c: Candidate) -> str:
    proc = _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}", check=False)
    if proc.returncode != 0:
        raise ConfigError(f"candidate {c.name}: git ref {ref!r} does not resolve to a commit in {repo}")
    return proc.stdout.strip()


def checkouts_dir() -> Path:
    from artifacts.store import nanorun_home

    return nanorun_home() / "checkouts"


@contextlib.contextmanager
def _locked(path: Path):
    """One process at a time makes a given checkout (flock: released if the process dies)."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def checkout(c: Candidate, *, repo: Path | str | None = None) -> Path:
    """The source tree c's points run from: `repo` (default: this checkout) for the baseline and config
    candidates; for git and patch a worktree of `repo` under $NANORUN_HOME/checkouts named by its
    content (git: the commit; patch: HEAD's commit + the patch's sha256), made once and reused.
    It counts only once its marker (NAME.complete beside it) is written, last: a half-made one is
    removed and made again."""
    repo = Path(repo or PROJECT_ROOT).absolute()
    if not c.code:
        return repo
    if shutil.which("git") is None:
        raise ConfigError(f"candidate {c.name}: code candidates need git on PATH")
    if _git(repo, "rev-parse", "--is-inside-work-tree", check=False).returncode != 0:
        raise ConfigError(f"candidate {c.name}: {repo} is not a git checkout, so {c.kind}: has nothing to apply to")
    if c.kind == "git":
        sha = _commit(repo, c.source, c)
        name, patch_sha = f"git-{sha[:16]}", None
    else:
        sha = _commit(repo, "HEAD", c)
        patch_sha = hashlib.sha256(Path(c.source).read_bytes()).hexdigest()
        edited = _git(repo, "status", "--porcelain", "--untracked-files=no", check=False).stdout.split()
        if edited:  # the baseline runs the working tree: HEAD + patch is not the baseline + patch
            print(f"note: candidate {c.name}: the patch applies to HEAD {sha[:12]}, without the uncommitted edits "
                  f"of {repo} that the baseline runs with; commit them to compare like with like", file=sys.stderr)
        name = f"patch-{sha[:12]}-{patch_sha[:12]}"
    root = checkouts_dir()
    path, marker = root / name, root / f"{name}.complete"
    if marker.is_file() and path.is_dir():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{name}.lock"):
        if marker.is_file() and path.is_dir():  # made by another process while this one waited
            return path
        marker.unlink(missing_ok=True)
        if path.exists():  # half made: an interrupted add or apply
            shutil.rmtree(path)
        _git(repo, "worktree", "prune")  # forget worktrees whose folder is gone (the one just removed)
        _git(repo, "worktree", "add", "--detach", str(path), sha)
        if patch_sha is not None:
            check = _git(path, "apply", "--check", c.source, check=False)
            if check.returncode != 0:
                shutil.rmtree(path)
                _git(repo, "worktree", "prune")
                reason = " ".join(check.stderr.split())[:200]
                raise ConfigError(f"candidate {c.name}: patch {c.source} does not apply to {sha[:12]} ({reason})")
            _git(path, "apply", c.source)
        marker.write_text(json.dumps({"candidate": c.name, "kind": c.kind, "source": c.source, "commit": sha,
                                      "patch_sha256": patch_sha}) + "\n")
    return path


# ---- points ----------------------------------------------------------------------------------------------
def candidate_sweep(c: Candidate, sw: Sweep) -> Sweep:
    """sw with c's overrides layered on its own: the points c runs (one arm)."""
    if sw.arms:
        raise ConfigError(f"candidate {c.name}: sweep {sw.name} has arms {list(sw.arms)}; a candidate's points "
                          "are one arm, give the sweep without them")
    return dataclasses.replace(sw, overrides=merge(sw.overrides, c.overrides))


def _open_store(store: str | None):
    """The store as the CLI resolves it (a flag, else $NANORUN_STORE or nanorun.toml, else the local
    root); its url is absolute, as the subprocess, working in another directory, needs it."""
    from artifacts import open_store
    from pipeline import settings

    return open_store(settings.value("store", store))


def _absolute(value: str | None) -> str | None:
    """A local path made absolute; names and URLs as they are."""
    if value and "://" not in value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().absolute())
    return value


def local_rows(sw: Sweep, *, store: str | None, eval_bundle: str | None = None, data_source: str | None = None,
               nproc: int | None = None, run_step=None) -> list[dict]:
    """Run (or find cached) sw's points with this process's code: the rows, failed points included.
    run_step: (store, compiled plan) -> the walker's run_step (pipeline.plan.RunStep); default: each
    step through execute_step() without Prefect; a flow passes one making each step its task."""
    from pipeline.plan import compile_plan, local_step, walk

    plan = sweep_steps(sw, eval_bundle=eval_bundle, data_source=data_source, nproc=nproc)
    st = _open_store(store)
    compiled = compile_plan(plan.steps)
    outcomes = walk(compiled, (run_step or local_step)(st, compiled), max_parallel=sw.max_parallel, store=st)
    return sweep_rows(plan.points, outcomes)[0]


def local_plan(sw: Sweep, *, store: str | None, eval_bundle: str | None = None,
               data_source: str | None = None, nproc: int | None = None) -> list[dict]:
    """What running sw's points here would do: {step, stage, ref, status} per step, nothing run."""
    from pipeline.plan import plan_rows as step_rows

    steps = sweep_steps(sw, eval_bundle=eval_bundle, data_source=data_source, nproc=nproc).steps
    rows = step_rows(steps, _open_store(store))
    return [{"step": r.step, "stage": r.stage, "ref": str(r.ref), "status": r.status} for r in rows]


def point_rows(c: Candidate, sw: Sweep, *, store: str | None, eval_bundle: str | None = None,
               data_source: str | None = None, nproc: int | None = None, repo: Path | str | None = None,
               run_step=None) -> list[dict]:
    """Run (or find cached) sw's points with c's code and overrides: pipeline.sweep.point_row dicts,
    one per point; a failed point is a row with its error and does not stop the others. A code
    candidate whose process fails as a whole (its code does not import, say) gives every point that
    error. run_step: how the points of baseline and config candidates run in this process (see
    local_rows; a Prefect flow passes one returning flows.speedrun.prefect_step, to make them tasks)."""
    csw, kw = candidate_sweep(c, sw), dict(store=store, eval_bundle=eval_bundle, data_source=data_source, nproc=nproc)
    if not c.code:
        return local_rows(csw, run_step=run_step, **kw)
    try:
        return in_checkout(c, "rows", csw, repo=repo, **kw)["rows"]
    except CandidateFailed as e:
        plan = sweep_steps(csw, eval_bundle=eval_bundle, data_source=data_source, nproc=nproc)
        return [point_row(p, error=str(e)) for p in plan.points]


def plan_rows(c: Candidate, sw: Sweep, *, store: str | None, eval_bundle: str | None = None,
              data_source: str | None = None, nproc: int | None = None, repo: Path | str | None = None) -> list[dict]:
    """What point_rows would run and find cached, nothing run: {step, stage, ref, status} per step,
    fingerprinted with c's code (a code candidate's checkout is made if needed)."""
    csw, kw = candidate_sweep(c, sw), dict(store=store, eval_bundle=eval_bundle, data_source=data_source, nproc=nproc)
    if not c.code:
        return local_plan(csw, **kw)
    return in_checkout(c, "plan", csw, repo=repo, **kw)["plan"]


def compare(a: Candidate, b: Candidate, sw: Sweep, *, store: str | None, eval_bundle: str | None = None,
            data_source: str | None = None, nproc: int | None = None, repo: Path | str | None = None,
            run_step=None) -> dict:
    """Arm A = a's points, arm B = b's, over sw's grid and seeds, and the sweep_report stage's
    comparison of them (stages/sweep_report.py does the statistics): {"report": ref, "path": its
    local dir, "markdown", "failed": {point: error}}. A failed point is left out of the statistics."""
    from pipeline.execute import execute, load_stage

    kw = dict(store=store, eval_bundle=eval_bundle, data_source=data_source, nproc=nproc, repo=repo)
    rows, arms = [], []
    for arm, c in (("A", a), ("B", b)):
        rows += [{**r, "arm": arm, "point": f"{arm}-{r['point']}"} for r in point_rows(c, sw, run_step=run_step, **kw)]
        where = f" (checkout {checkout(c, repo=repo).name})" if c.code else ""
        arms.append((arm, f"{c.name}: {c.describe()}{where}"))
    st = _open_store(store)
    mod = load_stage("sweep_report")
    m = execute(mod, mod.Config.from_dict({"name": sw.name, "kind": "compare", "rows": rows, "arms": arms}), {}, st)
    path = st.materialize(m.ref)
    return {"report": str(m.ref), "path": str(path), "markdown": (path / "report.md").read_text(),
            "failed": {r["point"]: r["status"] for r in rows if r["status"] != "ok"}}


class CandidateFailed(RuntimeError):
    """A code candidate's process failed as a whole (not one point of it)."""


def checkout_env(path: Path) -> dict[str, str]:
    """The environment of a process that must run the project code in `path`: the checkout first on
    the import path. `python -m` in it puts its working directory first for that process; PYTHONPATH
    does it for the processes that one starts elsewhere (trainers); the venv's editable install of
    this checkout is a finder that Python consults after both."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(path) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def in_checkout(c: Candidate, action: str, sw: Sweep, *, store: str | None, eval_bundle: str | None = None,
                data_source: str | None = None, nproc: int | None = None, repo: Path | str | None = None) -> dict:
    """`action` ("rows" or "plan") of sw done by `python -m pipeline.candidates` in c's checkout; its
    output is passed through to stderr. Checks that the process imported the checkout's modules."""
    from pipeline import settings

    path = checkout(c, repo=repo)
    if not (path / "pipeline" / "candidates.py").is_file():
        raise ConfigError(f"candidate {c.name}: {c.kind}:{c.source} predates code candidates (no "
                          "pipeline/candidates.py in it); base it on a newer commit")
    store = _open_store(store).url
    request = {"action": action, "sweep": sw.to_dict(), "store": store,
               "eval_bundle": _absolute(eval_bundle), "data_source": _absolute(data_source), "nproc": nproc}
    env = checkout_env(path)
    config = settings.settings_file(store)  # ./nanorun.toml is read from here, not from the checkout
    if config is not None:
        env[settings.CONFIG_ENV] = str(config)
    print(f"candidate {c.name} ({c.describe()}): {action} in {path}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="nanorun-candidate-") as tmp:
        req, ans = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        req.write_text(json.dumps(request))
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.candidates", str(req), str(ans)], cwd=path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: deque[str] = deque(maxlen=20)
        for line in proc.stdout:
            sys.stderr.write(line)
            if line.strip():
                tail.append(line.strip())
        rc = proc.wait()
        last = tail[-1] if tail else f"exit status {rc}"
        if rc == 2:
            raise ConfigError(f"candidate {c.name} ({c.kind}:{c.source}): {last}")
        if rc != 0 or not ans.is_file():
            raise CandidateFailed(f"candidate {c.name} ({c.kind}:{c.source}) failed: {last}")
        answer = json.loads(ans.read_text())
    wrong = {pkg: where for pkg, where in answer["roots"].items() if Path(where).resolve() != path.resolve()}
    if wrong:
        raise RuntimeError(f"candidate {c.name}: its process imported {wrong} instead of {path}: its fingerprints "
                           "would be this checkout's code; nothing of it is used")
    return answer


def _answer(request: dict) -> dict:
    """What the subprocess computes, with this process's (the checkout's) modules."""
    import importlib

    from artifacts.code import module_root

    sw = Sweep.from_dict(request["sweep"])
    kw = {k: request[k] for k in ("store", "eval_bundle", "data_source", "nproc")}
    roots = {pkg: str(module_root(importlib.import_module(pkg))) for pkg in ("pipeline", "stages", "stagekit", "core")}
    if request["action"] == "plan":
        return {"plan": local_plan(sw, **kw), "roots": roots}
    return {"rows": local_rows(sw, **kw), "roots": roots}


def main(argv: list[str] | None = None) -> int:
    """python -m pipeline.candidates REQUEST.json ANSWER.json (run by in_checkout, in a checkout)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m pipeline.candidates REQUEST.json ANSWER.json", file=sys.stderr)
        return 2
    import logging

    # what `nanorun` prints of a stage run (cli/main.py): the caller passes it through
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("nanorun").setLevel(logging.INFO)
    try:
        answer = _answer(json.loads(Path(args[0]).read_text()))
    except ConfigError as e:
        print(" ".join(str(e).split()), file=sys.stderr)
        return 2
    Path(args[1]).write_text(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
