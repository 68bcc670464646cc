"""The GPU kit's stage path: the trainers launched as the stages launch them (torchrun -> core.train.*),
on inputs made here (a GPU node has no shared data and no network): random-word parquet shards and
the byte-level tokenizer of tests/gpu/_helpers.py.

    python -m bench.gpu_check --only stage            # on a GPU node: (b) and (c) of the kit
    python -m bench.gpu_check --cpu-dry-run --only stage

(b) pretrain: the same recipe three times. `full` runs all steps; `termed` gets SIGTERM (to its
    process group, as stagekit/launch.py stops a run) once it has logged step `term_after`, must save
    a checkpoint at the next step boundary and exit (128+15; torchrun reports 1); the rerun resumes.
    After the resume, every step's loss and token count and the final weights are compared with
    `full`: bitwise on CPU (fp32, deterministic); on CUDA within `GPU_*_TOLERANCE`, because the
    attention backward accumulates with atomics (last-bit nondeterminism that bf16 Muon grows), so two
    uninterrupted GPU runs differ by as much. The token counts must match exactly everywhere.
(c) one SFT step from `full`'s checkpoint on a conversations mixture, then one RL step (sampling
    through core.engine, the policy-gradient update) from the SFT checkpoint on GSM8K-format files.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core.tokenizer import SPECIAL_TOKENS

REPO = Path(__file__).resolve().parents[1]
BYTE_VOCAB = 256 + len(SPECIAL_TOKENS)     # tests/gpu/_helpers.byte_tokenizer: the bytes and the specials
# On CUDA, relative: per-step loss, and each final weight tensor (norm of the difference / norm). Output
# projections start at zero, so their weights are nothing but Muon updates, each of which the bf16
# Newton-Schulz already moves by ~1% between two runs: 5% leaves room for 16 of them; a wrong resume
# (another step's weights, data or LR) is off by far more.
GPU_LOSS_TOLERANCE, GPU_WEIGHT_TOLERANCE = 2e-2, 5e-2


@dataclass(frozen=True)
class StageSizes:
    depth: int
    head_dim: int
    seq: int
    device_batch: int
    steps: int
    save_every: int
    term_after: int           # SIGTERM once this step is logged (after the save_every checkpoint)
    rl_new_tokens: int


GPU_STAGE = StageSizes(depth=12, head_dim=128, seq=2048, device_batch=16, steps=30, save_every=10, term_after=14,
                       rl_new_tokens=64)
DRY_STAGE = StageSizes(depth=2, head_dim=64, seq=64, device_batch=2, steps=12, save_every=4, term_after=6,
                       rl_new_tokens=16)

WORDS = ("the of and to in is was for on with as by at from that this it an be are were which one two three "
         "model data train river stone light city music water number seven eleven green north winter").split()


def make_inputs(root: Path, sizes: StageSizes) -> dict:
    """Parquet shards (train/, val/) with enough random-word text for the run, a tokenizer dir, a chat
    file and GSM8K-format files: {data, tokenizer, mixture, gsm8k_train, gsm8k_test}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.gpu._helpers import byte_tokenizer

    rng = random.Random(0)
    need_bytes = 2 * sizes.steps * sizes.device_batch * (sizes.seq + 1)   # byte-level: ~1 token a byte
    for split, n_bytes in (("train", need_bytes), ("val", need_bytes // 8)):
        docs, total = [], 0
        while total < n_bytes:
            doc = " ".join(rng.choices(WORDS, k=rng.randint(50, 400))) + "."
            docs.append(doc)
            total += len(doc)
        (root / "data" / split).mkdir(parents=True)
        pq.write_table(pa.table({"text": pa.array(docs, pa.string())}), root / "data" / split / "shard_00000.parquet",
                       row_group_size=256)
    byte_tokenizer().save(root / "tok")
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps([{"role": "user", "content": f"What is {a} + {a}?"},
                                        {"role": "assistant", "content": f"{a} + {a} = {2 * a}."}]) + "\n"
                            for a in range(32)))
    mixture = {"train": [{"task": "conversations", "source": "chat", "stop": 24}],
               "val": [{"task": "conversations", "source": "chat", "start": 24}], "seed": 42,
               "paths": {"chat": str(chat)}}
    (root / "mixture.json").write_text(json.dumps(mixture))
    for split in ("train", "test"):
        rows = [json.dumps({"question": f"What is {a} + 3?", "answer": f"{a} + 3 = <<{a}+3={a + 3}>>{a + 3}\n#### {a + 3}"})
                for a in range(8)]
        (root / f"gsm8k_{split}.jsonl").write_text("\n".join(rows) + "\n")
    return {"data": root / "data", "tokenizer": root / "tok", "mixture": root / "mixture.json",
            "gsm8k_train": root / "gsm8k_train.jsonl", "gsm8k_test": root / "gsm8k_test.jsonl"}


