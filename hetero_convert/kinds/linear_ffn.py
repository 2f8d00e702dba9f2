"""FFN replaced by one linear layer: x + W·RMSNorm(x), W a full H x H matrix."""

from __future__ import annotations

from .base import FFN_PART, FFN, SubBlockKind


class LinearFFN(SubBlockKind):
    part, name = FFN_PART, "linear"
    block_keys = frozenset({"replace_with_linear"})

    def describe(self, sub) -> str:
        return "linear"

    def claims(self, d: dict) -> bool:
        return bool(d.get("replace_with_linear"))

    def parse(self, layer, d, hidden, heads):
        return FFN(self.name), False

    def released_fields(self, sub, plan) -> dict:
        return {"replace_with_linear": True}

    def megatron_fields(self, sub) -> dict:
        return {"replace_with_linear": True}

    def hf_tensors(self, plan, sub):
        h = plan.hidden_size
        return {"model.layers.{i}.post_attention_layernorm.weight": (h,),
                "model.layers.{i}.mlp.linear_mlp.weight": (h, h)}

    def tp_violations(self, plan, sub, tp):
        if plan.hidden_size % tp:
            return [("mlp (linear replacement)", f"hidden size {plan.hidden_size} is not divisible by TP={tp}")]
        return []

    def cheaper_variants(self, plan, sub, widths=None, max_widths=8):
        from . import NO_FFN

        return [FFN(NO_FFN.name)]


LINEAR_FFN = LinearFFN()
