"""Attention replaced by one linear layer: x + W·RMSNorm(x), W a full H x H matrix (Nemotron-51B, Super)."""

from __future__ import annotations

from .base import ATTENTION, Attention, SubBlockKind


class LinearAttention(SubBlockKind):
    part, name = ATTENTION, "linear"
    block_keys = frozenset({"replace_with_linear"})

    def describe(self, sub) -> str:
        return "linear"

    def claims(self, d: dict) -> bool:
        return bool(d.get("replace_with_linear"))

    def parse(self, layer, d, hidden, heads):
        return Attention(self.name), False

    def released_fields(self, sub, plan) -> dict:
        return {"replace_with_linear": True}

    def megatron_fields(self, sub) -> dict:
        return {"replace_with_linear": True}

    def hf_tensors(self, plan, sub):
        h = plan.hidden_size
        return {"model.layers.{i}.input_layernorm.weight": (h,),
                "model.layers.{i}.self_attn.linear_attn.weight": (h, h)}

    def tp_violations(self, plan, sub, tp):
        # megatron makes it column-parallel H -> H/TP (then gathers).
        if plan.hidden_size % tp:
            return [("self_attention (linear replacement)", f"hidden size {plan.hidden_size} is not divisible by TP={tp}")]
        return []

    def cheaper_variants(self, plan, sub, widths=None, max_widths=8):
        from . import NO_ATTENTION

        return [Attention(NO_ATTENTION.name)]


LINEAR_ATTENTION = LinearAttention()
