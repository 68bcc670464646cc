"""The GPU kit's plan on CPU (fast, no trainer launches): the meta-device shape check and the budget
rule that decides, on the GPU, which sections run."""
from __future__ import annotations

import torch

from bench.gpu_check import GPU, Kit
from bench.gpu_plan import budget_plan, plan_lines, shape_check
from bench.gpu_stage import GPU_STAGE


def test_shape_check_counts_what_a_real_step_saves_with_flash_attention():
    """At d12 x 32 x 2048 the meta device's math-path attention saves (32, 6, 2048, 2048) fp32 score
    matrices per layer (144 GB in all, which never exist on a GPU); the estimate keeps what flash
    attention saves instead."""
    s = shape_check(12, GPU.head_dim, GPU.seq, GPU.vocab, GPU.device_batch[12])
    assert s["fp8_ok"] and s["fp8_layers"] == 72 and s["fits_80gb"], s
    assert 250e6 < s["params"] < 320e6
    assert 20 < s["activations_gb"] < 70 and s["optimizer_gb"] > 0, s


def test_budget_rule_runs_the_user_path_and_skips_what_does_not_fit(capsys):
    shapes = {d: {"flops_per_token": 6 * 300e6, "rows": GPU.device_batch[d], "seq": GPU.seq} for d in GPU.depths}
    plan = budget_plan(GPU, GPU_STAGE, shapes, 6 * 100e6, fp8=True, peak=989e12, trace={})
    assert [s.key for s in plan][:3] == ["tests", "stage", "sft_rl"] and [s.never_skip for s in plan][:4] == [True] * 3 + [False]
    assert len(plan) == 3 + 2 * 3 + 1                              # (d): 2 depths x bf16 / fp8 tensorwise / rowwise
    lines = plan_lines(plan, 400, {}, {})
    assert sum("never skipped" in x for x in lines) == 3 and "skipped: budget" in lines[-1]
    kit = Kit(GPU, dry=False, budget=400, depths=GPU.depths)      # no CUDA is touched before a section runs
    kit.estimates = {s.key: s.estimate_s for s in plan}
    kit.start -= 400 - plan[3].estimate_s + 1                       # one second short of (d)'s first config
    assert not kit.fits("train:12:bf16", "train d12 bf16")
    (why,) = kit.report["skipped"]
    assert why.startswith(f"train d12 bf16: budget: needs ~{plan[3].estimate_s:.0f} s, ") and why.endswith(" left of 400 s")
    kit.start += 2
    assert kit.fits("train:12:bf16", "train d12 bf16") and torch.device(kit.device).type == "cuda"
