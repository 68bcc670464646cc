"""What the two trainer stages (pretrain, sft) share: launching core.train.* under torchrun with live
progress and an attempts ledger, sealing the finished work dir as an artifact, and reading its
metrics back. Not a stage itself (stages/registry.py lists those).

Work dir of a trainer stage (= the artifact once sealed):
    run.json        the trainer's config         metrics.jsonl  the trainer's rows (start/train/val/done)
    train.log       torchrun's output            attempts.jsonl one row per launch (wall time, cost)
    checkpoints/    step_NNNNNN/ (final only)    checkpoint.json  points at the final checkpoint
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import statistics
import time
from pathlib import Path

from core.layouts import CHECKPOINT_POINTER
from core.train.config import auto_dtype
from stages.base import ConfigError, StageConfig, checkpoint_mirror, identity, progress, runtime

CURVE_POINTS = 200  # points kept in the manifest's loss curve
ATTEMPTS = "attempts.jsonl"


def stage_fields(trainer_config: type, name: str) -> type:
    """A frozen StageConfig dataclass with the trainer config's fields (core/train/config.py): its
    identity and runtime fields with their defaults and help, without its input paths (the stage
    fills those in). A stage Config derives from it, so the two cannot disagree."""
    made = {"identity": identity, "runtime": runtime}
    specs = [(f.name, f.type, made[f.metadata["kind"]](f.default, help=f.metadata["help"]))
             for f in dataclasses.fields(trainer_config) if f.metadata["kind"] != "input"]
    return dataclasses.make_dataclass(f"{name}Fields", specs, bases=(StageConfig,), frozen=True)


def trainer_values(cfg, trainer_config: type, stage: str, **paths) -> dict:
    """The trainer's config (run.json) from a stage Config and the input paths, validated by the
    trainer's own rules; a bad value is a ConfigError naming the stage field. Without paths (a stage
    Config checking itself, before any input exists) the paths stay unset: the trainer's command
    line requires them, its config's rules do not look at them."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(trainer_config)
              if f.name not in paths and f.metadata.get("kind") != "input"}
    values.update(paths)
    try:
        trainer_config(**values)
    except (TypeError, ValueError) as e:
        first = re.match(r"(\w+)=", str(e))
        named = first is not None and first.group(1) in values  # "depth=0: ..." -> "pretrain.depth=0: ..."
        raise ConfigError(f"{stage}.{e}" if named else f"{stage}: {e}") from None
    return values


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How a trainer stage launches torchrun: the same fields for every trainer (all runtime)."""
    nproc: int = runtime(1, help="processes per node (GPUs, or CPU processes with gloo)")
    nnodes: int = runtime(1, help="nodes (multi-node needs rdzv_endpoint and shared storage)")
    node_rank: int = runtime(0, help="this node's rank")
    rdzv_endpoint: str = runtime("", help="host:port of node 0's rendezvous (multi-node)")
    rdzv_id: str = runtime("nanorun", help="rendezvous id shared by the nodes of one job")
    omp_threads: int = runtime(0, help="CPU threads per process (0 = cores / nproc)")
    timeout: float = runtime(0.0, help="kill the run after this many seconds (0 = never)")
    heartbeat: float = runtime(60.0, help="log a 'still running' line after this many silent seconds")
    platform: str = identity("", help="computed when the plan is built: cpu | mps | cuda <CUDA version> "
                                      "<attention backend> (the kernels the run uses; a run elsewhere is refused)")
    resolved: tuple = runtime((), help="computed when the plan is built: each value decided for this machine, "
                                       "and why (dtype=auto, device_type, platform)")

    def resolve(self):
        """Decide now what the machine would decide at run time (device, dtype=auto, platform), so the
        fingerprint hashes what the run will use and a shared store never mixes two machines' results
        under one name; the trainer then gets explicit values. A resolved config returns itself."""
        changes, notes = {}, []
        device = self.device_type or _detect_device()
        if not self.device_type:
            changes["device_type"] = device
            notes.append(f"device_type: '' -> {device} (autodetected)")
        if self.dtype == "auto":
            name, why = auto_dtype(device, _cuda_major() if device == "cuda" else None)
            changes["dtype"] = name
            notes.append(f"dtype: auto -> {name} ({why})")
        if not self.platform:
            changes["platform"] = machine_platform(device)
            notes.append(f"platform: {changes['platform']} (this machine's kernels for {device})")
        if changes:
            return dataclasses.replace(self, **changes, resolved=tuple(self.resolved) + tuple(notes)).resolve()
        return super().resolve()

    def identity_dict(self) -> dict:
        """The recipe plus the world size (nproc x nnodes): each rank reads its own rows, so the
        process count changes which documents make up a step, not only the summation order (24 tiny
        steps on 1 vs 2 processes ended 60% apart in the weights, a seed change 140%; the device batch
        size with gradient accumulation 0.3%: docs/identity.md). nnodes x nproc of the same product
        train the same weights (tests/stages/test_multinode_netns.py), so the product is what counts."""
        return {**super().identity_dict(), "world_size": self.world_size}

    @classmethod
    def from_dict(cls, d: dict):
        """As StageConfig.from_dict; a `world_size` (an identity dict's, derived) must match nproc x nnodes."""
        d = dict(d)
        world = d.pop("world_size", None)
        cfg = super().from_dict(d)
        if world is not None and world != cfg.world_size:
            raise ConfigError(f"world_size={world!r} but nproc {cfg.nproc} x nnodes {cfg.nnodes} = {cfg.world_size}")
        return cfg

    def check_platform(self, stage: str) -> None:
        """Refuse to run on a machine whose kernels differ from the ones the plan was made for."""
        here = machine_platform(self.device_type)
        if self.platform and self.platform != here:
            raise ConfigError(f"{stage}: planned for platform {self.platform!r}, this machine is {here!r}: "
                              "plan the run where it runs (the fingerprint names the platform)")

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def check_launch(self, stage: str) -> None:
        for name in ("nproc", "nnodes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{stage}.{name}={v!r}: expected an integer >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"{stage}.node_rank={self.node_rank} must be in [0, nnodes={self.nnodes})")
        if self.nnodes > 1 and ":" not in self.rdzv_endpoint:
            raise ConfigError(f"{stage}: nnodes > 1 needs rdzv_endpoint host:port (node 0's rendezvous)")
        if self.timeout < 0 or self.heartbeat <= 0 or self.omp_threads < 0:
            raise ConfigError(f"{stage}: timeout and omp_threads must be >= 0, heartbeat > 0")
        object.__setattr__(self, "resolved", tuple(str(n) for n in self.resolved))

    def rendezvous(self):
        from stagekit.launch import Rendezvous

        return Rendezvous(self.nnodes, self.node_rank, self.rdzv_endpoint, self.rdzv_id) if self.nnodes > 1 else None


def _detect_device() -> str:
    from core.common import autodetect_device

    return autodetect_device()


def _cuda_major() -> int | None:
    import torch

    return torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else None


def machine_platform(device: str) -> str:
    """What identifies a device's kernels beyond the dtype: the CUDA build of torch (artifacts/code.py
    hashes torch's major.minor only) and the attention backend (flash-attn or SDPA, which
    NANORUN_ATTENTION and what is installed decide). CPU and MPS: their name."""
    if device != "cuda":
        return device
    import torch

    from core.attention import BACKEND

    return f"cuda {torch.version.cuda} {BACKEND}"


def launch_trainer(module: str, run_json: Path, out: Path, *, name: str, nproc: int, omp_threads: int,
                   timeout: float, heartbeat: float, extra_args: tuple = (), resumed_from: int = 0,
                   rdzv=None, log_path: Path | None = None, ledger: bool = True) -> None:
    """Run `python -m module --config run_json` under torchrun; its step lines drive progress() (at
    most once a second, always the last). Every attempt, failed ones too, appends a row to the
    attempts ledger (the cost estimate counts them all); a failure names the log and how to resume.
    With a remote store the checkpoints are mirrored to it and restored from it (checkpoint_sync.py)."""
    from core.train.telemetry import parse_step_line
    from stagekit.checkpoint_sync import CheckpointSync
    from stagekit.launch import LaunchError, launch, torchrun_cmd, worker_env
    from stagekit.nodes import NodeBeacons, cause_line

    log_path = log_path or out / "train.log"
    staging = checkpoint_mirror()
    sync = CheckpointSync(staging, out, ("metrics.jsonl", ATTEMPTS, log_path.name)) if staging else None
    if sync:
        resumed_from = max(resumed_from, sync.restore())
    last_report = [0.0]
    last_step = [resumed_from]

    def on_line(line: str) -> None:  # launch() calls it on this thread: the stage's reporter sees it
        p = parse_step_line(line)
        if p is not None:
            last_step[0] = p["step"]
        if p is None or (p["step"] < p["total"] and time.monotonic() - last_report[0] < 1.0):
            return
        last_report[0] = time.monotonic()
        progress(p["step"], p["total"], loss=p["loss"], tok_per_s=p["tok_per_s"], mfu=p["mfu"])

    cmd = torchrun_cmd(module, ["--config", str(run_json), *extra_args], nproc=nproc, rdzv=rdzv)
    env = worker_env(nproc, {"OMP_NUM_THREADS": str(omp_threads)} if omp_threads else None)
    t0, rc = time.time(), None
    if sync:
        sync.start()
    # multi-node: beacons in the shared work dir name the node that failed or went silent (nodes.py)
    beacons = NodeBeacons(out, rdzv.node_rank, rdzv.nnodes) if rdzv is not None and rdzv.nnodes > 1 else None
    try:
        with beacons or contextlib.nullcontext():
            rc = launch(cmd, log_path=log_path, env=env, timeout=timeout or None, heartbeat=heartbeat, name=name,
                        on_line=on_line).returncode
    except LaunchError as e:
        from core.checkpoint import list_checkpoints

        rc = e.returncode
        ckpts = list_checkpoints(out / "checkpoints")
        where = f" at step {last_step[0]}; last checkpoint step {ckpts[-1][0] if ckpts else 'none'}"
        lost = beacons.finish(cause_line(e.tail)) if beacons else ""  # multi-node: who failed or went silent
        lost = f"{name}: {lost}; rerun every node: " if lost else ""
        raise type(e)(f"{lost}{e}\n(full log: {log_path}; rerunning resumes from the newest checkpoint)",
                      rc, e.tail, lost + e.headline.split(" after ")[0] + where) from None
    finally:
        if ledger:
            with open(out / ATTEMPTS, "a") as f:
                f.write(json.dumps({"start": round(t0, 3), "seconds": round(time.time() - t0, 3), "returncode": rc,
                                    "nproc": nproc, "nnodes": rdzv.nnodes if rdzv else 1,
                                    "resumed_from": resumed_from}) + "\n")
        if sync:
            sync.stop(failed=rc != 0)


def seal_training_dir(out: Path, total: int) -> str:
    """Lay out a finished trainer's work dir as an artifact: keep only the final checkpoint (step
    `total`), drop interrupted saves and wandb's symlinks (latest-run, debug*.log: the store holds
    regular files only), and point checkpoint.json at the final checkpoint. Returns its path
    relative to `out`."""
    from core.checkpoint import list_checkpoints

    ckpts = list_checkpoints(out / "checkpoints")
    if not ckpts or ckpts[-1][0] != total:
        raise RuntimeError(f"the trainer exited cleanly but {out / 'checkpoints'} holds no checkpoint at step {total} "
                           f"(found {[s for s, _ in ckpts]}); see the train log in {out}")
    final_step, final_dir = ckpts[-1]
    for _, path in ckpts[:-1]:
        shutil.rmtree(path)
    for tmp in (out / "checkpoints").glob("step_*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    for p in sorted(out.rglob("*")):
        if p.is_symlink():
            p.unlink()
    rel = final_dir.relative_to(out).as_posix()
    (out / CHECKPOINT_POINTER).write_text(json.dumps({"checkpoint": rel, "step": final_step}) + "\n")
    return rel


def read_training(out: Path) -> tuple[dict, dict, list[dict], list[dict], dict]:
    """(the latest metrics row of each kind, train rows, val rows, launch attempts, the metrics both
    trainer stages report) from a finished work dir. Train and val rows are deduplicated by step: a
    resumed run repeats the steps after its checkpoint."""
    from core.train.telemetry import read_metrics

    rows = read_metrics(out / "metrics.jsonl")
    latest = {r["kind"]: r for r in rows}
    by_step = lambda kind: sorted({r["step"]: r for r in rows if r["kind"] == kind}.values(),  # noqa: E731
                                  key=lambda r: r["step"])
    train, val = by_step("train"), by_step("val")
    attempts = [json.loads(line) for line in (out / ATTEMPTS).read_text().splitlines() if line.strip()]
    steady = [r for r in train if r["step"] > 10] or train  # the first steps carry warm-up/compile time
    every = max(1, -(-len(train) // CURVE_POINTS))
    curve = [[r["step"], round(r["loss"], 5)] for r in train[::every]]
    if train and curve[-1][0] != train[-1]["step"]:
        curve.append([train[-1]["step"], round(train[-1]["loss"], 5)])
    common = {
        "final_train_loss": train[-1]["loss"] if train else None, "loss_curve": curve,
        "tok_per_s": statistics.median(r["tok_per_s"] for r in steady) if steady else None,
        "mfu_percent": statistics.median(r["mfu"] for r in steady) if steady else None,
        "training_time_s": latest.get("done", {}).get("training_time"),
        "wall_time_s": round(sum(a["seconds"] for a in attempts), 3), "attempts": len(attempts),
    }
    return latest, train, val, attempts, common
