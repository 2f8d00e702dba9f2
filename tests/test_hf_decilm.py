"""Tests of the transformers implementation of DeciLM / Nemotron-NAS (hetero_convert.hf).

The central test is an independent cross-check: a DeciLM model without linear replacements is embedded into
transformers' own LlamaForCausalLM (zero-padded FFNs, KV heads repeated to full multi-head attention, removed
sub-blocks turned into exact zeros) and the two must give the same logits in fp32. Everything else (generate
with a cache, padding, save/load, remote code) builds on that.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hetero_convert.hf import (
    AUTO_MAP,
    DeciConfig,
    DeciLMConfig,
    DeciLMForCausalLM,
    ffn_mult_to_intermediate_size,
    remote_code_files,
    write_remote_code,
)
from hetero_convert.hf.modeling_decilm import compute_inv_freq
from conftest import dtype_kwarg

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "released")

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # With head_dim 16 and theta 1e4 the wavelengths are 6.3, 19.9, 62.8, ...: 32 puts one frequency in each
    # llama3 regime (kept < 8, blended 8..32, divided by factor > 32).
    "original_max_position_embeddings": 32,
}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def make_config(blocks, hidden=128, heads=8, vocab=97, rope_scaling=LLAMA3_SCALING, tie=False, **kw):
    return DeciLMConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=len(blocks),
        block_configs=blocks,
        rope_theta=10000.0,
        rope_scaling=copy.deepcopy(rope_scaling),
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
        **kw,
    )


# No linear replacements (Llama cannot express them). Widths at hidden 128: 3.0 -> 256, 6.0 -> 512,
# 7.5 -> int(640) rounded up to 768; the newer-schema width 640 is taken as given.
LLAMA_EXPRESSIBLE_BLOCKS = [
    {"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 3.0}},  # 4 KV heads
    {"attention": {"num_key_value_heads": 1}, "ffn": {"ffn_mult": 6.0}},  # newer schema, 1 KV head
    {"attention": {"no_op": True}, "ffn": {"ffn_mult": 7.5}},  # attention removed
    {"attention": {"n_heads_in_group": 4}, "ffn": {"no_op": True}},  # FFN removed, 2 KV heads
    {"attention": {"no_op": True}, "ffn": {"no_op": True}},  # dummy layer
    {"attention": {"n_heads_in_group": 1}, "ffn": {"intermediate_size": 640}},  # MHA, newer-schema width
]

# Every layer kind, with a linear attention first so that cache slot 0 is not layer 0.
EVERY_KIND_BLOCKS = [
    {"attention": {"replace_with_linear": True}, "ffn": {"ffn_mult": 3.0}},
    {"attention": {"n_heads_in_group": 2}, "ffn": {"replace_with_linear": True}},
    {"attention": {"no_op": True}, "ffn": {"ffn_mult": 7.5}},
    {"attention": {"no_op": True}, "ffn": {"no_op": True}},
    {"attention": {"n_heads_in_group": 4}, "ffn": {"no_op": True}},
    {"attention": {"n_heads_in_group": 1}, "ffn": {"ffn_mult": 3.0}},
]


def randomize_(model, seed=0, std=0.05, qk_std=0.08, embed_std=1.0):
    """Non-trivial weights: norms away from 1, q/k large enough that rotary positions change the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif "embed_tokens" in name:
                param.copy_(embed_std * torch.randn(param.shape, generator=gen))
            elif "q_proj" in name or "k_proj" in name:
                param.copy_(qk_std * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(std * torch.randn(param.shape, generator=gen))
    return model


def build_decilm(blocks, seed=0, attn="eager", **cfg_kw):
    torch.manual_seed(seed)
    model = DeciLMForCausalLM(make_config(blocks, **cfg_kw)).eval()
    randomize_(model, seed=seed)
    model.config._attn_implementation = attn
    return model


def llama_twin(deci, kv_order="interleave"):
    """Embed a DeciLM model (without linear replacements) into a plain LlamaForCausalLM.

    kv_order="tile" deliberately uses the wrong GQA head order; it exists to show the cross-check catches it.
    """
    cfg = deci.config
    n_layers, heads, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    width = max(cfg.ffn_width(i) for i in range(n_layers))
    llama_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=width,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,  # every layer becomes plain multi-head attention
        hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rope_scaling=copy.deepcopy(cfg.rope_scaling),
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    llama_cfg._attn_implementation = "eager"
    torch.manual_seed(123)
    llama = LlamaForCausalLM(llama_cfg).eval()
    assert llama.config._attn_implementation == "eager"

    def expand_kv(weight, kv_heads):
        rep = heads // kv_heads
        per_head = weight.view(kv_heads, hd, cfg.hidden_size)
        if kv_order == "interleave":  # query head h reads KV head h // rep
            per_head = per_head.repeat_interleave(rep, dim=0)
        else:
            per_head = per_head.repeat(rep, 1, 1)
        return per_head.reshape(heads * hd, cfg.hidden_size)

    with torch.no_grad():
        llama.model.embed_tokens.weight.copy_(deci.model.embed_tokens.weight)
        llama.model.norm.weight.copy_(deci.model.norm.weight)
        if not cfg.tie_word_embeddings:
            llama.lm_head.weight.copy_(deci.lm_head.weight)
        for i, (d, l) in enumerate(zip(deci.model.layers, llama.model.layers)):
            block = cfg.block_configs[i]
            assert not block.attention.replace_with_linear and not block.ffn.replace_with_linear
            if block.attention.no_op:
                # Zero o_proj: the attention adds exactly 0; its (random) q/k/v are left in place on purpose.
                l.input_layernorm.weight.fill_(1.0)
                l.self_attn.o_proj.weight.zero_()
            else:
                kv = cfg.num_kv_heads(i)
                l.input_layernorm.weight.copy_(d.input_layernorm.weight)
                l.self_attn.q_proj.weight.copy_(d.self_attn.q_proj.weight)
                l.self_attn.k_proj.weight.copy_(expand_kv(d.self_attn.k_proj.weight, kv))
                l.self_attn.v_proj.weight.copy_(expand_kv(d.self_attn.v_proj.weight, kv))
                l.self_attn.o_proj.weight.copy_(d.self_attn.o_proj.weight)
            if block.ffn.no_op:
                l.post_attention_layernorm.weight.fill_(1.0)
                l.mlp.down_proj.weight.zero_()
            else:
                w = cfg.ffn_width(i)
                l.post_attention_layernorm.weight.copy_(d.post_attention_layernorm.weight)
                for name in ("gate_proj", "up_proj"):
                    target = getattr(l.mlp, name).weight
                    target.zero_()
                    target[:w].copy_(getattr(d.mlp, name).weight)
                l.mlp.down_proj.weight.zero_()
                l.mlp.down_proj.weight[:, :w].copy_(d.mlp.down_proj.weight)
    return llama


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def expected_hf_keys(config):
    """The HF key set of a DeciLM checkpoint (per sub-block: its norm and projections, nothing for no_op), derived
    only from the block dicts."""
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        keys.add("lm_head.weight")
    for i, block in enumerate(config.to_dict()["block_configs"]):
        p = f"model.layers.{i}."
        attn, ffn = block["attention"], block["ffn"]
        if not attn["no_op"]:
            keys.add(p + "input_layernorm.weight")
            if attn["replace_with_linear"]:
                keys.add(p + "self_attn.linear_attn.weight")
            else:
                keys |= {p + f"self_attn.{n}_proj.weight" for n in "qkvo"}
        if not ffn["no_op"]:
            keys.add(p + "post_attention_layernorm.weight")
            if ffn["replace_with_linear"]:
                keys.add(p + "mlp.linear_mlp.weight")
            else:
                keys |= {p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    return keys


def input_ids(batch=2, seq=24, vocab=97, seed=7):
    return torch.randint(2, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hidden, mult, width",
    [
        (8192, 5.25, 28672), (8192, 3.28125, 17920), (8192, 2.625, 14336), (8192, 1.3125, 7168),
        (8192, 1.0, 5632), (8192, 0.5, 2816), (16384, 4.875, 53248), (16384, 2.4375, 26624),
        (16384, 1.95, 21504), (16384, 1.4625, 16128), (16384, 3.4125, 37376), (16384, 2.925, 32000),
        (16384, 0.975, 10752), (16384, 0.4875, 5376), (16384, 39.0, 425984), (16384, 36.5625, 399360),
        (16384, 31.40625, 343040), (16384, 27.5625, 301056),
    ],
)
def test_ffn_mult_to_intermediate_size(hidden, mult, width):
    assert ffn_mult_to_intermediate_size(mult, hidden) == width


def test_released_config_round_trip():
    with open(os.path.join(FIXTURES, "Llama-3_3-Nemotron-Super-49B-v1.json")) as f:
        raw = json.load(f)
    cfg = DeciLMConfig(**raw)
    assert cfg.intermediate_size is None and cfg.num_key_value_heads is None
    assert cfg.rope_type == "llama3" and cfg.rope_scaling["factor"] == 8.0 and cfg.rope_theta == 500000.0
    attn_free = [i for i in range(80) if not cfg.block_configs[i].attention.is_normal]
    assert len(attn_free) == 31  # fixtures/README: 49 GQA layers + 31 attention-free layers
    assert {cfg.num_kv_heads(i) for i in range(80)} == {0, 8}
    assert cfg.ffn_width(0) == 14336 and cfg.ffn_width(1) == 28672
    out = json.loads(cfg.to_json_string())
    assert out["block_configs"] == raw["block_configs"]  # released form, every key kept
    for key in ("intermediate_size", "num_key_value_heads"):
        assert key in out and out[key] is None
    assert out["model_type"] == "nemotron-nas"
    assert out["rope_scaling"] == raw["rope_scaling"] and "rope_parameters" not in out


def test_partial_and_newer_schema_block_dicts():
    cfg = make_config(
        [
            {"attention": {"n_heads_in_group": 4}, "ffn": {"ffn_mult": 3.0}},
            {"attention": {"no_op": True}, "ffn": {"replace_with_linear": True, "ffn_mult": 9.9}},
            {"attention": {"replace_with_linear": True, "n_heads_in_group": 8}, "ffn": {"no_op": True}},
            {"attention": {"num_key_value_heads": 2, "n_heads_in_group": 4}, "ffn": {"intermediate_size": 640}},
        ]
    )
    assert [cfg.num_kv_heads(i) for i in range(4)] == [2, 0, 0, 2]
    assert [cfg.ffn_width(i) for i in range(4)] == [256, 0, 0, 640]
    blocks = cfg.to_dict()["block_configs"]
    assert blocks[0]["attention"] == {
        "no_op": False, "replace_with_linear": False, "n_heads_in_group": 4, "window_length": None,
        "num_sink_tokens": None, "use_prefill_window_in_sink_attention": False, "unshifted_sink": False,
        "sparsify": None,
    }
    assert blocks[0]["ffn"] == {"no_op": False, "replace_with_linear": False, "ffn_mult": 3.0, "sparsify": None}
    # Removed / linear sub-blocks drop their size fields, as the released parser does.
    assert blocks[1]["ffn"]["ffn_mult"] is None and blocks[2]["attention"]["n_heads_in_group"] is None
    # Newer-schema keys survive a round trip; released keys stay present.
    assert blocks[3]["attention"]["num_key_value_heads"] == 2 and blocks[3]["attention"]["n_heads_in_group"] == 4
    assert blocks[3]["ffn"]["intermediate_size"] == 640 and blocks[3]["ffn"]["ffn_mult"] is None
    again = DeciLMConfig(**cfg.to_dict())
    assert again.to_dict()["block_configs"] == blocks


@pytest.mark.parametrize(
    "blocks, message",
    [
        ([{"attention": {"no_op": True, "replace_with_linear": True}, "ffn": {"ffn_mult": 1.0}}], "both"),
        ([{"attention": {}, "ffn": {"ffn_mult": 1.0}}], "n_heads_in_group"),
        ([{"attention": {"n_heads_in_group": 3}, "ffn": {"ffn_mult": 1.0}}], "divisible"),
        ([{"attention": {"num_key_value_heads": 3}, "ffn": {"ffn_mult": 1.0}}], "divisible"),
        ([{"attention": {"n_heads_in_group": 2}, "ffn": {}}], "ffn_mult"),
        ([{"attention": {"n_heads_in_group": 2}, "ffn": {"no_op": True, "replace_with_linear": True}}], "both"),
        ([{"attention": {"n_heads_in_group": 2, "window_length": 128}, "ffn": {"ffn_mult": 1.0}}], "not supported"),
        ([{"attention": {"n_heads_in_group": 2, "num_sink_tokens": 4}, "ffn": {"ffn_mult": 1.0}}], "not supported"),
        ([{"attention": {"n_heads_in_group": 2, "unshifted_sink": True}, "ffn": {"ffn_mult": 1.0}}], "not supported"),
        ([{"attention": {"n_heads_in_group": 2, "num_key_value_heads": 2}, "ffn": {"ffn_mult": 1.0}}], "disagree"),
    ],
)
def test_invalid_block_configs_name_the_layer(blocks, message):
    good = {"attention": {"n_heads_in_group": 1}, "ffn": {"ffn_mult": 1.0}}
    with pytest.raises(ValueError, match=message) as info:
        make_config([good] + blocks)  # the bad block is layer 1
    assert "block_configs[1]" in str(info.value)


def test_invalid_top_level_fields():
    good = [{"attention": {"n_heads_in_group": 1}, "ffn": {"ffn_mult": 1.0}}]
    with pytest.raises(ValueError, match="num_hidden_layers"):
        DeciLMConfig(hidden_size=64, num_attention_heads=8, num_hidden_layers=2, block_configs=good)
    with pytest.raises(ValueError, match="silu"):
        make_config(good, hidden_act="gelu")
    with pytest.raises(ValueError, match="bias"):
        make_config(good, attention_bias=True)
    with pytest.raises(ValueError, match="bias"):
        make_config(good, mlp_bias=True)
    with pytest.raises(ValueError, match="rope type"):
        make_config(good, rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_deci_model_type_fixture(tmp_path):
    with open(os.path.join(FIXTURES, "nemotron-nas-mini-every-kind.json")) as f:
        raw = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, DeciConfig) and cfg.model_type == "deci"
    assert [cfg.num_kv_heads(i) for i in range(6)] == [4, 2, 0, 0, 4, 8]
    assert [cfg.ffn_width(i) for i in range(6)] == [2816, 2816, 2816, 2816, 0, 0]
    cfg.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "deci"


def test_llama3_inv_freq_matches_transformers_for_released_settings():
    # Ultra / Super-v1.5 settings: head_dim 128, theta 5e5, factor 16, original context 8192.
    scaling = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    block = [{"attention": {"n_heads_in_group": 1}, "ffn": {"ffn_mult": 1.0}}]
    cfg = DeciLMConfig(hidden_size=256, num_attention_heads=2, num_hidden_layers=1, block_configs=block,
                       rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=131072, vocab_size=8)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=256, num_attention_heads=2, num_hidden_layers=1,
                                         intermediate_size=8, vocab_size=8, rope_theta=500000.0,
                                         rope_scaling=dict(scaling), max_position_embeddings=131072))
    ours, theirs = compute_inv_freq(cfg), llama.model.rotary_emb.inv_freq
    assert ours.shape == (64,)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    # Sanity: all three llama3 regimes occur, so the comparison above exercises each branch.
    plain = compute_inv_freq(DeciLMConfig(hidden_size=256, num_attention_heads=2, num_hidden_layers=1,
                                          block_configs=block, rope_theta=500000.0, vocab_size=8))
    ratio = plain / ours
    assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(16.0)).any()
    assert ((ratio > 1.01) & (ratio < 15.99)).any()


