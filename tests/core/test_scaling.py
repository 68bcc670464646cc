"""The depth dial reproduces the reference table exactly (docs/reference.md#the-depth-dial)."""
from __future__ import annotations

import math

import pytest
import torch

from core.gpt import GPT, GPTConfig
from core.scaling import B_REF, RECIPE_FIELDS, derive, main, model_dims, recipe_of
from core.train.config import PretrainConfig

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
    plan = derive(PretrainConfig(depth=depth))
    assert (plan.n_embd, plan.n_head, plan.n_kv_head) == (dim, heads, heads)
    assert round(plan.num_params / 1e6) == total_m
    assert round(plan.num_scaling_params / 1e6) == scaling_m
    assert round(plan.target_tokens / 1e9, 2 if tokens_b < 10 else 1) == tokens_b
    assert plan.total_batch_size == batch and plan.batch_size_source == "auto"
    assert plan.num_iterations == iters and plan.horizon_source == "ratio"
    assert plan.total_tokens == iters * batch


def test_reference_weight_decay():
    assert derive(PretrainConfig(depth=12)).weight_decay == pytest.approx(0.28)
    assert round(derive(PretrainConfig(depth=24)).weight_decay, 3) == 0.060
    # WD = 0.28 * sqrt(B/B_REF) * D_REF / target
    p = derive(PretrainConfig(depth=20))
    assert p.weight_decay == pytest.approx(0.28 * math.sqrt(p.total_batch_size / B_REF) * p.ref_tokens / p.target_tokens,
                                           rel=1e-6)


def test_speedrun_d24_ratio8():
    plan = derive(PretrainConfig(depth=24, target_param_data_ratio=8))
    assert plan.num_iterations == 5_568
    assert plan.total_batch_size == 1_048_576


def test_exact_d12_numbers():
    plan = derive(PretrainConfig(depth=12))
    assert plan.num_scaling_params == 110_100_912
    assert plan.num_params == 286_261_730
    assert plan.target_tokens == 12 * 110_100_912
    assert plan.ref_tokens == plan.target_tokens
    assert plan.batch_lr_scale == 1.0 and plan.dmodel_lr_scale == 1.0
    lrs = plan.optimizer_lrs()
    assert lrs == dict(lm_head_lr=0.008, wte_lr=0.3, value_embeds_lr=0.15, resid_lr=0.005, x0_lr=0.5,
                       smear_lr=0.2, matrix_lr=0.02, weight_decay=pytest.approx(0.28))


def test_lr_scaling_with_batch_and_width():
    plan = derive(PretrainConfig(depth=20))
    b, s = math.sqrt(2.0), (1280 / 768) ** -0.5
    assert plan.batch_lr_scale == pytest.approx(b)
    assert plan.lm_head_lr == pytest.approx(0.008 * b * s)
    assert plan.wte_lr == pytest.approx(0.3 * b * s)
    assert plan.value_embeds_lr == pytest.approx(0.15 * b * s)
    assert plan.matrix_lr == pytest.approx(0.02 * b)
    assert plan.resid_lr == pytest.approx(0.005 * b) and plan.x0_lr == pytest.approx(0.5 * b)
    assert plan.smear_lr == 0.2


def test_horizon_precedence():
    base = derive(PretrainConfig(depth=12))
    it = derive(PretrainConfig(depth=12, num_iterations=100, target_flops=1e18))
    assert it.num_iterations == 100 and it.horizon_source == "num_iterations"
    # batch size and weight decay still follow the ratio-based target, as in the reference
    assert it.total_batch_size == base.total_batch_size and it.weight_decay == base.weight_decay
    fl = derive(PretrainConfig(depth=12, target_flops=1e18))
    assert fl.horizon_source == "target_flops"
    assert fl.num_iterations == round(1e18 / (fl.flops_per_token * fl.total_batch_size))
    given = derive(PretrainConfig(depth=12, total_batch_size=2 ** 18))
    assert given.batch_size_source == "given" and given.num_iterations == base.target_tokens // 2 ** 18


