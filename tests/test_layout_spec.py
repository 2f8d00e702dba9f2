"""TP/PP feasibility rules and the megatron-core specs built from the plan."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hetero_convert.layout import (LayoutError, check_layout, layer_ranges, padded_vocab_size, pipeline_split,
                                   require_layout)
from hetero_convert.plan import load_plan

RELEASED = Path(__file__).resolve().parents[1] / "fixtures" / "released"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SUPER = RELEASED / "Llama-3_3-Nemotron-Super-49B-v1.json"
MINI = RELEASED / "nemotron-nas-mini-every-kind.json"


def test_vocab_padding_is_megatrons():
    assert padded_vocab_size(128256, 1) == 128256
    assert padded_vocab_size(128256, 8) == 129024
    assert padded_vocab_size(1000, 2) == 1024
    assert padded_vocab_size(32128, 4) == 32256


def test_every_violation_is_reported_with_layer_and_tensor():
    # Mini: 32 heads, KV heads 4/2/8, widths 2816. At TP=3 heads, every GQA layer and every FFN fail.
    plan = load_plan(MINI)
    report = check_layout(plan, tp=3)
    assert not report.ok
    text = report.message()
    assert "model: num_attention_heads: 32 heads are not divisible by TP=3" in text
    # One line per distinct problem, naming every layer that has it.
    kv4 = [l.index for l in plan.layers if l.attention.num_kv_heads == 4]
    fc1 = [l.index for l in plan.layers if l.ffn.kind == "swiglu" and l.ffn.width == 2816]
    assert kv4[0] == 0 and 13 in fc1
    assert f"layers {layer_ranges(kv4)}: self_attention.linear_qkv: 4 KV heads is neither a multiple nor a divisor " \
           f"of TP=3" in text
    assert f"layers {layer_ranges(fc1)}: mlp.linear_fc1: FFN width 2816 is not divisible by TP=3" in text
    assert len(text.splitlines()) < len(report.violations)  # grouped
    assert "TP sizes that work (up to 8): [1, 2, 4, 8]" in text
    gqa = sum(l.attention.kind == "gqa" for l in plan.layers)
    swiglu = sum(l.ffn.kind == "swiglu" for l in plan.layers)
    linear = sum(l.attention.kind == "linear" for l in plan.layers) + sum(l.ffn.kind == "linear" for l in plan.layers)
    # 2048 % 3 != 0 too, so linear replacements fail as well.
    assert len(report.violations) == 1 + gqa + swiglu + linear


def test_fewer_kv_heads_than_tp_is_allowed_like_megatron():
    # Megatron all-gathers QKV when num_query_groups divides TP (attention.py), so 2 KV heads at TP=4 is fine.
    plan = load_plan(MINI)
    assert check_layout(plan, tp=4).ok
    assert check_layout(plan, tp=16).ok  # 8, 4 and 2 KV heads all divide 16; 32 heads and 2816 split by 16
    # 3 KV heads at TP=2 is neither a multiple nor a divisor: refused.
    odd = load_plan({"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 3, "intermediate_size": 64,
                     "num_hidden_layers": 1, "vocab_size": 10})
    assert "3 KV heads is neither a multiple nor a divisor of TP=2" in check_layout(odd, tp=2).message()


def test_require_layout_raises_with_report():
    plan = load_plan(FIXTURES / "tiny-llama.json")  # 6 heads, 2 KV heads, width 256
    with pytest.raises(LayoutError) as e:
        require_layout(plan, tp=4)
    assert "6 heads are not divisible by TP=4" in str(e.value)
    assert "layer 2: mlp.linear_fc1" not in str(e.value)  # 256 % 4 == 0


def test_pipeline_split_balances_parameters_in_megatron_terms():
    plan = load_plan(SUPER)
    split = pipeline_split(plan, 4)
    assert sum(split.layers_per_stage) == 80 and len(split.layers_per_stage) == 4
    middle = split.layers_per_stage[1:-1]
    assert len(set(middle)) == 1  # megatron can only vary first and last
    assert split.num_layers_in_first_pipeline_stage == split.layers_per_stage[0]
    assert split.num_layers_in_last_pipeline_stage == split.layers_per_stage[-1]
    even = [20, 20, 20, 20]
    from hetero_convert.layout import _StageCost

    cost = _StageCost(plan)
    assert max(split.params_per_stage) < max(cost(even))
    # And it is the best such split: no (first, last) does better.
    best = min(max(cost([f] + [(80 - f - l) // 2] * 2 + [l])) for f in range(1, 79) for l in range(1, 80 - f)
               if (80 - f - l) % 2 == 0 and 80 - f - l >= 2)
    assert max(split.params_per_stage) == best


def test_pipeline_too_many_stages():
    plan = load_plan(FIXTURES / "tiny-llama.json")
    report = check_layout(plan, pp=4)
    assert not report.ok and "3 layers cannot fill PP=4 stages" in report.message()


def test_megatron_rope_constants_are_checked():
    cfg = json.loads((FIXTURES / "tiny-every-kind.json").read_text())
    cfg["rope_scaling"]["high_freq_factor"] = 2.0
    report = check_layout(load_plan(cfg))
    assert "rope_scaling.high_freq_factor: 2.0 differs from megatron-core's fixed 4.0" in report.message()


@pytest.mark.megatron
def test_megatron_config_per_layer_from_megatron_itself():
    from hetero_convert.spec import gpt_args, megatron_config

    plan = load_plan(SUPER)
    cfg = megatron_config(plan, tp=8, pp=4, cpu=True)
    for layer in plan.layers:
        per = cfg.get_config_for_layer(layer.index + 1)
        if layer.attention.kind == "gqa":
            assert per.num_query_groups == layer.attention.num_kv_heads
        assert per.ffn_hidden_size == layer.ffn.width
        block = cfg.per_block_parameters[layer.index]
        assert block.attention.no_op == (layer.attention.kind == "none")
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and not cfg.add_bias_linear
    assert cfg.layernorm_epsilon == 1e-5 and cfg.kv_channels == 128
    a = gpt_args(plan, 8)
    assert a.rope_scaling and a.rope_scaling_factor == 8.0 and a.rotary_base == 500000.0
    assert a.vocab_size == 129024 and not a.share_embeddings_and_output_weights


def test_rope_factor_16_reaches_megatron():
    from hetero_convert.spec import gpt_args

    plan = load_plan(FIXTURES / "tiny-ultra-kinds.json")
    assert gpt_args(plan, 1).rope_scaling_factor == 16.0


@pytest.mark.megatron
def test_spec_table_full_size_super():
    from hetero_convert.spec import spec_table

    plan = load_plan(SUPER)
    rows = spec_table(plan, tp=2, pp=4, use_te=False)
    assert [r["layer"] for r in rows] == list(range(80))
    for r, layer in zip(rows, plan.layers):
        if layer.attention.kind == "none":
            assert r["self_attention"] == "IdentityOp" and r["input_layernorm"] == "IdentityOp"
        else:
            assert r["self_attention"].startswith("SelfAttention(ColumnParallelLinear, DotProductAttention, "
                                                  "RowParallelLinear")
            assert r["input_layernorm"] == "WrappedTorchNorm"
        assert r["mlp"] == "MLP(ColumnParallelLinear, RowParallelLinear)"
        assert r["ffn_hidden_size"] == layer.ffn.width
    stages = [r["stage"] for r in rows]
    assert stages == sorted(stages) and set(stages) == {0, 1, 2, 3}


@pytest.mark.megatron
def test_spec_linear_replacements_use_megatron_gathered_linear():
    from hetero_convert.spec import spec_table

    rows = spec_table(load_plan(MINI), tp=2)
    assert rows[2]["self_attention"] == "ColumnParallelLinearGathered"
    assert rows[4]["mlp"] == "ColumnParallelLinearGathered"
    assert rows[3]["self_attention"] == "IdentityOp" and rows[5]["mlp"] == "IdentityOp"


def test_inspect_super_answers_fast_and_counts():
    t = time.time()
    out = subprocess.run([sys.executable, "-m", "hetero_convert.cli", "inspect", str(SUPER), "--json"],
                         capture_output=True, text=True, check=True)
    elapsed = time.time() - t
    d = json.loads(out.stdout)
    assert round(d["parameters"] / 1e9, 2) == 49.87
    assert d["counts"]["no_attention"] == 31 and d["counts"]["gqa_attention"] == 49
    assert d["kv_cache_bytes_per_token_bf16"] == 49 * 2 * 8 * 128 * 2
    assert elapsed < 3.0, f"inspect took {elapsed:.2f}s"


def test_inspect_reports_infeasible_layout_with_exit_code():
    out = subprocess.run([sys.executable, "-m", "hetero_convert.cli", "inspect", str(MINI), "--tp", "3"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "not possible" in out.stdout and "self_attention.linear_qkv" in out.stdout
    assert "layers 0" in out.stdout