# ---------------------------------------------------------------------------------------------------------------
# model structure and the Llama cross-check
# ---------------------------------------------------------------------------------------------------------------


def test_state_dict_keys_and_shapes():
    model = build_decilm(EVERY_KIND_BLOCKS)
    sd = model.state_dict()
    assert set(sd) == expected_hf_keys(model.config)
    assert not any(k.startswith("model.layers.3.") for k in sd)  # dummy layer owns nothing
    assert len(list(model.model.layers[3].parameters())) == 0
    assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (4 * 16, 128)
    assert sd["model.layers.4.self_attn.v_proj.weight"].shape == (2 * 16, 128)
    assert sd["model.layers.0.self_attn.linear_attn.weight"].shape == (128, 128)
    assert sd["model.layers.1.mlp.linear_mlp.weight"].shape == (128, 128)
    assert sd["model.layers.2.mlp.gate_proj.weight"].shape == (768, 128)
    assert sd["model.layers.2.mlp.down_proj.weight"].shape == (128, 768)
    assert not any("inv_freq" in k for k in sd)


@pytest.mark.parametrize(
    "rope_scaling, tie, attn",
    [(LLAMA3_SCALING, False, "eager"), (LLAMA3_SCALING, False, "sdpa"), (None, True, "eager")],
    ids=["llama3-untied-eager", "llama3-untied-sdpa", "default-rope-tied-eager"],
)
def test_logits_match_llama_embedding(rope_scaling, tie, attn):
    deci = build_decilm(LLAMA_EXPRESSIBLE_BLOCKS, rope_scaling=rope_scaling, tie=tie, attn=attn)
    if tie:
        assert deci.lm_head.weight is deci.model.embed_tokens.weight
    llama = llama_twin(deci)
    ids = input_ids()
    with torch.no_grad():
        ours = deci(ids).logits
        theirs = llama(ids).logits.float()
        ours_masked = deci(ids, attention_mask=torch.ones_like(ids)).logits
    assert ours.dtype == torch.float32 and ours.shape == (2, 24, 97)
    assert rel_err(ours, theirs) < 1e-6
    assert rel_err(ours_masked, theirs) < 1e-6