def test_plan_counts_match_a_real_model():
    plan = derive(PretrainConfig(depth=4, aspect_ratio=64, head_dim=64, max_seq_len=256), 1000)
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
    plan = derive(PretrainConfig(depth=12, num_iterations=1000))  # warmup 40, warmdown 650 -> constant until step 350
    assert plan.lr_multiplier(0) == pytest.approx(1 / 40)
    assert plan.lr_multiplier(39) == 1.0 and plan.lr_multiplier(350) == 1.0
    assert plan.lr_multiplier(1000) == pytest.approx(0.05)
    assert plan.lr_multiplier(675) == pytest.approx(0.5 + 0.5 * 0.05)
    assert plan.muon_momentum(0) == pytest.approx(0.85)
    assert plan.muon_momentum(200) == pytest.approx(0.91)
    assert plan.muon_momentum(350) == pytest.approx(0.955)  # the 400-step ramp wins over the warmdown (at 350)
    assert plan.muon_momentum(675) == pytest.approx(0.935)
    assert plan.muon_momentum(1000) == pytest.approx(0.90)
    long = derive(PretrainConfig(depth=12, num_iterations=2000))                            # warmdown starts at 700
    assert long.muon_momentum(400) == long.muon_momentum(699) == pytest.approx(0.97)
    assert plan.muon_weight_decay(0) == pytest.approx(plan.weight_decay)
    assert plan.muon_weight_decay(500) == pytest.approx(plan.weight_decay / 2)
    assert plan.muon_weight_decay(1000) == pytest.approx(0.0, abs=1e-12)


def test_grad_accum_and_errors():
    plan = derive(PretrainConfig(depth=12))
    assert plan.grad_accum_steps(32, 8) == 1
    assert plan.grad_accum_steps(16, 2) == 8
    with pytest.raises(ValueError, match="device-batch-size"):
        plan.grad_accum_steps(24, 1)
    with pytest.raises(ValueError, match="target_param_data_ratio"):
        derive(PretrainConfig(depth=12, target_param_data_ratio=0))
    with pytest.raises(ValueError, match="iterations"):
        derive(PretrainConfig(depth=1, head_dim=64, max_seq_len=64, target_param_data_ratio=0.001), 256)


def test_table_and_config_roundtrip():
    plan = derive(PretrainConfig(depth=24, target_param_data_ratio=8))
    text = plan.table()
    assert "5,568" in text and "1,048,576" in text and "d24 / 1536 / 12" in text
    cfg = plan.model_config()
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert plan.to_dict()["num_iterations"] == 5_568


