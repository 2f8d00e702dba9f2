"""The sub-block kind registry: every kind is consulted the same way by every stage of the flow, and adding a
kind is one module plus its rows in the mapping table (docs/architecture.md walks through this example)."""

from __future__ import annotations

import copy

import pytest
import torch

from hetero_convert import mappings
from hetero_convert.convert import hf_to_megatron, megatron_to_hf
from hetero_convert.demo import compare_checkpoints
from hetero_convert.fixtures import write_random_checkpoint
from hetero_convert.kinds import ATTENTION, FFN_PART, Attention, get, kinds, register, unregister
from hetero_convert.kinds.gqa import GQA
from hetero_convert.layout import check_layout
from hetero_convert.plan import load_plan
from hetero_convert.resources import shipped_dir

EVERY_KIND = shipped_dir("fixtures", "tiny-every-kind.json") / "tiny-every-kind.json"


def test_every_released_kind_is_registered_in_matching_order():
    assert [k.name for k in kinds(ATTENTION)] == ["none", "linear", "gqa_qk_norm", "gqa"]
    assert [k.name for k in kinds(FFN_PART)] == ["none", "linear", "swiglu"]
    with pytest.raises(ValueError, match="unknown attention kind 'mamba'"):
        get(ATTENTION, "mamba")


def test_counts_come_from_the_kinds_shapes():
    """Parameters are the sum of each sub-block's HF tensor shapes; a dummy layer owns nothing."""
    plan = load_plan(EVERY_KIND)
    for layer in plan.layers:
        shapes = plan.layer_hf_tensors(layer)
        assert plan.layer_parameters(layer)["total"] == sum(torch.Size(s).numel() for s in shapes.values())
        if layer.is_dummy:
            assert shapes == {}


# ---- adding a kind: GQA with per-head q/k RMSNorm, stated by a block key -----------------------------------
# (The package's own Qwen3 kind, kinds/gqa_qk_norm.py, is implied by the parent family rather than a key; this
# is the worked example of docs/architecture.md, under its own name.)


class GQAWithQKNorm(GQA):
    """The worked example of docs/architecture.md: everything GQA does, plus two [head_dim] norm weights."""

    name = "example_qk_norm"
    block_keys = frozenset({"qk_norm"})

    def claims(self, d):
        return bool(d.get("qk_norm"))

    def parse(self, layer, d, hidden, heads):
        attention, newer = super().parse(layer, d, hidden, heads)
        return Attention(self.name, attention.num_kv_heads), newer

    def released_fields(self, sub, plan):
        return {**super().released_fields(sub, plan), "qk_norm": True}

    def hf_tensors(self, plan, sub):
        return {**super().hf_tensors(plan, sub),
                "model.layers.{i}.self_attn.q_norm.weight": (plan.head_dim,),
                "model.layers.{i}.self_attn.k_norm.weight": (plan.head_dim,)}


ROWS = [
    {"when": {"attention": "example_qk_norm"}, "hf": ["model.layers.{i}.input_layernorm.weight"],
     "megatron": "decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight", "rows": "same", "tp": "replicated"},
    {"when": {"attention": "example_qk_norm"},
     "hf": ["model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight"],
     "megatron": "decoder.layers.{i}.self_attention.linear_qkv.weight", "rows": "qkv", "tp": "rows",
     "extra_state": ["decoder.layers.{i}.self_attention.linear_qkv._extra_state"]},
    {"when": {"attention": "example_qk_norm"}, "hf": ["model.layers.{i}.self_attn.o_proj.weight"],
     "megatron": "decoder.layers.{i}.self_attention.linear_proj.weight", "rows": "same", "tp": "cols",
     "extra_state": ["decoder.layers.{i}.self_attention.linear_proj._extra_state"]},
    {"when": {"attention": "example_qk_norm"}, "hf": ["model.layers.{i}.self_attn.q_norm.weight"],
     "megatron": "decoder.layers.{i}.self_attention.q_layernorm.weight", "rows": "same", "tp": "replicated"},
    {"when": {"attention": "example_qk_norm"}, "hf": ["model.layers.{i}.self_attn.k_norm.weight"],
     "megatron": "decoder.layers.{i}.self_attention.k_layernorm.weight", "rows": "same", "tp": "replicated"},
]


@pytest.fixture
def qk_norm_kind(monkeypatch):
    """The new kind module registered (ahead of plain GQA, which claims every normal attention dict) and its
    rows appended to the table: nothing else in the package changes."""
    kind = register(GQAWithQKNorm(), first=True)
    table = copy.deepcopy(mappings.load_table())
    table["tensor"] += ROWS
    monkeypatch.setattr(mappings, "load_table", lambda name="decilm": table)
    yield kind
    unregister(kind)


def test_a_new_kind_converts_both_ways_bit_exact(qk_norm_kind, tmp_path):
    config = load_plan(EVERY_KIND).hf_config()
    config["block_configs"][0]["attention"]["qk_norm"] = True  # layer 0: GQA with q/k norms
    plan = load_plan(config)
    assert plan.layers[0].attention.kind == "example_qk_norm" and plan.layers[1].attention.kind == "gqa"
    assert plan.hf_block_configs()[0]["attention"]["qk_norm"] is True  # written back in the released form
    assert plan.kind_counts()["attention example_qk_norm"] == 1
    assert check_layout(plan, 2, 2).ok  # TP rules inherited from GQA
    src = write_random_checkpoint(config, tmp_path / "hf", seed=1)
    assert "model.layers.0.self_attn.q_norm.weight" in (src / "model.safetensors.index.json").read_text()
    hf_to_megatron(src, tmp_path / "meg", tp=2, pp=2)
    megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    n, bad = compare_checkpoints(src, tmp_path / "back")
    assert n > 0 and bad == []


def test_a_kind_without_table_rows_is_refused(monkeypatch):
    """A kind whose tensors no table row maps cannot bind silently (the tensors would be dropped)."""
    kind = register(GQAWithQKNorm(), first=True)
    try:
        config = load_plan(EVERY_KIND).hf_config()
        config["block_configs"][0]["attention"]["qk_norm"] = True
        with pytest.raises(ValueError, match="layer 0: the mappings table covers"):
            mappings.bind(load_plan(config))
    finally:
        unregister(kind)
