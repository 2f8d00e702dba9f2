"""Softmax attention with a per-head RMSNorm on queries and keys (Qwen3): GQA with this layer's own KV-head
count, plus q_norm / k_norm weights of [head_dim], applied to each head after the projection and before RoPE.

No `block_configs` dict states it: the parent family does (every attention layer of a Qwen3 model has it), so
the Puzzletron reader builds it directly and `claims` nothing. megatron-core expresses it with its global
`qk_layernorm` (every softmax-attention layer, or none), so a model mixing it with plain GQA is refused by the
spec builder; DeciLM's block_configs cannot state it, so the released form refuses it too."""

from __future__ import annotations

from .gqa import GQA


class GQAWithQKNorm(GQA):
    name = "gqa_qk_norm"
    block_keys = frozenset()
    in_decilm = False

    def describe(self, sub) -> str:
        return f"GQA+qk-norm kv={sub.num_kv_heads}"

    def claims(self, d: dict) -> bool:
        return False  # implied by the parent family, never by a block dict

    def released_fields(self, sub, plan) -> dict:
        # informational only (the description's hf_block_configs): a DeciLM config.json refuses the kind
        return {**super().released_fields(sub, plan), "qk_norm": True}

    def hf_tensors(self, plan, sub):
        return {**super().hf_tensors(plan, sub),
                "model.layers.{i}.self_attn.q_norm.weight": (plan.head_dim,),
                "model.layers.{i}.self_attn.k_norm.weight": (plan.head_dim,)}

    def cheaper_variants(self, plan, sub, widths=None, max_widths=8):
        from ..kinds.base import Attention

        # fewer KV heads keep the norms; removing the attention is always possible (no linear replacement:
        # a Qwen3 child has no schema for it)
        return [Attention(self.name, v.num_kv_heads) if v.kind == "gqa" else v
                for v in super().cheaper_variants(plan, sub, widths, max_widths) if v.kind != "linear"]


GQA_QK_NORM_ATTENTION = GQAWithQKNorm()
