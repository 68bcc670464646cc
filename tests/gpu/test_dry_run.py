"""The GPU kit's CPU dry run, end to end through scripts/gpu_check.sh (CI runs this so the kit cannot
rot between GPU sessions): the GPU budget plan prints first, every section runs at tiny sizes (the
stage path under torchrun included), the CUDA tests skip with their reason, and the last line of
stdout is the JSON report."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.gpu_check import REFERENCE, reference_tok_s
from core.scaling import derive
from core.train.config import PretrainConfig
from tests.conftest import REPO

GPU_TESTS = {"test_backend_matches_naive_reference", "test_flash_matches_sdpa", "test_bf16_step_tracks_fp32",
             "test_fp8_linear_matches_bf16", "test_fp8_training_tracks_bf16", "test_compiled_training_step_matches_eager",
             "test_fp8_compiled_training_step",
             "test_distributed_optimizer_on_nccl_one_process", "test_kv_cache_generation_matches_uncached_forward",
             "test_export_bundle_round_trip", "test_fused_loss_matches_the_plain_loss"}


def kit(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("NANORUN_GPU_TESTS_DEVICE", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_cpu_dry_run_end_to_end():
    proc, r = kit("--cpu-dry-run")
    assert proc.returncode == 0 and r["ok"], (r.get("errors"), proc.stderr[-3000:])
    assert r["kit"] == "nanorun-gpu-check" and r["mode"] == "cpu-dry-run" and r["errors"] == []
    assert r["env"]["device"] == "cpu" and r["env"]["attention_backend"] == "sdpa" and r["env"]["fp8"] is False
    tests = r["tests"]
    assert tests["passed"] == tests["failed"] == tests["errors"] == 0 and tests["skipped"] == len(tests["cases"])
    assert {name.split("::")[1].split("[")[0] for name in tests["cases"]} == GPU_TESTS
    assert all(outcome.startswith("skipped: needs a CUDA GPU") for outcome in tests["cases"].values())
    assert [(t["depth"], t["precision"]) for t in r["train"]] == [(2, "fp32"), (3, "fp32")]
    for t in r["train"]:
        assert t["tok_s"] > 0 and t["mfu_percent"] > 0 and t["step_ms"] > 0 and 5 < t["loss_last"] < 8, t
        assert t["reference_tok_s"] is None and "no reference figure" in t["reference_source"]
    rows = r["infer"]["rows"]
    assert [x["batch_size"] for x in rows] == [1, 8, 32] and r["infer"]["prefill"][0]["prompt_tokens"] == 32
    assert all(x["ttft_s"] > 0 and x["tpot_s"] > 0 and x["decode_steps"] == 7 for x in rows), rows
    # the GPU plan, printed first: (a)-(c) never skipped, d12/d20 shapes checked on the meta device
    sections = r["plan"]["sections"]
    assert [s["key"] for s in sections[:3]] == ["tests", "stage", "sft_rl"] and all(s["never_skip"] for s in sections[:3])
    assert not any(s["never_skip"] for s in sections[3:]) and sections[-1]["key"] == "infer"
    assert all(s["estimate_s"] > 0 for s in sections)
    for depth, shape in r["plan"]["shapes"].items():
        assert shape["fp8_ok"] and shape["fits_80gb"] and shape["fp8_layers"] == 6 * int(depth), shape
    assert r["plan"]["trace_s"]["12"] > 0
    printed = proc.stdout.splitlines()
    plan_at = next(i for i, line in enumerate(printed) if "GPU budget plan" in line)
    assert plan_at < next(i for i, line in enumerate(printed) if "pytest -m gpu" in line and "skips" in line)
    assert sum("never skipped" in line for line in printed) == 3
    # (b) the pretrainer under torchrun: SIGTERM, a checkpoint, and a bitwise resume on CPU
    stage = r["stage"]
    assert stage["tokens_match"] and stage["max_rel_loss_diff_after_resume"] == 0 == stage["max_rel_weight_diff"]
    assert 6 <= stage["resumed_from"] < 12 and stage["termed_exit"] != 0, stage
    # (c) one SFT and one RL step from the pretrained checkpoint
    assert 0 < r["sft_rl"]["sft_loss"] < 10 and 0 <= r["sft_rl"]["rl_reward"] <= 1, r["sft_rl"]
    skipped = " ".join(r["skipped"])
    assert "fp8 training throughput: needs CUDA" in skipped and "CUDA-only paths" in skipped
    assert "[gpu-check] skipped fp8 training throughput" in proc.stdout   # said as it runs, not only in the JSON


def test_without_a_gpu_the_full_run_refuses_in_its_json_line():
    proc, r = kit("--only", "infer")
    assert proc.returncode == 1 and r["ok"] is False and r["mode"] == "gpu"
    assert r["errors"] == ["RuntimeError: no CUDA GPU is visible: run on a GPU node, or pass --cpu-dry-run"]


def test_reference_figures_follow_the_published_numbers():
    """d12: 41% MFU on H100 (~534k tok/s/GPU with our FLOPs per token); d20: the d24 record's 50% MFU."""
    d12, d20 = (derive(PretrainConfig(depth=d)).flops_per_token for d in (12, 20))
    assert 5.2e5 < reference_tok_s(12, "bf16", d12)[0] < 5.5e5
    assert 1.65e5 < reference_tok_s(20, "bf16", d20)[0] < 1.75e5
    assert reference_tok_s(20, "fp8", d20)[0] == reference_tok_s(20, "bf16", d20)[0] * 1.17
    assert all("nanochat dev/" in source for _, _, source in REFERENCE.values())