def test_cross_check_is_sensitive():
    """The Llama cross-check would notice a wrong GQA head order or a wrong rope, so it is a real check."""
    deci = build_decilm(LLAMA_EXPRESSIBLE_BLOCKS)
    ids = input_ids()
    with torch.no_grad():
        ours = deci(ids).logits
        wrong_order = llama_twin(deci, kv_order="tile")(ids).logits.float()
        plain_rope = DeciLMForCausalLM(make_config(LLAMA_EXPRESSIBLE_BLOCKS, rope_scaling=None)).eval()
        plain_rope.load_state_dict(deci.state_dict())
        plain_rope.config._attn_implementation = "eager"
        other_rope = plain_rope(ids).logits
    assert rel_err(wrong_order, ours) > 1e-3
    assert rel_err(other_rope, ours) > 1e-3


def test_linear_replacements_follow_the_formula():
    # x + W_attn . RMSNorm(x), then h + W_mlp . RMSNorm(h): the linear attention mixes no tokens and has no rope.
    model = build_decilm([{"attention": {"replace_with_linear": True}, "ffn": {"replace_with_linear": True}}])
    ids = input_ids()
    layer = model.model.layers[0]
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        h = x + layer.self_attn.linear_attn(layer.input_layernorm(x))
        h = h + layer.mlp.linear_mlp(layer.post_attention_layernorm(h))
        expected = model.lm_head(model.model.norm(h))
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-6, atol=1e-6)
        # No token mixing: a token's logits do not depend on the tokens before it.
        torch.testing.assert_close(model(ids[:, -1:]).logits[:, 0], expected[:, -1], rtol=1e-6, atol=1e-6)