def torchrun(module: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=1",
            "-m", module, *flags]


def launch(cmd: list[str], log: Path, timeout_s: float, term_after_step: int | None = None) -> tuple[int, float]:
    """Run cmd in its own process group with output to log: (exit status, seconds). With
    term_after_step, SIGTERM the group once the log shows that step."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if term_after_step is not None:
                marker = f"step {term_after_step:05d}/"
                while marker not in log.read_text(errors="replace"):
                    if proc.poll() is not None:
                        raise RuntimeError(f"exited ({proc.returncode}) before step {term_after_step}: "
                                           f"{tail(log)}")
                    if time.perf_counter() - t0 > timeout_s:
                        raise TimeoutError(f"no step {term_after_step} after {timeout_s:.0f} s: {tail(log)}")
                    time.sleep(0.05)
                os.killpg(proc.pid, signal.SIGTERM)
            rc = proc.wait(timeout=max(timeout_s - (time.perf_counter() - t0), 30))
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return rc, time.perf_counter() - t0


def tail(log: Path, n: int = 600) -> str:
    return " ".join(log.read_text(errors="replace")[-n:].split())


def checked(rc: int, log: Path, what: str, want: int = 0) -> None:
    if rc != want:
        raise RuntimeError(f"{what} exited {rc} (expected {want}): {tail(log)}")


def train_rows(out: Path) -> dict[int, dict]:
    from core.train.telemetry import read_metrics
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"}


def newest_checkpoint(out: Path) -> Path:
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    if not ckpts:
        raise RuntimeError(f"no checkpoint in {out / 'checkpoints'}")
    return ckpts[-1]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from core.checkpoint import load_model
    model, _ = load_model(ckpt, "cpu")
    return {k: v.float() for k, v in model.state_dict().items()}


def pretrain_resume(root: Path, inputs: dict, sizes: StageSizes, cuda: bool, timeout_s: float) -> dict:
    """(b): full run, SIGTERM + resume, compare. Returns the section's record; raises on a failure."""
    z = sizes
    flags = ["--data-dir", str(inputs["data"]), "--tokenizer-dir", str(inputs["tokenizer"]), "--depth", str(z.depth),
             "--head-dim", str(z.head_dim), "--max-seq-len", str(z.seq), "--device-batch-size", str(z.device_batch),
             "--total-batch-size", str(z.device_batch * z.seq), "--num-iterations", str(z.steps),
             "--warmup-steps", "2", "--eval-every", "-1", "--sample-every", "-1", "--core-metric-every", "-1",
             "--save-every", str(z.save_every), "--loader-buffer", "64", "--wandb", "disabled"]
    if not cuda:
        flags += ["--device-type", "cpu", "--dtype", "float32"]
    full, termed = root / "full", root / "termed"
    record = {"depth": z.depth, "seq": z.seq, "steps": z.steps, "launcher": "torchrun --nproc_per_node=1"}
    rc, record["full_s"] = launch(torchrun("core.train.pretrain", "--out", str(full), *flags), root / "full.log", timeout_s)
    checked(rc, root / "full.log", "pretrain (uninterrupted)")
    rc, record["termed_s"] = launch(torchrun("core.train.pretrain", "--out", str(termed), *flags), root / "termed.log",
                                    timeout_s, term_after_step=z.term_after)
    log = (root / "termed.log").read_text(errors="replace")
    if "stopped by SIGTERM" not in log:
        raise RuntimeError(f"SIGTERM after step {z.term_after} did not stop the run with a checkpoint: {tail(root / 'termed.log')}")
    record["termed_exit"] = rc                       # torchrun reports its worker's 128+15 as a failure
    saved = int(newest_checkpoint(termed).name[5:])
    record["resumed_from"] = saved
    if not z.term_after <= saved < z.steps:
        raise RuntimeError(f"SIGTERM after step {z.term_after} saved step {saved}")
    rc, record["resume_s"] = launch(torchrun("core.train.pretrain", "--out", str(termed), *flags), root / "resume.log",
                                    timeout_s)
    checked(rc, root / "resume.log", "pretrain (resume)")
    want, got = train_rows(full), train_rows(termed)
    if sorted(got) != list(range(1, z.steps + 1)) or sorted(want) != sorted(got):
        raise RuntimeError(f"logged steps differ: full {sorted(want)}, termed+resumed {sorted(got)}")
    bad_tokens = [s for s in got if got[s]["tokens"] != want[s]["tokens"]]
    loss_diff = max(abs(got[s]["raw_loss"] - want[s]["raw_loss"]) / abs(want[s]["raw_loss"]) for s in got if s > saved)
    a, b = weights(newest_checkpoint(termed)), weights(newest_checkpoint(full))
    # matrices only: AdamW's first steps on the zero-initialised scalar gains are sign-like, so on
    # CUDA they differ relatively more without saying anything about the resume (bitwise on CPU anyway)
    weight_diff = max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in b
                      if b[k].dim() >= 2 or not cuda)
    record.update(tokens_match=not bad_tokens, max_rel_loss_diff_after_resume=loss_diff, max_rel_weight_diff=weight_diff,
                  loss_first=want[1]["raw_loss"], loss_last=want[z.steps]["raw_loss"],
                  loss_tolerance=GPU_LOSS_TOLERANCE if cuda else 0.0,
                  weight_tolerance=GPU_WEIGHT_TOLERANCE if cuda else 0.0)
    if bad_tokens:
        raise RuntimeError(f"token counts differ after the resume at steps {bad_tokens}")
    if loss_diff > record["loss_tolerance"] or weight_diff > record["weight_tolerance"]:
        raise RuntimeError(f"the resumed run drifted from the uninterrupted one: loss {loss_diff:.2e}, weights "
                           f"{weight_diff:.2e} (allowed {record['loss_tolerance']}, {record['weight_tolerance']})")
    return record


