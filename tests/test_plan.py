"""Per-layer plan: every accepted config form, every rejection with its message, the real Super-49B config."""

import collections
import copy
import json
from pathlib import Path

import pytest

from hetero_convert.plan import (
    GQA, LINEAR, NONE, SWIGLU, PlanError, ffn_mult_to_width, load_plan, width_to_ffn_mult,
)

RELEASED = Path(__file__).resolve().parents[1] / "fixtures" / "released"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SUPER = RELEASED / "Llama-3_3-Nemotron-Super-49B-v1.json"
MINI = RELEASED / "nemotron-nas-mini-every-kind.json"


def super_config() -> dict:
    return json.loads(SUPER.read_text())


def base(**kw) -> dict:
    cfg = {"hidden_size": 256, "num_attention_heads": 8, "num_hidden_layers": 2, "vocab_size": 1000,
           "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    cfg.update(kw)
    return cfg


def blocks(*bs) -> dict:
    return base(num_hidden_layers=len(bs), block_configs=list(bs))


GQA4 = {"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.5}}


# ---- the rounding rule -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mult,h,width", [
    (5.25, 8192, 28672), (3.28125, 8192, 17920), (2.625, 8192, 14336), (1.3125, 8192, 7168), (1.0, 8192, 5632),
    (0.5, 8192, 2816), (4.875, 16384, 53248), (1.95, 16384, 21504), (39.0, 16384, 425984),
    (36.5625, 16384, 399360), (31.40625, 16384, 343040), (0.4875, 16384, 5376),
])
def test_ffn_mult_rule_matches_released_widths(mult, h, width):
    assert ffn_mult_to_width(mult, h) == width
    back = width_to_ffn_mult(width, h)
    assert back is not None and ffn_mult_to_width(back, h) == width


def test_width_not_multiple_of_256_has_no_ffn_mult():
    assert width_to_ffn_mult(1000, 512) is None


# ---- accepted forms ------------------------------------------------------------------------------------------


