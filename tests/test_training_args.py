"""A training run's saved args -> its model's config (io/training_args.py): the heterogeneous config a run keeps,
a homogeneous Llama rebuilt from the standard args, and a refusal naming the arg for everything else."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from hetero_convert.convert import ConversionError
from hetero_convert.io.megatron_checkpoint import read_plan
from hetero_convert.io.training_args import config_from_args
from hetero_convert.plan import load_plan
from hetero_convert.resources import shipped_dir

WHERE = "run/iter_0000100/common.pt"


def llama_args(**changes) -> argparse.Namespace:
    """What a Megatron-LM 0.16 .. 0.19 run of a Llama-3-style model stores (the model's part of ~800 args)."""
    args = dict(num_layers=4, hidden_size=256, num_attention_heads=8, group_query_attention=True,
                num_query_groups=2, kv_channels=32, ffn_hidden_size=768, normalization="RMSNorm", swiglu=True,
                position_embedding_type="rope", rotary_base=500000, rotary_percent=1.0, rotary_interleaved=False,
                use_rope_scaling=True, rope_scaling_factor=8.0, layernorm_epsilon=1e-5, vocab_size=None,
                padded_vocab_size=128256, make_vocab_size_divisible_by=128, max_position_embeddings=8192,
                untie_embeddings_and_output_weights=True, add_bias_linear=False, add_qkv_bias=False,
                qk_layernorm=False, num_experts=None, multi_latent_attention=False, bf16=True, fp16=False,
                params_dtype=torch.bfloat16, heterogeneous_layers_config_encoded_json=None)
    args.update(changes)
    return argparse.Namespace(**args)


def test_llama_run_args_rebuild_a_llama():
    config, notes = config_from_args(llama_args(), WHERE)
    plan = load_plan(config)
    assert plan.source_format == "llama" and plan.num_layers == 4 and plan.vocab_size == 128256
    assert config["num_key_value_heads"] == 2 and config["intermediate_size"] == 768 and config["rope_theta"] == 5e5
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert not config["tie_word_embeddings"] and config["torch_dtype"] == "bfloat16"
    assert len(notes) == 1 and "padded_vocab_size = 128256" in notes[0] and notes[0].startswith(WHERE)
    # a run given --vocab-size records it: exported as is, nothing to say
    config, notes = config_from_args(llama_args(vocab_size=128000), WHERE)
    assert config["vocab_size"] == 128000 and notes == []
    # without --group-query-attention every head is its own group; without rope scaling, plain RoPE
    config, _ = config_from_args(llama_args(group_query_attention=False, use_rope_scaling=False), WHERE)
    assert config["num_key_value_heads"] == 8 and "rope_scaling" not in config
    # runs of megatron-core <= 0.15 stored the norm epsilon as norm_epsilon
    args = llama_args(norm_epsilon=1e-6)
    del args.layernorm_epsilon
    assert config_from_args(args, WHERE)[0]["rms_norm_eps"] == 1e-6


@pytest.mark.parametrize("missing", ["num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                                     "ffn_hidden_size", "rotary_base", "rope_scaling_factor", "layernorm_epsilon",
                                     "padded_vocab_size", "untie_embeddings_and_output_weights", "normalization",
                                     "swiglu", "position_embedding_type", "max_position_embeddings"])
def test_a_missing_arg_is_named(missing):
    args = llama_args()
    delattr(args, missing)
    with pytest.raises(ConversionError) as e:
        config_from_args(args, WHERE)
    assert f"'{missing}'" in str(e.value) and str(e.value).startswith(WHERE) and "\n" not in str(e.value)


@pytest.mark.parametrize("change, named", [
    ({"normalization": "LayerNorm"}, "normalization = 'LayerNorm'"),
    ({"swiglu": False}, "swiglu = False"),
    ({"position_embedding_type": "learned_absolute"}, "position_embedding_type"),
    ({"add_bias_linear": True}, "add_bias_linear = True"),
    ({"add_qkv_bias": True}, "add_qkv_bias = True"),
    ({"qk_layernorm": True}, "qk_layernorm = True"),
    ({"num_experts": 8}, "num_experts = 8"),
    ({"multi_latent_attention": True}, "multi_latent_attention"),
    ({"rotary_interleaved": True}, "rotary_interleaved"),
    ({"rotary_percent": 0.5}, "rotary_percent = 0.5"),
    ({"kv_channels": 64}, "kv_channels = 64"),
    ({"num_layers": "4"}, "'num_layers' is '4', not a positive integer"),
    ({"hidden_size": True}, "'hidden_size' is True"),
    ({"rotary_base": "x"}, "'rotary_base' is 'x', not a number"),
    ({"untie_embeddings_and_output_weights": 1}, "not true/false"),
])
def test_what_a_llama_cannot_hold_is_refused_by_name(change, named):
    with pytest.raises(ConversionError, match=named.replace("(", r"\(").replace(")", r"\)")):
        config_from_args(llama_args(**change), WHERE)


def test_heterogeneous_run_keeps_its_hf_config():
    hf = json.loads((shipped_dir("fixtures", "tiny-every-kind.json") / "tiny-every-kind.json").read_text())
    plan = load_plan(hf)
    encoded = dict(hf)
    encoded.pop("vocab_size")
    args = argparse.Namespace(heterogeneous_layers_config_encoded_json=json.dumps(encoded), num_layers=plan.num_layers,
                              hidden_size=plan.hidden_size, num_attention_heads=plan.num_attention_heads,
                              vocab_size=plan.vocab_size, untie_embeddings_and_output_weights=True)
    config, notes = config_from_args(args, WHERE)
    assert load_plan(config).to_json() == plan.to_json() and notes == []
    # The encoded config is checked as a config.json is: one line naming the arg, never a traceback.
    arg = f"{WHERE}: training arg 'heterogeneous_layers_config_encoded_json'"
    for bad, message in (("[1]", ": a JSON list, not an object"), ("{", ": not valid JSON \\(Expecting"),
                         ("[" * 100_000 + "]" * 100_000, ": not valid JSON \\(nested too deeply\\)"),
                         ('{"hidden_size": 8, "hidden_size": 16}', ': the key "hidden_size" appears twice'),
                         (b"\xff{}", ": not valid JSON \\('utf-8' codec"),
                         (7, " is 7, not JSON text")):
        args.heterogeneous_layers_config_encoded_json = bad
        with pytest.raises(ConversionError) as e:
            config_from_args(args, WHERE)
        assert re.match(re.escape(arg) + message, str(e.value)) and "\n" not in str(e.value), (bad, str(e.value))
    with pytest.raises(ConversionError, match="'args' is a dict, not a training run's argument namespace"):
        config_from_args({"num_layers": 4}, WHERE)


def test_read_plan_from_a_run_without_args_or_with_unplannable_ones(tmp_path):
    torch.save({"iteration": 3, "checkpoint_version": 3.0}, tmp_path / "common.pt")
    with pytest.raises(ConversionError, match="no training run's args in its common state"):
        read_plan(tmp_path)
    torch.save({"args": llama_args(num_attention_heads=7, group_query_attention=False, kv_channels=None),
                "iteration": 3}, tmp_path / "common.pt")
    with pytest.raises(ConversionError, match="the model the training args describe cannot be planned"):
        read_plan(tmp_path)
    notes: list[str] = []
    torch.save({"args": llama_args(), "iteration": 3}, tmp_path / "common.pt")
    assert read_plan(tmp_path, notes=notes).num_layers == 4 and "padded_vocab_size" in notes[0]
