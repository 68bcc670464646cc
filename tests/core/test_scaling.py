"""The depth dial reproduces the reference table exactly (docs/reference.md#the-depth-dial)."""
from __future__ import annotations

import math

import pytest
import torch

from core.gpt import GPT, GPTConfig
from core.scaling import B_REF, derive, model_dims

# depth: (model_dim, heads, total params (M), scaling params (M), target tokens (B), batch, iterations)
REFERENCE = {
    12: (768, 6, 286, 110, 1.32, 524_288, 2_520),
    20: (1280, 10, 897, 435, 5.22, 1_048_576, 4_980),
    24: (1536, 12, 1384, 730, 8.76, 1_048_576, 8_352),
    26: (1664, 13, 1682, 918, 11.0, 1_048_576, 10_510),
}


@pytest.mark.parametrize("depth", sorted(REFERENCE))
def test_reference_depth_table(depth):
    dim, heads, total_m, scaling_m, tokens_b, batch, iters = REFERENCE[depth]
    plan = derive(depth)
    assert (plan.n_embd, plan.n_head, plan.n_kv_head) == (dim, heads, heads)
    assert round(plan.num_params / 1e6) == total_m
    assert round(plan.num_scaling_params / 1e6) == scaling_m
    assert round(plan.target_tokens / 1e9, 2 if tokens_b < 10 else 1) == tokens_b
    assert plan.total_batch_size == batch and plan.batch_size_source == "auto"
    assert plan.num_iterations == iters and plan.horizon_source == "ratio"
    assert plan.total_tokens == iters * batch


def test_reference_weight_decay():
    assert derive(12).weight_decay == pytest.approx(0.28)
    assert round(derive(24).weight_decay, 3) == 0.060
    # WD = 0.28 * sqrt(B/B_REF) * D_REF / target
    p = derive(20)
    assert p.weight_decay == pytest.approx(0.28 * math.sqrt(p.total_batch_size / B_REF) * p.ref_tokens / p.target_tokens,
                                           rel=1e-6)


def test_speedrun_d24_ratio8():
    plan = derive(24, target_param_data_ratio=8)
    assert plan.num_iterations == 5_568
    assert plan.total_batch_size == 1_048_576


def test_exact_d12_numbers():
    plan = derive(12)
    assert plan.num_scaling_params == 110_100_912
    assert plan.num_params == 286_261_730
    assert plan.target_tokens == 12 * 110_100_912
    assert plan.ref_tokens == plan.target_tokens
    assert plan.batch_lr_scale == 1.0 and plan.dmodel_lr_scale == 1.0
    lrs = plan.optimizer_lrs()
    assert lrs == dict(lm_head_lr=0.008, wte_lr=0.3, value_embeds_lr=0.15, resid_lr=0.005, x0_lr=0.5,
                       smear_lr=0.2, matrix_lr=0.02, weight_decay=pytest.approx(0.28))


def test_lr_scaling_with_batch_and_width():
    plan = derive(20)
    b, s = math.sqrt(2.0), (1280 / 768) ** -0.5
    assert plan.batch_lr_scale == pytest.approx(b)
    assert plan.lm_head_lr == pytest.approx(0.008 * b * s)
    assert plan.wte_lr == pytest.approx(0.3 * b * s)
    assert plan.value_embeds_lr == pytest.approx(0.15 * b * s)
    assert plan.matrix_lr == pytest.approx(0.02 * b)
    assert plan.resid_lr == pytest.approx(0.005 * b) and plan.x0_lr == pytest.approx(0.5 * b)
    assert plan.smear_lr == 0.2


def test_horizon_precedence():
    base = derive(12)
    it = derive(12, num_iterations=100, target_flops=1e18)
    assert it.num_iterations == 100 and it.horizon_source == "num_iterations"
    # batch size and weight decay still follow the ratio-based target, as in the reference
    assert it.total_batch_size == base.total_batch_size and it.weight_decay == base.weight_decay
    fl = derive(12, target_flops=1e18)
    assert fl.horizon_source == "target_flops"
    assert fl.num_iterations == round(1e18 / (fl.flops_per_token * fl.total_batch_size))
    given = derive(12, total_batch_size=2 ** 18)
    assert given.batch_size_source == "given" and given.num_iterations == base.target_tokens // 2 ** 18


def test_plan_counts_match_a_real_model():
    plan = derive(4, aspect_ratio=64, head_dim=64, max_seq_len=256, vocab_size=1000)
    cfg = plan.model_config()
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == plan.num_params
    assert model.num_scaling_params() == plan.num_scaling_params
    assert model.estimate_flops() == plan.flops_per_token


def test_model_dims_round_up_to_head_dim():
    assert model_dims(4, 64, 128) == (256, 2)
    assert model_dims(3, 64, 128) == (256, 2)
    assert model_dims(26, 64, 128) == (1664, 13)


def test_schedules():
    plan = derive(12, num_iterations=1000)  # warmup 40, warmdown 650 -> constant until step 350
    assert plan.lr_multiplier(0) == pytest.approx(1 / 40)
    assert plan.lr_multiplier(39) == 1.0 and plan.lr_multiplier(350) == 1.0
    assert plan.lr_multiplier(1000) == pytest.approx(0.05)
    assert plan.lr_multiplier(675) == pytest.approx(0.5 + 0.5 * 0.05)
    assert plan.muon_momentum(0) == pytest.approx(0.85)
    assert plan.muon_momentum(200) == pytest.approx(0.91)
    assert plan.muon_momentum(350) == pytest.approx(0.955)  # the 400-step ramp wins over the warmdown (at 350)
    assert plan.muon_momentum(675) == pytest.approx(0.935)
    assert plan.muon_momentum(1000) == pytest.approx(0.90)
    long = derive(12, num_iterations=2000)                            # warmdown starts at 700
    assert long.muon_momentum(400) == long.muon_momentum(699) == pytest.approx(0.97)
    assert plan.muon_weight_decay(0) == pytest.approx(plan.weight_decay)
    assert plan.muon_weight_decay(500) == pytest.approx(plan.weight_decay / 2)
    assert plan.muon_weight_decay(1000) == pytest.approx(0.0, abs=1e-12)


def test_grad_accum_and_errors():
    plan = derive(12)
    assert plan.grad_accum_steps(32, 8) == 1
    assert plan.grad_accum_steps(16, 2) == 8
    with pytest.raises(ValueError, match="device-batch-size"):
        plan.grad_accum_steps(24, 1)
    with pytest.raises(ValueError, match="target_param_data_ratio"):
        derive(12, target_param_data_ratio=0)
    with pytest.raises(ValueError, match="iterations"):
        derive(1, head_dim=64, max_seq_len=64, vocab_size=256, target_param_data_ratio=0.001)


def test_table_and_config_roundtrip():
    plan = derive(24, target_param_data_ratio=8)
    text = plan.table()
    assert "5,568" in text and "1,048,576" in text and "d24 / 1536 / 12" in text
    cfg = plan.model_config()
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert plan.to_dict()["num_iterations"] == 5_568