# derive()'s whole plan for three recipes, computed by the code before derive() took a PretrainConfig
# (when it still declared its own defaults): any drift in a default or a formula shows up here.
PINNED = {
    "d2-tiny": (dict(depth=2, head_dim=64, max_seq_len=64, total_batch_size=256, num_iterations=24, warmup_steps=2,
                     matrix_lr=0.2, embedding_lr=3.0, unembedding_lr=0.1, weight_decay=0.0), 1024, {
        'depth': 2, 'aspect_ratio': 64, 'head_dim': 64, 'max_seq_len': 64, 'vocab_size': 1024,
        'window_pattern': 'SSSL', 'target_param_data_ratio': 12.0, 'target_flops': None, 'n_layer': 2, 'n_embd': 128,
        'n_head': 2, 'n_kv_head': 2, 'num_params': 786486, 'num_scaling_params': 524312,
        'flops_per_token': 3342624.0, 'ref_tokens': 1028663424, 'target_tokens': 6291744, 'total_batch_size': 256,
        'batch_size_source': 'given', 'num_iterations': 24, 'horizon_source': 'num_iterations', 'total_tokens': 6144,
        'batch_lr_scale': 0.02209708691207961, 'dmodel_lr_scale': 2.4494897427831783,
        'lm_head_lr': 0.005412658773652743, 'wte_lr': 0.16237976320958228, 'value_embeds_lr': 0.08118988160479114,
        'resid_lr': 0.00011048543456039807, 'x0_lr': 0.011048543456039806, 'smear_lr': 0.2,
        'matrix_lr': 0.004419417382415923, 'weight_decay': 0.0, 'warmup_steps': 2, 'warmdown_ratio': 0.65,
        'final_lr_frac': 0.05, 'momentum_warmup_steps': 400, 'momentum_start': 0.85, 'momentum_peak': 0.97,
        'momentum_end': 0.9}),
    "d12": (dict(depth=12), 32768, {
        'depth': 12, 'aspect_ratio': 64, 'head_dim': 128, 'max_seq_len': 2048, 'vocab_size': 32768,
        'window_pattern': 'SSSL', 'target_param_data_ratio': 12.0, 'target_flops': None, 'n_layer': 12, 'n_embd': 768,
        'n_head': 6, 'n_kv_head': 6, 'num_params': 286261730, 'num_scaling_params': 110100912,
        'flops_per_token': 759696048.0, 'ref_tokens': 1321210944, 'target_tokens': 1321210944,
        'total_batch_size': 524288, 'batch_size_source': 'auto', 'num_iterations': 2520, 'horizon_source': 'ratio',
        'total_tokens': 1321205760, 'batch_lr_scale': 1.0, 'dmodel_lr_scale': 1.0, 'lm_head_lr': 0.008, 'wte_lr': 0.3,
        'value_embeds_lr': 0.15, 'resid_lr': 0.005, 'x0_lr': 0.5, 'smear_lr': 0.2, 'matrix_lr': 0.02,
        'weight_decay': 0.28, 'warmup_steps': 40, 'warmdown_ratio': 0.65, 'final_lr_frac': 0.05,
        'momentum_warmup_steps': 400, 'momentum_start': 0.85, 'momentum_peak': 0.97, 'momentum_end': 0.9}),
    "d24-ratio8": (dict(depth=24, target_param_data_ratio=8), 32768, {
        'depth': 24, 'aspect_ratio': 64, 'head_dim': 128, 'max_seq_len': 2048, 'vocab_size': 32768,
        'window_pattern': 'SSSL', 'target_param_data_ratio': 8.0, 'target_flops': None, 'n_layer': 24,
        'n_embd': 1536, 'n_head': 12, 'n_kv_head': 12, 'num_params': 1384122122, 'num_scaling_params': 729810624,
        'flops_per_token': 4775225616.0, 'ref_tokens': 880807296, 'target_tokens': 5838484992,
        'total_batch_size': 1048576, 'batch_size_source': 'auto', 'num_iterations': 5568, 'horizon_source': 'ratio',
        'total_tokens': 5838471168, 'batch_lr_scale': 1.4142135623730951, 'dmodel_lr_scale': 0.7071067811865476,
        'lm_head_lr': 0.008000000000000002, 'wte_lr': 0.30000000000000004, 'value_embeds_lr': 0.15000000000000002,
        'resid_lr': 0.007071067811865476, 'x0_lr': 0.7071067811865476, 'smear_lr': 0.2,
        'matrix_lr': 0.028284271247461905, 'weight_decay': 0.05973842446340308, 'warmup_steps': 40,
        'warmdown_ratio': 0.65, 'final_lr_frac': 0.05, 'momentum_warmup_steps': 400, 'momentum_start': 0.85,
        'momentum_peak': 0.97, 'momentum_end': 0.9}),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_plan_is_pinned(name):
    recipe, vocab, want = PINNED[name]
    got = derive(PretrainConfig(**recipe), vocab).to_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if isinstance(value, float):  # the same arithmetic; a libm may round the last bit differently
            assert got[key] == pytest.approx(value, rel=1e-12, abs=0), key
        else:
            assert got[key] == value and type(got[key]) is type(value), key


def test_every_recipe_field_reaches_the_plan():
    """derive() reads each RECIPE_FIELD from the config (none falls back to a default of its own)."""
    base = derive(PretrainConfig(depth=4, head_dim=64, max_seq_len=128), 512).to_dict()
    changed = dict(aspect_ratio=32, head_dim=32, max_seq_len=64, window_pattern="L", target_param_data_ratio=6.0,
                   target_flops=1e15, num_iterations=9, total_batch_size=1024, embedding_lr=0.1,
                   unembedding_lr=0.004, matrix_lr=0.03, scalar_lr=0.25, weight_decay=0.1, warmup_steps=3,
                   warmdown_ratio=0.5, final_lr_frac=0.1)
    assert set(changed) == set(RECIPE_FIELDS) - {"depth"}
    for name, value in changed.items():
        recipe = {**dict(depth=4, head_dim=64, max_seq_len=128), name: value}
        assert derive(PretrainConfig(**recipe), 512).to_dict() != base, f"{name} does not change the plan"
    source = PretrainConfig(depth=3, **changed)
    assert recipe_of(source) == PretrainConfig(depth=3, **changed)


def test_the_cli_builds_a_pretrain_config(capsys):
    main(["--depth", "24", "--target-param-data-ratio", "8"])
    assert "5,568 (from ratio)" in capsys.readouterr().out
    main(["--depth", "12", "--num-iterations", "100", "--warmup-steps", "7"])
    out = capsys.readouterr().out
    assert "100 (from num_iterations)" in out and "warmup 7," in out
    with pytest.raises(SystemExit) as e:  # PretrainConfig's check, one line, exit 2
        main(["--depth", "12", "--warmdown-ratio", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("warmdown_ratio and final_lr_frac must be in [0, 1], warmup_steps >= 0")
