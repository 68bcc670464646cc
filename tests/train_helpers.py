"""Inputs and launch helpers for the pretrain tests (tests/core/test_pretrain_loop.py and
tests/stages/test_pretrain_stage.py): a data dir that links the real corpus shards (never copied
into the repo), a small real tokenizer, and a way to run the real trainer as a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]



def tiny_flags() -> list[str]:
    """The `tiny` preset of stages/pretrain.py as trainer flags: depth 2, 24 steps of 256 tokens (2
    micro-batches of 2 x 64 on one process, 1 on two), a checkpoint and a val eval every 8 steps."""
    from core.train.pretrain import PretrainConfig
    from stages.pretrain import PRESETS

    known = {f.name for f in fields(PretrainConfig)}
    flags = []
    for key, value in PRESETS["tiny"].items():
        if key not in known:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def make_data_dir(root: Path, corpus: Path, train_shards: int = 2, docs: int = 96) -> Path:
    """root/train/ and root/val/ in the data_shards layout, holding the first `docs` documents of the
    first `train_shards` corpus shards and of the last one (validation). Real text, small shards:
    the loader tokenizes a whole row group at a time, and a full 3 MB shard per launch would be most
    of a test's time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = sorted(Path(corpus).glob("shard_*.parquet"))
    for split, picked in (("train", shards[:train_shards]), ("val", shards[-1:])):
        (root / split).mkdir(parents=True)
        for f in picked:
            texts = pq.read_table(f, columns=["text"]).column("text").to_pylist()[:docs]
            pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), root / split / f.name,
                           row_group_size=1024)
    return root


def store_with_data_and_tokenizer(root: Path, corpus: Path, docs: int = 96):
    """A local store under root holding a data_shards artifact (make_data_dir's small real shards,
    flattened into one source directory) and a 1024-token tokenizer artifact trained on it by the
    tokenizer stage: (store, data manifest, tokenizer manifest)."""
    from artifacts import open_store
    from stages import data_shards, tokenizer
    from pipeline.execute import execute

    sliced = make_data_dir(root / "sliced", corpus, docs=docs)
    flat = root / "corpus"
    flat.mkdir()
    for f in sorted(sliced.glob("*/shard_*.parquet")):
        f.rename(flat / f.name)
    store = open_store(str(root / "store"), index=False)
    data = execute("data_shards", data_shards.Config(source=str(flat)), {}, store)
    tok = execute("tokenizer", tokenizer.Config(vocab_size=1024, threads=1), {"data": data.ref}, store)
    return store, data, tok


def make_tokenizer_dir(root: Path, corpus: Path, vocab_size: int = 1024) -> Path:
    from tests._tok import small_tokenizer

    small_tokenizer(str(corpus), vocab_size).save(root)
    return root


def trainer_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    # one thread per process: the test runs are sequential but the CI box is shared, and an
    # oversubscribed 2-thread OpenMP pool can be 10x slower than one thread
    env["OMP_NUM_THREADS"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def trainer_cmd(data: Path, tok: Path, out: Path, *flags: str, nproc: int = 0) -> list[str]:
    """`python -m core.train.pretrain ...`, or under torchrun with nproc processes."""
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "core.train.pretrain", "--data-dir", str(data), "--tokenizer-dir", str(tok),
            "--out", str(out), *tiny_flags(), *flags]


def run_trainer(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=timeout)


def kill_after(cmd: list[str], marker: Path, log_path: Path, timeout: float = 240) -> int:
    """Start a trainer, SIGKILL it as soon as `marker` exists (its first checkpoint's meta.json);
    returns its exit status. Fails with the log's tail if it exits first or never gets there."""
    import signal
    import time

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=trainer_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while not marker.exists():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, f"no {marker} after {timeout} s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        return proc.wait()


def final_state(out: Path, step: int) -> tuple[dict, dict]:
    d = out / "checkpoints" / f"step_{step:06d}"
    return (torch.load(d / "model.pt", weights_only=True), torch.load(d / "optim_rank0.pt", weights_only=True))


# Runtime fields must keep the final weights within this relative distance (docs/identity.md): the
# tiny recipe's 24 steps with 4 instead of 2 gradient-accumulation micro-batches ended 0.3% apart
# (fp32), a 5% larger matrix LR 1.5%, another seed 140%, two processes instead of one 60%.
RUNTIME_TOLERANCE = 1e-2


def weights_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over every tensor of two model state dicts."""
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)
    return (num / sum((a[k].double() ** 2).sum() for k in a)).sqrt().item()


def assert_states_equal(a, b, where: str = "") -> None:
    """Bitwise equality of nested state dicts (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max abs diff {(a.double() - b.double()).abs().max().item():.3e}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_states_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
