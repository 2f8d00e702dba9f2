"""ModelOpt Puzzletron children of Llama: both config forms (block_configs in the parent's config; vLLM
AnyModel's sparse per_layer_config) read into the per-layer plan, converted both ways bit-exactly, and written
back in the schema they came in (or another with --schema); what megatron-core cannot express is refused."""

from __future__ import annotations

import copy
import json
import re

import pytest

from hetero_convert.convert import hf_to_megatron, megatron_to_hf
from hetero_convert.demo import compare_checkpoints
from hetero_convert.errors import HeteroConvertError
from hetero_convert.fixtures import write_random_checkpoint
from hetero_convert.plan import GQA, NONE, SWIGLU, load_plan

# The parent as transformers saves a Llama config (keys the plan does not know must survive the round trip).
PARENT = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "head_dim": 16, "hidden_act": "silu", "hidden_size": 96,
    "initializer_range": 0.02, "intermediate_size": 256, "max_position_embeddings": 2048, "mlp_bias": False,
    "num_attention_heads": 6, "num_hidden_layers": 6, "num_key_value_heads": 2, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 500,
}


def block(kv=None, width=None) -> dict:
    """One entry exactly as Puzzletron serialises it (dataclasses.asdict, keys sorted by transformers)."""
    return {"attention": {"llama4": None, "mamba": None, "no_op": kv is None, "num_key_value_heads": kv,
                          "replace_with_linear": False, "sparsify": None, "weights_precision": "bf16"},
            "ffn": {"intermediate_size": width, "moe": None, "no_op": width is None, "replace_with_linear": False,
                    "sparsify": None, "weights_precision": "bf16"},
            "parallel_blocks": None}


# Per-layer KV heads 2/1/6, widths 256/128/64, removed attention, removed FFN, and a dummy layer.
BLOCKS = [block(2, 256), block(1, 128), block(None, 256), block(6, None), block(None, None), block(2, 64)]
CHILD = {**PARENT, "block_configs": BLOCKS}
# The same child as `convert_config_to_vllm_anymodel` rewrites it: written out by hand here.
ANYMODEL = {**{k: v for k, v in PARENT.items() if k != "architectures"}, "architectures": ["AnyModel"],
            "base_architecture": "LlamaForCausalLM", "anymodel_arch_info": {"descriptor": "llama"},
            "per_layer_config": {"1": {"num_key_value_heads": 1, "intermediate_size": 128},
                                 "2": {"skip": ["attention"]}, "3": {"skip": ["mlp"], "num_key_value_heads": 6},
                                 "4": {"skip": ["attention", "mlp"]}, "5": {"intermediate_size": 64}}}
EXPECTED = [(GQA, 2, SWIGLU, 256), (GQA, 1, SWIGLU, 128), (NONE, None, SWIGLU, 256), (GQA, 6, NONE, None),
            (NONE, None, NONE, None), (GQA, 2, SWIGLU, 64)]


def layers(plan):
    return [(l.attention.kind, l.attention.num_kv_heads, l.ffn.kind, l.ffn.width) for l in plan.layers]


def test_both_forms_give_the_same_per_layer_plan():
    a, b = load_plan(CHILD), load_plan(ANYMODEL)
    assert a.source_format == "puzzletron" and b.source_format == "anymodel"
    assert layers(a) == layers(b) == EXPECTED  # the parent's top-level kv=2 / width=256 are not every layer's
    assert a.layers[4].is_dummy and a.layer_hf_tensors(a.layers[4]) == {}
    assert "model.layers.2.input_layernorm.weight" not in a.layer_hf_tensors(a.layers[2])
    # A vLLM config that kept block_configs too (keep_block_configs) must say the same in both.
    both = {**ANYMODEL, "block_configs": BLOCKS}
    assert layers(load_plan(both)) == EXPECTED
    both["block_configs"] = BLOCKS[:1] + [block(2, 128)] + BLOCKS[2:]
    with pytest.raises(HeteroConvertError, match=r"per_layer_config and block_configs disagree at layer\(s\) \[1\]"):
        load_plan(both)


def with_block(i, part, **changes):
    cfg = copy.deepcopy(CHILD)
    cfg["block_configs"][i][part].update(changes)
    return cfg


def with_entry(i, entry, **top):
    cfg = copy.deepcopy(ANYMODEL)
    cfg["per_layer_config"][str(i)] = entry
    cfg.update(top)
    return cfg