def test_removed_and_dummy_layers_are_identities():
    # A model whose only layers are a dummy and an FFN-only layer equals that FFN applied to the embeddings.
    model = build_decilm(
        [
            {"attention": {"no_op": True}, "ffn": {"no_op": True}},
            {"attention": {"no_op": True}, "ffn": {"ffn_mult": 3.0}},
        ]
    )
    ids = input_ids()
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        layer = model.model.layers[1]
        h = x + layer.mlp(layer.post_attention_layernorm(x))
        expected = model.lm_head(model.model.norm(h))
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-6, atol=1e-6)
        assert model.model.layers[1].input_layernorm is None and model.model.layers[1].self_attn is None


# ---------------------------------------------------------------------------------------------------------------
# padding, cache and generate
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_and_right_padding(attn):
    model = build_decilm(EVERY_KIND_BLOCKS, attn=attn)
    seqs = [input_ids(1, 11, seed=1)[0], input_ids(1, 7, seed=2)[0]]
    with torch.no_grad():
        alone = [model(s[None]).logits[0] for s in seqs]
        for side in ("left", "right"):
            ids = torch.zeros(2, 11, dtype=torch.long)
            mask = torch.zeros(2, 11, dtype=torch.long)
            for row, s in enumerate(seqs):
                span = slice(11 - len(s), 11) if side == "left" else slice(0, len(s))
                ids[row, span] = s
                mask[row, span] = 1
            logits = model(ids, attention_mask=mask).logits
            assert torch.isfinite(logits).all()
            for row, s in enumerate(seqs):
                span = slice(11 - len(s), 11) if side == "left" else slice(0, len(s))
                assert rel_err(logits[row, span], alone[row]) < 1e-5, (side, row)


