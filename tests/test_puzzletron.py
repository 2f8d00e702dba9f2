"""ModelOpt Puzzletron children of Llama and Qwen3: both config forms (block_configs in the parent's config;
vLLM AnyModel's sparse per_layer_config) read into the per-layer plan, converted both ways bit-exactly, written
back in the schema they came in (or another with --schema), and verified against transformers' own layers;
what megatron-core cannot express is refused by name."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

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


# A Qwen3 parent as transformers saves it: head_dim 32 where hidden / heads is 16, tied embeddings, q/k norms.
QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "head_dim": 32, "hidden_act": "silu", "hidden_size": 64,
    "initializer_range": 0.02, "intermediate_size": 192, "layer_types": ["full_attention"] * 4,
    "max_position_embeddings": 2048, "max_window_layers": 4, "num_attention_heads": 4, "num_hidden_layers": 4,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 500,
}
QWEN3_CHILD = {**QWEN3, "block_configs": [block(2, 192), block(1, 96), block(None, 192), block(4, None)]}


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


def test_qwen3_children_have_per_head_qk_norms_and_their_own_head_dim():
    plan = load_plan(QWEN3_CHILD)
    assert plan.source_format == "qwen3-puzzletron" and plan.head_dim == 32 != plan.hidden_size // 4
    assert [l.describe() for l in plan.layers] == ["GQA+qk-norm kv=2 | SwiGLU 192", "GQA+qk-norm kv=1 | SwiGLU 96",
                                                   "- | SwiGLU 192", "GQA+qk-norm kv=4 | -"]
    t = plan.layer_hf_tensors(plan.layers[1])
    assert t["model.layers.1.self_attn.q_norm.weight"] == (32,) and t["model.layers.1.self_attn.q_proj.weight"] == (
        128, 64) and t["model.layers.1.self_attn.k_proj.weight"] == (32, 64)
    assert "model.layers.2.self_attn.q_norm.weight" not in plan.layer_hf_tensors(plan.layers[2])
    anymodel = {**QWEN3, "architectures": ["AnyModel"], "base_architecture": "Qwen3ForCausalLM",
                "per_layer_config": {"1": {"num_key_value_heads": 1, "intermediate_size": 96},
                                     "2": {"skip": ["attention"]}, "3": {"skip": ["mlp"], "num_key_value_heads": 4}}}
    assert layers(load_plan(anymodel)) == layers(plan) and load_plan(anymodel).source_format == "qwen3-anymodel"
    plain = load_plan(QWEN3)  # the parent itself: every layer alike, with q/k norms
    assert plain.source_format == "qwen3" and {l.describe() for l in plain.layers} == {"GQA+qk-norm kv=2 | SwiGLU 192"}
    # megatron-core: its global qk_layernorm and kv_channels = head_dim (the same setting for every layer)
    from hetero_convert.spec import megatron_config, qk_layernorm

    config = megatron_config(plan, cpu=True)
    assert config.qk_layernorm and config.kv_channels == 32
    mixed = dataclasses.replace(plan, layers=(load_plan(CHILD).layers[0],) + plan.layers[1:])
    with pytest.raises(HeteroConvertError, match="megatron-core's qk_layernorm is one setting for every layer"):
        qk_layernorm(mixed)


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
    ({**QWEN3_CHILD, "use_sliding_window": True}, "use_sliding_window=true (Qwen3 sliding-window layers)"),
    ({**QWEN3_CHILD, "layer_types": ["sliding_attention"] * 4}, "layer_types ['sliding_attention'"),
    ({**CHILD, "head_dim": 32}, "head_dim 32 is inconsistent with hidden_size/num_attention_heads"),
])
def test_what_megatron_cannot_express_is_refused_by_name(cfg, message):
    with pytest.raises(HeteroConvertError, match=re.escape(message)):
        load_plan(cfg)


@pytest.mark.parametrize("config,tp,pp", [(CHILD, 2, 2), (ANYMODEL, 2, 1), (QWEN3_CHILD, 2, 2)],
                         ids=["puzzletron", "anymodel", "qwen3-puzzletron"])
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
    # Per-head q/k norms (and a head_dim other than hidden / heads) have no DeciLM form: refused before writing.
    qwen = write_random_checkpoint(QWEN3_CHILD, tmp_path / "qwen", seed=1)
    hf_to_megatron(qwen, tmp_path / "meg-qwen")
    with pytest.raises(HeteroConvertError, match=r"head_dim 32 \(not hidden_size / num_attention_heads\) cannot be "
                                                 r"written in a DeciLM config"):
        megatron_to_hf(tmp_path / "meg-qwen", tmp_path / "nope", schema="decilm")
    assert not (tmp_path / "nope").exists()


def test_reference_layers_compute_what_the_decilm_model_computes(tmp_path):
    """verify's HF side for a Llama child is transformers' LlamaDecoderLayer patched per layer (this layer's KV
    heads and width; removed parts an identity norm and a zero output): in fp64 it gives the logits our DeciLM
    model (an independent implementation) gives for the same weights written as DeciLM."""
    from hetero_convert.parity import make_inputs
    from hetero_convert.reference import reference_forward

    src = write_random_checkpoint(ANYMODEL, tmp_path / "hf", seed=4)
    hf_to_megatron(src, tmp_path / "meg")
    megatron_to_hf(tmp_path / "meg", tmp_path / "decilm", schema="decilm")
    ids, mask, _ = make_inputs(None, 500, batch=2, seq_len=12)
    native = reference_forward(src, ids, mask, ("fp64",))["fp64"]
    decilm = reference_forward(tmp_path / "decilm", ids, mask, ("fp64",))["fp64"]
    keep = mask.bool()
    rel = (native.logits - decilm.logits)[keep].abs().max() / decilm.logits[keep].abs().max()
    assert rel < 1e-6, rel  # fp32 RMSNorm statistics in both; the rest in fp64
    assert torch.equal(native.hidden[4][keep], native.hidden[3][keep])  # the dummy layer passes its input on


def test_verify_passes_for_quantized_releases_and_puzzletron_children(tmp_path):
    """One torchrun launch: megatron-core loads each converted checkpoint and matches the HF model run on the
    same weights (for ModelOpt checkpoints: the dequantized ones; for children: transformers' Llama / Qwen3
    layers with this layer's heads and width, removed parts skipped). A Megatron checkpoint dequantized the
    other way (fp32 scale, ~1 bf16 unit in the last place on some weights) fails against the FP8 model."""
    from hetero_convert.fixtures_modelopt import tiny_super_config, write_modelopt_checkpoint
    from hetero_convert.parity import verify_many

    sources = {
        "FP8 Super": write_modelopt_checkpoint(tiny_super_config(), tmp_path / "fp8", algo="FP8", seed=5,
                                               max_shard_bytes=1 << 30),
        "NVFP4 Ultra": write_modelopt_checkpoint("tiny-ultra-kinds", tmp_path / "nvfp4", algo="NVFP4", kv_cache=None,
                                                 seed=5),
        "AnyModel Llama child": write_random_checkpoint(ANYMODEL, tmp_path / "anymodel", seed=5),
        "Qwen3 child": write_random_checkpoint(QWEN3_CHILD, tmp_path / "qwen3", seed=5),
    }
    pairs = []
    for name, src in sources.items():
        hf_to_megatron(src, tmp_path / f"meg-{len(pairs)}")
        pairs.append((src, tmp_path / f"meg-{len(pairs)}"))
    fp8 = sources["FP8 Super"]
    wrong = Path(shutil.copytree(fp8, tmp_path / "fp32-route"))
    stored = load_file(wrong / "model.safetensors")
    tensors = {k: (t.float() * stored[k[:-len("weight")] + "weight_scale"]).to(torch.bfloat16)
               if t.dtype == torch.float8_e4m3fn else t for k, t in stored.items() if k.endswith(".weight")}
    save_file(tensors, wrong / "model.safetensors", metadata={"format": "pt"})
    (wrong / "hf_quant_config.json").unlink()
    cfg = json.loads((wrong / "config.json").read_text())
    cfg.pop("quantization_config")
    (wrong / "config.json").write_text(json.dumps(cfg))
    hf_to_megatron(wrong, tmp_path / "meg-wrong")
    pairs.append((fp8, tmp_path / "meg-wrong"))
    reports = verify_many(pairs, device="cpu", dtype="fp32", batch=2, seq_len=24, workdir=tmp_path / "w")
    bad = reports[-1]  # measured: ~3,700x the bound
    assert not bad.ok and bad.metrics["megatron_fp64_max_rel_diff"] > 100 * bad.thresholds["max_rel_diff"]
    for name, r in zip(sources, reports):
        m = r.metrics
        assert r.ok, (name, r.failures)
        assert 0 < m["megatron_fp64_max_rel_diff"] <= r.thresholds["max_rel_diff"] < 1e-5, (name, m)
        assert m["megatron_fp64_top1_decisive"] == 1.0 and all(l.ok for l in r.layers), name