def sft_and_rl(root: Path, inputs: dict, sizes: StageSizes, cuda: bool, timeout_s: float) -> dict:
    """(c): one SFT step from the pretrained checkpoint, one RL step from the SFT one."""
    z = sizes
    base = newest_checkpoint(root / "full")
    dev = [] if cuda else ["--device-type", "cpu", "--dtype", "float32"]
    common = ["--tokenizer-dir", str(inputs["tokenizer"]), "--num-iterations", "1", "--save-every", "-1",
              "--wandb", "disabled", *dev]
    record = {}
    sft_flags = ["--base-checkpoint", str(base), "--mixture", str(inputs["mixture"]), "--out", str(root / "sft"),
                 "--device-batch-size", "2", "--total-batch-size", str(2 * z.seq), "--eval-every", "-1",
                 "--eval-tokens", str(2 * z.seq), *common]
    rc, record["sft_s"] = launch(torchrun("core.train.sft", *sft_flags), root / "sft.log", timeout_s)
    checked(rc, root / "sft.log", "SFT")
    rl_flags = ["--base-checkpoint", str(newest_checkpoint(root / "sft")), "--train-file", str(inputs["gsm8k_train"]),
                "--test-file", str(inputs["gsm8k_test"]), "--out", str(root / "rl"), "--examples-per-step", "2",
                "--num-samples", "2", "--device-batch-size", "2", "--max-new-tokens", str(z.rl_new_tokens),
                "--eval-examples", "2", "--eval-samples", "2", *common]
    rc, record["rl_s"] = launch(torchrun("core.train.rl", *rl_flags), root / "rl.log", timeout_s)
    checked(rc, root / "rl.log", "RL")
    from core.train.telemetry import read_metrics
    sft_rows = [r for r in read_metrics(root / "sft" / "metrics.jsonl") if r.get("kind") == "train"]
    rl_rows = [r for r in read_metrics(root / "rl" / "metrics.jsonl") if r.get("kind") == "rollout"]
    if len(sft_rows) != 1 or len(rl_rows) != 1:
        raise RuntimeError(f"expected one SFT train row and one RL rollout row, got {len(sft_rows)} and {len(rl_rows)}")
    record.update(sft_loss=sft_rows[0]["raw_loss"], rl_reward=rl_rows[0].get("reward"),
                  rl_sequence_length=rl_rows[0].get("sequence_length"))
    return record