def test_incremental_decoding_matches_full_forward():
    model = build_decilm(EVERY_KIND_BLOCKS)
    ids = input_ids(2, 12)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :8], use_cache=True)
        cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
        assert cache is not None and cache.get_seq_length() == 8
        step = model(ids[:, 8:], cache=cache, use_cache=True).logits  # 4 new tokens in one chunk
        assert cache.get_seq_length() == 12
    assert rel_err(torch.cat([first.logits, step], dim=1), full) < 1e-5


def _record_inputs(model):
    seen = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(ids.shape[1])

    return seen, model.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_generate_with_cache_equals_without():
    model = build_decilm(EVERY_KIND_BLOCKS)
    ids = input_ids(2, 9, seed=3)
    seen, handle = _record_inputs(model)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        cached_lengths = list(seen)
        seen.clear()
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    handle.remove()
    assert cached.shape == (2, 17)
    assert torch.equal(cached, uncached)
    # The cache really was used: after the prompt, one token per step; without it, the whole sequence.
    assert cached_lengths == [9] + [1] * 7
    assert seen == list(range(9, 17))
    # Not a degenerate sequence (otherwise the equality above would prove little).
    assert len(set(cached[:, 9:].flatten().tolist())) > 2


def test_generate_left_padded_batch_matches_single_prompts():
    model = build_decilm(EVERY_KIND_BLOCKS)
    prompts = [input_ids(1, 10, seed=4)[0], input_ids(1, 6, seed=5)[0]]
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 10 - len(p):] = p
        mask[row, 10 - len(p):] = 1
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        for row, p in enumerate(prompts):
            single = model.generate(p[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert torch.equal(batched[row, 10:], single[0, len(p):]), row


# ---------------------------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------------------------


def _saved_keys(directory):
    keys = set()
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="pt") as f:
                keys |= set(f.keys())
    return keys


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_save_pretrained_round_trip(tmp_path, tie):
    model = build_decilm(EVERY_KIND_BLOCKS, tie=tie)
    model.save_pretrained(tmp_path)
    assert _saved_keys(tmp_path) == expected_hf_keys(model.config)  # no lm_head when tied, no dummy layer

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "nemotron-nas"
    assert saved["intermediate_size"] is None and saved["num_key_value_heads"] is None
    assert all(set(b["attention"]) >= {"no_op", "replace_with_linear", "n_heads_in_group", "window_length",
                                        "num_sink_tokens", "use_prefill_window_in_sink_attention",
                                        "unshifted_sink", "sparsify"} for b in saved["block_configs"])

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is DeciLMForCausalLM
    loaded.config._attn_implementation = "eager"
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, **dtype_kwarg(torch.bfloat16)).eval()
    with torch.no_grad():
        logits = bf16(ids).logits
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert rel_err(logits, model(ids).logits.detach()) < 0.1


