"""Softmax attention with grouped query heads, each layer with its own KV-head count (Nemotron-NAS varies it
per layer; megatron-core builds each layer with its own `num_query_groups`)."""

from __future__ import annotations

from ..errors import PlanError
from .base import ATTENTION, Attention, SubBlockKind


class GQA(SubBlockKind):
    part, name = ATTENTION, "gqa"
    block_keys = frozenset({"n_heads_in_group", "num_key_value_heads"})
    fields = ("num_kv_heads",)

    def check(self, sub) -> None:
        super().check(sub)
        if sub.num_kv_heads <= 0:
            raise ValueError(f"GQA needs a positive KV-head count: {sub}")

    def describe(self, sub) -> str:
        return f"GQA kv={sub.num_kv_heads}"

    # ---- block_configs: the released `n_heads_in_group` or the newer `num_key_value_heads` --------------------
    def claims(self, d: dict) -> bool:
        return True  # whatever is neither removed nor replaced is softmax attention

    def parse(self, layer, d, hidden, heads):
        if d.get("num_key_value_heads") is not None:
            kv = int(d["num_key_value_heads"])
            if kv <= 0 or heads % kv:
                raise PlanError(f"layer {layer}: num_attention_heads {heads} is not divisible by {kv} KV heads")
            return Attention(self.name, kv), True
        group = d.get("n_heads_in_group")
        if group is None:
            raise PlanError(f"layer {layer}: normal attention needs n_heads_in_group (or num_key_value_heads)")
        group = int(group)
        if group <= 0 or heads % group:
            raise PlanError(f"layer {layer}: num_attention_heads {heads} is not divisible by n_heads_in_group {group}")
        return Attention(self.name, heads // group), False

    def released_fields(self, sub, plan) -> dict:
        return {"n_heads_in_group": plan.num_attention_heads // sub.num_kv_heads}

    def megatron_fields(self, sub) -> dict:
        return {"num_query_groups": sub.num_kv_heads}

    # ---- tensors ----------------------------------------------------------------------------------------------
    def hf_tensors(self, plan, sub):
        h, hd, nh, kv = plan.hidden_size, plan.head_dim, plan.num_attention_heads, sub.num_kv_heads
        return {"model.layers.{i}.input_layernorm.weight": (h,),
                "model.layers.{i}.self_attn.q_proj.weight": (nh * hd, h),
                "model.layers.{i}.self_attn.k_proj.weight": (kv * hd, h),
                "model.layers.{i}.self_attn.v_proj.weight": (kv * hd, h),
                "model.layers.{i}.self_attn.o_proj.weight": (h, nh * hd)}

    def qkv_rows(self, plan, sub) -> int:
        return (plan.num_attention_heads + 2 * sub.num_kv_heads) * plan.head_dim

    def tp_violations(self, plan, sub, tp):
        # megatron-core's rule (transformer/attention.py): KV groups a multiple *or a divisor* of TP; with fewer
        # groups than TP it all-gathers QKV. The interleaved QKV rows must also split into TP equal chunks.
        ng = sub.num_kv_heads
        if ng % tp and tp % ng:
            return [("self_attention.linear_qkv", f"{ng} KV heads is neither a multiple nor a divisor of TP={tp}")]
        if self.qkv_rows(plan, sub) % tp:
            return [("self_attention.linear_qkv", f"{self.qkv_rows(plan, sub)} QKV rows do not split into TP={tp} chunks")]
        return []

    # ---- counting ---------------------------------------------------------------------------------------------
    def flops_per_token(self, plan, sub, context):
        # QK^T and PV each cost 2 x heads x head_dim per attended position; a causal sequence of length L
        # attends to L/2 positions on average, so both together at L = context give this term. KV heads do
        # not change it.
        return super().flops_per_token(plan, sub, context) + 2 * plan.num_attention_heads * plan.head_dim * context

    def kv_cache_values_per_token(self, plan, sub) -> int:
        return 2 * sub.num_kv_heads * plan.head_dim  # K and V

    # ---- pruning ----------------------------------------------------------------------------------------------
    def cheaper_variants(self, plan, sub, widths=None, max_widths=8):
        """Fewer KV heads (most first; every count the head count divides by), then linear, then removed."""
        from . import LINEAR_ATTENTION, NO_ATTENTION

        heads = plan.num_attention_heads
        out = [Attention(self.name, heads // group) for group in range(1, heads + 1)
               if heads % group == 0 and heads // group < sub.num_kv_heads]
        return out + [Attention(LINEAR_ATTENTION.name), Attention(NO_ATTENTION.name)]


GQA_ATTENTION = GQA()