@pytest.mark.parametrize("cfg,message", [
    (with_block(1, "attention", replace_with_linear=True), "layer 1: attention.replace_with_linear is not supported "
                                                           "for Puzzletron children"),
    (with_block(0, "ffn", moe={"num_local_experts": 8}), "layer 0: ffn.moe blocks are not supported"),
    (with_block(0, "attention", mamba={"state_dim": 16}), "layer 0: attention.mamba blocks are not supported"),
    (with_block(3, "attention", llama4={"use_rope": False}), "layer 3: attention.llama4 blocks are not supported"),
    (with_block(0, "attention", num_key_value_heads=4), "layer 0: num_attention_heads 6 is not divisible by 4 KV"),
    (with_block(2, "attention", window_length=128), "layer 2: unknown Puzzletron attention keys ['window_length']"),
    (with_block(5, "ffn", intermediate_size=None), "layer 5: ffn.intermediate_size must be a positive integer"),
    ({**CHILD, "block_configs": [{"subblock_configs": [{"kind": "attention"}]}] * 6},
     "layer 0: Puzzletron v2 'subblock_configs' blocks"),
    ({**CHILD, "block_configs": [{**BLOCKS[0], "parallel_blocks": [BLOCKS[0]]}] + BLOCKS[1:]},
     "layer 0: parallel_blocks are not supported"),
    ({**CHILD, "model_type": "mistral"}, "a Puzzletron child of a 'mistral' parent is not supported"),
    (with_entry(1, {"num_attention_heads": 3}), "layer 1: per_layer_config overrides ['num_attention_heads']"),
    (with_entry(0, {"head_dim": 32}), "layer 0: per_layer_config overrides ['head_dim']"),
    (with_entry(0, {"sliding_window": 64}), "overrides ['sliding_window'], which megatron-core"),
    (with_entry(0, {"skip": ["ffn"]}), "layer 0: per_layer_config skip ['ffn'] is not a list of 'attention'/'mlp'"),
    (with_entry(9, {"skip": ["mlp"]}), "per_layer_config key '9' is not a layer index below 6"),
    (with_entry(0, {}, base_architecture="MistralForCausalLM"), "AnyModel base_architecture 'MistralForCausalLM'"),
])
def test_what_megatron_cannot_express_is_refused_by_name(cfg, message):
    with pytest.raises(HeteroConvertError, match=re.escape(message)):
        load_plan(cfg)


@pytest.mark.parametrize("config,tp,pp", [(CHILD, 2, 2), (ANYMODEL, 2, 1)], ids=["puzzletron", "anymodel"])
def test_round_trip_bit_exact_in_the_schema_it_came_in(tmp_path, config, tp, pp):
    src = write_random_checkpoint(config, tmp_path / "hf", seed=4, max_shard_bytes=200_000)
    assert not (src / "modeling_decilm.py").exists()  # a native Llama child: no remote code
    hf_to_megatron(src, tmp_path / "meg", tp=tp, pp=pp, workers=2)
    megatron_to_hf(tmp_path / "meg", tmp_path / "back", max_shard_size="150KB")
    n, bad = compare_checkpoints(src, tmp_path / "back")
    assert n > 0 and bad == []
    source = json.loads((src / "config.json").read_text())
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back == source  # every key, the parent's globals and the form's own keys included
    assert not (tmp_path / "back" / "modeling_decilm.py").exists()


def test_schema_option_writes_decilm_or_the_other_form_and_refuses_what_cannot_be_said(tmp_path):
    src = write_random_checkpoint(CHILD, tmp_path / "hf", seed=4)
    hf_to_megatron(src, tmp_path / "meg")
    megatron_to_hf(tmp_path / "meg", tmp_path / "decilm", schema="decilm")
    cfg = json.loads((tmp_path / "decilm" / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and "auto_map" in cfg
    assert layers(load_plan(tmp_path / "decilm")) == EXPECTED
    assert compare_checkpoints(src, tmp_path / "decilm")[1] == []
    megatron_to_hf(tmp_path / "meg", tmp_path / "anymodel", schema="anymodel")
    got = json.loads((tmp_path / "anymodel" / "config.json").read_text())
    assert got["per_layer_config"] == ANYMODEL["per_layer_config"] and "block_configs" not in got
    # A DeciLM model with linear replacements has no Puzzletron form: refused, naming the layers.
    every = write_random_checkpoint("tiny-every-kind", tmp_path / "every", seed=1)
    hf_to_megatron(every, tmp_path / "meg-every")
    with pytest.raises(HeteroConvertError, match=r"cannot be written as a Puzzletron child \(layer 2: attention is "
                                                 r"linear"):
        megatron_to_hf(tmp_path / "meg-every", tmp_path / "nope", schema="puzzletron")
    assert not (tmp_path / "nope").exists()