# ---------------------------------------------------------------------------------------------------------------
# remote code
# ---------------------------------------------------------------------------------------------------------------

# Runs in a fresh interpreter. `-I` drops PYTHONPATH, the user site and the cwd from sys.path, but once the
# project is pip-installed into the venv `import hetero_convert` would still succeed from site-packages (and a
# second venv made with --system-site-packages would see it too). Setting sys.modules["hetero_convert"] = None
# makes every import of the package and its submodules fail, so the model below can only come from the files
# copied next to the checkpoint.
REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["hetero_convert"] = None
    try:
        import hetero_convert.hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hetero_convert is importable; the remote-code test would prove nothing")

    import torch
    from transformers import AutoModelForCausalLM

    ckpt = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()
    model.config._attn_implementation = "eager"
    data = torch.load(ckpt + "/probe.pt")
    with torch.no_grad():
        logits = model(data["ids"]).logits
        cached = model.generate(data["ids"], max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = model.generate(data["ids"], max_new_tokens=5, do_sample=False, use_cache=False)
    print(json.dumps({
        "module": type(model).__module__,
        "config_module": type(model.config).__module__,
        "max_abs_diff": (logits - data["logits"]).abs().max().item(),
        "generate_equal": bool(torch.equal(cached, uncached)),
        "generated": cached[:, data["ids"].shape[1]:].tolist(),
    }))
    """
)


def test_remote_code_loads_without_package(tmp_path):
    model = build_decilm(EVERY_KIND_BLOCKS)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    auto_map = write_remote_code(ckpt)
    assert auto_map == AUTO_MAP == {
        "AutoConfig": "configuration_decilm.DeciLMConfig",
        "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
    }
    assert {"configuration_decilm.py", "modeling_decilm.py"} <= set(os.listdir(ckpt))
    assert [os.path.basename(p) for p in remote_code_files()] == ["configuration_decilm.py", "modeling_decilm.py"]
    config_path = ckpt / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = auto_map
    config["architectures"] = ["DeciLMForCausalLM"]
    config_path.write_text(json.dumps(config, indent=2))

    ids = input_ids(2, 10)
    with torch.no_grad():
        logits = model(ids).logits
        expected_tokens = model.generate(ids, max_new_tokens=5, do_sample=False)[:, 10:].tolist()
    torch.save({"ids": ids, "logits": logits}, ckpt / "probe.pt")

    workdir = tmp_path / "cwd"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_SCRIPT, str(ckpt)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules") and "hetero_convert" not in result["module"]
    assert result["config_module"].startswith("transformers_modules")
    assert result["max_abs_diff"] < 1e-5
    assert result["generate_equal"]
    assert result["generated"] == expected_tokens