def test_super_49b_layer_by_layer():
    cfg = super_config()
    plan = load_plan(cfg)
    assert plan.num_layers == 80 and plan.source_format == "decilm"
    assert round(plan.num_parameters() / 1e9, 2) == 49.87
    no_attn = [l.index for l in plan.layers if l.attention.kind == NONE]
    assert len(no_attn) == 31
    widths = collections.Counter(l.ffn.width for l in plan.layers)
    assert widths == {28672: 49, 7168: 10, 5632: 8, 14336: 6, 2816: 6, 17920: 1}
    for layer, block in zip(plan.layers, cfg["block_configs"]):
        a, f = block["attention"], block["ffn"]
        if a["no_op"]:
            assert layer.attention.kind == NONE
        else:
            assert layer.attention == type(layer.attention)(GQA, 64 // a["n_heads_in_group"])
        assert layer.ffn.kind == SWIGLU and layer.ffn.width == ffn_mult_to_width(f["ffn_mult"], 8192)
    assert plan.rope_scaling["factor"] == 8.0 and plan.rope_theta == 500000.0
    assert not plan.tie_word_embeddings and plan.vocab_size == 128256
    # Regenerated block_configs are the released ones, key for key.
    assert plan.hf_block_configs() == cfg["block_configs"]


def test_trtllm_mini_every_kind():
    plan = load_plan(MINI)
    kinds = [(l.attention.kind, l.attention.num_kv_heads, l.ffn.kind) for l in plan.layers]
    assert kinds[2][0] == LINEAR and kinds[9][0] == LINEAR
    assert kinds[3][0] == NONE and kinds[10][0] == NONE
    assert kinds[4][2] == LINEAR and kinds[11][2] == LINEAR
    assert kinds[5][2] == NONE and kinds[12][2] == NONE
    assert {k[1] for k in kinds if k[0] == GQA} == {4, 2, 8}


def test_partial_dicts_take_defaults():
    plan = load_plan(blocks({"attention": {"no_op": True}, "ffn": {"no_op": True}}, GQA4))
    assert plan.layers[0].is_dummy
    assert plan.layers[1].attention.num_kv_heads == 4 and plan.layers[1].ffn.width == 256


def test_ultra_dummy_layer_owns_no_parameters():
    plan = load_plan(blocks({"attention": {"no_op": True, "n_heads_in_group": None},
                             "ffn": {"no_op": True, "ffn_mult": None}}, GQA4))
    assert plan.layer_parameters(plan.layers[0])["total"] == 0
    assert plan.layers[0].describe() == "dummy"


def test_newer_schema_states_counts_directly():
    plan = load_plan(blocks({"attention": {"num_key_value_heads": 2}, "ffn": {"intermediate_size": 768}},
                            {"attention": {"num_key_value_heads": 8}, "ffn": {"intermediate_size": 1000}}))
    assert plan.source_format == "decilm-newer"
    assert [l.attention.num_kv_heads for l in plan.layers] == [2, 8]
    assert [l.ffn.width for l in plan.layers] == [768, 1000]
    exported = plan.hf_block_configs()
    assert exported[0]["attention"]["n_heads_in_group"] == 4
    assert ffn_mult_to_width(exported[0]["ffn"]["ffn_mult"], 256) == 768
    # 1000 is not expressible as ffn_mult: it is stated in the newer schema instead of being rounded away.
    assert exported[1]["ffn"]["ffn_mult"] is None and exported[1]["ffn"]["intermediate_size"] == 1000
    assert load_plan(dict(base(num_hidden_layers=2), block_configs=exported)).layers == plan.layers


def test_decilm_7b_per_layer_kv_heads():
    plan = load_plan(base(num_hidden_layers=3, num_key_value_heads_per_layer=[4, 2, 1], intermediate_size=640,
                          model_type="deci"))
    assert plan.source_format == "decilm-7b"
    assert [l.attention.num_kv_heads for l in plan.layers] == [4, 2, 1]
    assert {l.ffn.width for l in plan.layers} == {640}


def test_plain_llama_is_a_homogeneous_plan():
    plan = load_plan(FIXTURES / "tiny-llama.json")
    assert plan.source_format == "llama"
    assert {(l.attention.num_kv_heads, l.ffn.width) for l in plan.layers} == {(2, 256)}
    llama = plan.llama_config()
    assert llama["model_type"] == "llama" and llama["num_key_value_heads"] == 2 and llama["intermediate_size"] == 256


def test_llama_without_kv_heads_means_mha():
    plan = load_plan(base(intermediate_size=512))
    assert {l.attention.num_kv_heads for l in plan.layers} == {8}


def test_sparsify_is_accepted():
    b = copy.deepcopy(GQA4)
    b["attention"]["sparsify"] = ["attention"]
    b["ffn"]["sparsify"] = ["ffn"]
    assert load_plan(blocks(b, GQA4)).layers[0].attention.num_kv_heads == 4


def test_plan_json_round_trip():
    plan = load_plan(FIXTURES / "tiny-every-kind.json")
    assert type(plan).from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_kv_cache_counts_only_attention_layers():
    plan = load_plan(FIXTURES / "tiny-every-kind.json")
    kv = sum(l.attention.num_kv_heads for l in plan.layers if l.attention.kind == GQA)
    assert plan.kv_cache_bytes_per_token(2) == 2 * kv * plan.head_dim * 2


# ---- rejections ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg,message", [
    (dict(blocks(GQA4, GQA4), num_hidden_layers=3), "block_configs has 2 blocks but num_hidden_layers is 3"),
    (blocks(GQA4, {"attention": {"n_heads_in_group": 3}, "ffn": {"ffn_mult": 1.0}}),
     "layer 1: num_attention_heads 8 is not divisible by n_heads_in_group 3"),
    (blocks(GQA4, {"attention": {"no_op": True, "replace_with_linear": True}, "ffn": {"ffn_mult": 1.0}}),
     "layer 1: attention has both no_op and replace_with_linear set"),
    (blocks({"attention": {"n_heads_in_group": 2}, "ffn": {"no_op": True, "replace_with_linear": True}}, GQA4),
     "layer 0: ffn has both no_op and replace_with_linear set"),
    (blocks(GQA4, {"attention": {}, "ffn": {"ffn_mult": 1.0}}),
     "layer 1: normal attention needs n_heads_in_group"),
    (blocks(GQA4, {"attention": {"n_heads_in_group": 2}, "ffn": {}}), "layer 1: normal FFN needs ffn_mult"),
    (blocks(GQA4, {"attention": {"n_heads_in_group": 2, "window_length": 4096}, "ffn": {"ffn_mult": 1.0}}),
     "layer 1: sliding-window attention (attention.window_length=4096) is not supported"),
    (blocks({"attention": {"n_heads_in_group": 2, "num_sink_tokens": 4, "window_length": 64},
             "ffn": {"ffn_mult": 1.0}}, GQA4), "layer 0: sliding-window attention"),
    (blocks(GQA4, {"attention": {"n_heads_in_group": 2, "unshifted_sink": True}, "ffn": {"ffn_mult": 1.0}}),
     "layer 1: unshifted-sink attention (attention.unshifted_sink=True) is not supported"),
    (blocks(GQA4, {"attention": {"n_heads_in_group": 2, "num_sink_tokens": 4}, "ffn": {"ffn_mult": 1.0}}),
     "layer 1: sink attention (attention.num_sink_tokens=4) is not supported"),
    (dict(blocks(GQA4, GQA4), hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (blocks(GQA4, {"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.0, "hidden_act": "relu"}}),
     "layer 1: (ffn.hidden_act='relu') is not supported"),
    (dict(blocks(GQA4, GQA4), head_dim=64), "head_dim 64 is inconsistent with hidden_size/num_attention_heads"),
    (blocks(GQA4, {"attention": {"n_heads_in_group": 2, "mystery": 1}, "ffn": {"ffn_mult": 1.0}}),
     "layer 1: unknown attention keys ['mystery']"),
    (blocks(GQA4, {"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.0, "moe": {"num_experts": 8}}}),
     "layer 1: (ffn.moe="),
    (dict(blocks(GQA4, GQA4), rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn'"),
    (dict(blocks(GQA4, GQA4), attention_bias=True), "attention_bias=true is not supported"),
    (base(num_hidden_layers=2, num_key_value_heads_per_layer=[4], intermediate_size=64),
     "num_key_value_heads_per_layer has 1 entries but num_hidden_layers is 2"),
    (base(num_key_value_heads=3, intermediate_size=64), "not divisible by num_key_value_heads 3"),
])
def test_rejections_name_the_layer(cfg, message):
    with pytest.raises(PlanError) as e:
        load_plan(cfg)
    assert message in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(PlanError, match="no config.json"):
        load_plan(tmp_path)


def test_transformers5_rope_parameters_are_read():
    # transformers 5.x writes rope_parameters and no top-level rope_theta; the default must not be used.
    cfg = base(intermediate_size=512, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})
    cfg.pop("rope_theta")
    plan = load_plan(cfg)
    assert plan.rope_theta == 100000.0 and plan.rope_scaling is None
    llama3 = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = base(intermediate_size=512, rope_parameters=llama3)
    cfg.pop("rope_theta")
    plan = load_plan(cfg)
    assert plan.rope_theta == 500000.0 and plan.rope_scaling["factor"] == 16.0
    with pytest.raises(PlanError, match="contradicts"):
        load_plan(base(intermediate_size=512, rope_theta=10000.0, rope_parameters={"rope_theta": 5e5}))


# ---- the remote code parses configs the same way ----------------------------------------------------------


def _decilm_configs() -> list[Path]:
    return sorted(p for p in list(FIXTURES.glob("*.json")) + list(RELEASED.glob("*.json"))
                  if "block_configs" in json.loads(p.read_text()))


@pytest.mark.parametrize("path", _decilm_configs(), ids=lambda p: p.name)
def test_remote_code_config_agrees_with_the_plan(path):
    """hf/configuration_decilm.py stands alone (it ships as remote code and may not import this package), so it
    has its own block_configs parser: on every bundled and released config it must see the same layers as
    plan.py (kinds, KV heads, widths) and write back the same released-form block_configs."""
    from hetero_convert.hf import DeciLMConfig

    cfg = json.loads(path.read_text())
    plan = load_plan(cfg)
    remote = DeciLMConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "auto_map", "model_type")})
    assert len(remote.block_configs) == plan.num_layers
    for layer in plan.layers:
        i, block = layer.index, remote.block_configs[layer.index]
        kind = {GQA: "normal", LINEAR: "linear", NONE: "none"}[layer.attention.kind]
        assert ("none" if block.attention.no_op else "linear" if block.attention.replace_with_linear
                else "normal") == kind, i
        assert remote.num_kv_heads(i) == (layer.attention.num_kv_heads or 0), i
        assert ("none" if block.ffn.no_op else "linear" if block.ffn.replace_with_linear else "swiglu") == \
            {SWIGLU: "swiglu", LINEAR: "linear", NONE: "none"}[layer.ffn.kind], i
        assert remote.ffn_width(i) == (layer.ffn.width or 0), i
    if plan.source_format == "decilm":  # the released form both write back
        assert remote.to_dict()["block_configs"] == plan.hf_block_configs()
