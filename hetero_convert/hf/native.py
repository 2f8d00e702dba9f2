"""transformers' own decoder layers for models whose HF side is a native architecture (Llama and Qwen3, and
Puzzletron children of them), built per layer as Puzzletron's AnyModel runtime builds them: the parent's layer class with
this layer's KV heads and FFN width in its config, and a removed sub-block replaced by an identity norm and a
module that outputs zeros (so the residual passes the input on unchanged)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from ..plan import NONE, SWIGLU, LayerPlan

@dataclass(frozen=True)
class NativeClasses:
    config: type
    layer: type
    norm: type
    rotary: type


def native_classes(family: str) -> NativeClasses:
    if family == "llama":
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

        return NativeClasses(LlamaConfig, LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding)
    if family == "qwen3":
        from transformers import Qwen3Config
        from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

        return NativeClasses(Qwen3Config, Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding)
    raise ValueError(f"no native transformers family {family!r}")


class ZeroAttention(nn.Module):
    """A removed attention: no parameters, a zero output (and no attention weights)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(hidden_states.shape), None


class ZeroMLP(nn.Module):
    """A removed MLP: no parameters, a zero output."""

    def forward(self, hidden_states):
        return hidden_states.new_zeros(hidden_states.shape)


def native_layer(config, index: int, layer: LayerPlan, family: str) -> nn.Module:
    """The decoder layer `index` of a native-family model whose layers may differ (`layer` says how).

    transformers 5 resolves an AnyModel `per_layer_config` itself (`config.per_layer_config[i]`, with a `skip`
    list); that resolution must agree with the plan, layer by layer. Older versions, and the block_configs
    form, which transformers does not read, get this layer's values from the plan."""
    if getattr(config, "is_heterogeneous", False):
        cfg = config.per_layer_config[index]
        got = (set(getattr(cfg, "skip", [])), cfg.num_key_value_heads, cfg.intermediate_size)
        want = ({s for s, part in (("attention", layer.attention), ("mlp", layer.ffn)) if part.kind == NONE},
                layer.attention.num_kv_heads or got[1], layer.ffn.width or got[2])
        if got != want:
            raise ValueError(f"layer {index}: transformers reads per_layer_config as (skip, KV heads, width) = {got}, "
                             f"the plan as {want}")
    else:
        cfg = copy.copy(config)
    if layer.attention.num_kv_heads:
        cfg.num_key_value_heads = layer.attention.num_kv_heads
    if layer.ffn.kind == SWIGLU:
        cfg.intermediate_size = layer.ffn.width
    module = native_classes(family).layer(cfg, index)
    if layer.attention.kind == NONE:
        module.input_layernorm, module.self_attn = nn.Identity(), ZeroAttention()
    if layer.ffn.kind == NONE:
        module.post_attention_layernorm, module.mlp = nn.Identity(), ZeroMLP()
    return module
