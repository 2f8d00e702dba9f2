# coding=utf-8
"""PyTorch DeciLM / Nemotron-NAS model (heterogeneous Llama decoder).

This file is shipped next to converted checkpoints as `trust_remote_code` code: it imports only torch,
transformers and the stdlib, plus the configuration through a relative import. It is written to run under
transformers 4.5x and 5.x; the places where those versions differ are marked "version note".

Layer forward (each layer reads its own `config.block_configs[i]`):

    if attention is not removed:   h = h + attn(input_layernorm(h))          # attn: GQA, or Linear(H, H)
    if ffn is not removed:         h = h + ffn(post_attention_layernorm(h))  # ffn: SwiGLU, or Linear(H, H)

A removed sub-block has no norm and no weights at all, and a layer with both removed (Ultra's "dummy" layers)
owns no parameters but keeps its index, so checkpoint keys can jump (no `model.layers.9.*`).

KV cache: only normal attention layers store keys/values. They are numbered densely in model order ("cache
slots"): slot 0 is the first real attention layer, whatever its layer index. This keeps the transformers
`Cache` API working unchanged: `cache.get_seq_length()` (which looks at slot 0) always reports the true past
length, even when layer 0 is linear or removed, and no cache layer is ever left empty in the middle.
"""

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_decilm import DeciLMConfig


logger = logging.get_logger(__name__)

# Version note: transformers renamed the cache argument and output field from `past_key_values` to `cache`
# (5.2x). generate() passes the cache under whichever name the installed version uses and reads it back from
# the same-named output field, so the forward accepts both names and the outputs use the installed field name.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def _model_output(output_cls, cache, **fields):
    fields[_CACHE_FIELD] = cache
    return output_cls(**fields)


# --------------------------------------------------------------------------------------------------------------
# Norm and rotary embedding
# --------------------------------------------------------------------------------------------------------------


class DeciLMRMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype, then scaled by the (ones-initialised) weight."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _llama3_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict) -> torch.Tensor:
    """Llama-3.1 frequency rescaling for long contexts.

    With L = original_max_position_embeddings, a frequency whose wavelength (2*pi / inv_freq) is longer than
    L / low_freq_factor is slowed down by `factor`; one shorter than L / high_freq_factor is kept; in the band
    between, the result moves linearly from "divided by factor" to "kept" as L / wavelength goes from
    low_freq_factor to high_freq_factor.
    """
    factor = float(rope_scaling["factor"])
    low = float(rope_scaling["low_freq_factor"])
    high = float(rope_scaling["high_freq_factor"])
    old_context = float(rope_scaling["original_max_position_embeddings"])

    wavelength = 2 * math.pi / inv_freq
    long_wave = wavelength > old_context / low
    short_wave = wavelength < old_context / high
    # 0 at the long-wavelength edge of the band, 1 at the short-wavelength edge.
    blend = (old_context / wavelength - low) / (high - low)
    in_band = (1 - blend) * inv_freq / factor + blend * inv_freq

    result = torch.where(long_wave, inv_freq / factor, inv_freq)
    return torch.where(~long_wave & ~short_wave, in_band, result)


def compute_inv_freq(config: DeciLMConfig) -> torch.Tensor:
    """Inverse RoPE frequencies (fp32, on CPU) for `config`: default, or llama3-scaled."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    if config.rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, config.rope_scaling)
    return inv_freq


class DeciLMRotaryEmbedding(nn.Module):
    """Computes cos/sin once per forward; every attention layer reuses them.

    The inverse frequencies are deliberately *not* a buffer: transformers 5.x builds models on the meta device
    and only re-creates registered buffers through `_init_weights`, and old checkpoints even contain stale
    `rotary_emb.inv_freq` tensors. Computing them lazily from the config (on CPU, in fp32, then moved) avoids
    both problems and keeps them out of the state dict.
    """

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.config = config
        self._inv_freq_by_device: dict = {}

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._inv_freq_by_device:
            self._inv_freq_by_device[key] = compute_inv_freq(self.config).to(device)
        return self._inv_freq_by_device[key]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple:
        inv_freq = self._inv_freq(x.device)
        # Angles must be computed in fp32 even under autocast: positions up to 131072 lose whole radians in bf16.
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[:, :, None].to(torch.float32) * inv_freq[None, None, :]
            emb = torch.cat((freqs, freqs), dim=-1)  # NeoX layout: the two halves share frequencies
            cos, sin = emb.cos(), emb.sin()
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim (NeoX style, not interleaved pairs)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    # q, k: [batch, heads, seq, head_dim]; cos, sin: [batch, seq, head_dim] -> broadcast over heads.
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, kv, s, d] -> [b, kv * n_rep, s, d]; query head h reads KV head h // n_rep (standard GQA grouping)."""
    if n_rep == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


# --------------------------------------------------------------------------------------------------------------
# Sub-blocks
# --------------------------------------------------------------------------------------------------------------


class DeciLMAttention(nn.Module):
    """Llama GQA attention with this layer's own number of KV heads."""

    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_slot: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.cache_slot = cache_slot
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.num_key_value_heads = config.num_kv_heads(layer_idx)
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout

        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple,
        attention_bias: Optional[torch.Tensor],
        cache: Optional[Cache],
    ) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, seq, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, seq, self.num_key_value_heads, self.head_dim).transpose(1, 2)

        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)

        if cache is not None:
            # Keys are cached after RoPE, before the GQA repeat (the cache holds this layer's own KV heads).
            k, v = cache.update(k, v, self.cache_slot)

        if attention_bias is not None and attention_bias.shape[-1] != k.shape[-2]:
            # The mask is built for past_len + query_len keys; a mismatch means the cache and the model disagree
            # on the past length (broadcasting would otherwise hide it for single-token steps).
            raise ValueError(
                f"layer {self.layer_idx}: {k.shape[-2]} keys but the attention mask covers {attention_bias.shape[-1]}"
            )
        k = repeat_kv(k, self.num_key_value_groups)
        v = repeat_kv(v, self.num_key_value_groups)
        dropout = self.attention_dropout if self.training else 0.0

        if getattr(self.config, "_attn_implementation", None) == "sdpa":
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_bias, dropout_p=dropout, scale=self.scaling
            )
        else:
            # Eager: scores in the model dtype, softmax in fp32 (as the released model), then back.
            scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
            if attention_bias is not None:
                scores = scores + attention_bias
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            probs = F.dropout(probs, p=dropout, training=self.training)
            out = torch.matmul(probs, v)

        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)


class DeciLMLinearAttention(nn.Module):
    """`attention.replace_with_linear`: one bias-free Linear(H, H); no RoPE, no cache, no token mixing."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.linear_attn(hidden_states)


class DeciLMMLP(nn.Module):
    """SwiGLU MLP with this layer's own intermediate size: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DeciLMConfig, layer_idx: int):
        super().__init__()
        self.intermediate_size = config.ffn_width(layer_idx)
        self.gate_proj = nn.Linear(config.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeciLMLinearMLP(nn.Module):
    """`ffn.replace_with_linear`: one bias-free Linear(H, H)."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)


class DeciLMDecoderLayer(nn.Module):
    """One heterogeneous layer. Removed sub-blocks are `None` and own no norm and no weights."""

    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_slot: Optional[int]):
        super().__init__()
        self.layer_idx = layer_idx
        block = config.block_configs[layer_idx]
        self.block_config = block

        self.input_layernorm = None
        self.self_attn = None
        if not block.attention.no_op:
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            if block.attention.replace_with_linear:
                self.self_attn = DeciLMLinearAttention(config)
            else:
                self.self_attn = DeciLMAttention(config, layer_idx, cache_slot)

        self.post_attention_layernorm = None
        self.mlp = None
        if not block.ffn.no_op:
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            if block.ffn.replace_with_linear:
                self.mlp = DeciLMLinearMLP(config)
            else:
                self.mlp = DeciLMMLP(config, layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple,
        attention_bias: Optional[torch.Tensor],
        cache: Optional[Cache],
    ) -> torch.Tensor:
        if self.self_attn is not None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
            hidden_states = self.self_attn(hidden_states, position_embeddings, attention_bias, cache)
            hidden_states = residual + hidden_states
        if self.mlp is not None:
            residual = hidden_states
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states = self.mlp(hidden_states)
            hidden_states = residual + hidden_states
        return hidden_states


# --------------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------------


def build_attention_bias(
    attention_mask: Optional[torch.Tensor],
    batch: int,
    query_len: int,
    past_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Additive mask [batch, 1, query_len, past_len + query_len]: 0 where a query may attend, dtype-min elsewhere.

    Causality is over cache slots: query j sits at slot past_len + j and sees slots <= its own. A 2-D
    `attention_mask` (1 = token, 0 = padding) covering past and current tokens also hides padded keys. A
    padded query may end up seeing no key at all; using the dtype minimum instead of -inf keeps its softmax
    finite (uniform), so no NaN can leak into the real tokens through the values of padding positions.
    A 4-D mask is taken as already complete: boolean (True = attend) or additive.
    """
    min_value = torch.finfo(dtype).min
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            zero = torch.zeros((), dtype=dtype, device=device)
            return torch.where(attention_mask.to(device), zero, torch.full((), min_value, dtype=dtype, device=device))
        return attention_mask.to(device=device, dtype=dtype)

    kv_len = past_len + query_len
    query_slots = torch.arange(past_len, kv_len, device=device)
    key_slots = torch.arange(kv_len, device=device)
    allowed = (key_slots[None, :] <= query_slots[:, None])[None, None, :, :]  # [1, 1, q, kv]
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_len:
            raise ValueError(
                f"attention_mask must be [batch, past + current length] = [{batch}, {kv_len}], "
                f"got {tuple(attention_mask.shape)}"
            )
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    allowed = allowed.expand(batch, 1, query_len, kv_len)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, min_value)


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DeciLMDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # Old checkpoints may carry per-layer rotary buffers; they are recomputed from the config.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flash_attn_2 = False
    _supports_flex_attn = False
    # Version note: transformers 4.x reads these to decide whether generate() may hand us a Cache object.
    _supports_cache_class = True
    _supports_static_cache = False

    def _init_weights(self, module: nn.Module) -> None:
        # Uses torch.nn.init (looked up at call time): transformers 5.x wraps those functions during loading so
        # that they skip tensors already loaded from the checkpoint.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, DeciLMRMSNorm):
            nn.init.ones_(module.weight)


class DeciLMModel(DeciLMPreTrainedModel):
    """embed_tokens -> heterogeneous layers -> final norm."""

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)

        layers = []
        next_slot = 0
        for layer_idx, block in enumerate(config.block_configs):
            slot = None
            if block.attention.is_normal:
                slot, next_slot = next_slot, next_slot + 1
            layers.append(DeciLMDecoderLayer(config, layer_idx, slot))
        self.layers = nn.ModuleList(layers)
        self.num_attention_layers = next_slot

        self.norm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeciLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ) -> Union[tuple, BaseModelOutputWithPast]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if kwargs.get("output_attentions"):
            raise NotImplementedError("DeciLM does not return attention weights")
        # Version note: `cache_position` (4.x / early 5.x generate) is ignored; positions come from the cache.
        if cache is None:
            cache = past_key_values
        if isinstance(cache, (tuple, list)):
            raise TypeError("legacy tuple caches are not supported; pass a transformers Cache (e.g. DynamicCache)")
        if use_cache is None:
            use_cache = self.config.use_cache
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, query_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device

        if use_cache and cache is None and self.num_attention_layers > 0:
            cache = DynamicCache()
        # Slot 0 is the first real attention layer, so this is the true number of cached tokens.
        past_len = cache.get_seq_length() if cache is not None else 0

        if position_ids is None:
            kv_len = past_len + query_len
            if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] == kv_len:
                # Count only real tokens, so a left-padded row gets the same positions as the unpadded sequence.
                position_ids = (attention_mask.to(device).long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
            else:
                position_ids = torch.arange(past_len, kv_len, device=device).unsqueeze(0).expand(batch, -1)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        position_ids = position_ids.to(device)

        hidden_states = inputs_embeds
        attention_bias = None
        position_embeddings = None
        if self.num_attention_layers > 0:
            attention_bias = build_attention_bias(
                attention_mask, batch, query_len, past_len, hidden_states.dtype, device
            )
            position_embeddings = self.rotary_emb(hidden_states, position_ids)

        # Hidden states follow the usual HF convention: the input of every layer, then the final normed output.
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(hidden_states, position_embeddings, attention_bias, cache)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = _model_output(
            BaseModelOutputWithPast,
            cache if use_cache else None,
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
        )
        return output if return_dict else output.to_tuple()


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    # Version note: transformers 5.x wants {tied: source}; 4.x wants the list of tied keys.
    if _TRANSFORMERS_MAJOR >= 5:
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def get_decoder(self) -> DeciLMModel:
        return self.model

    def set_decoder(self, decoder: DeciLMModel) -> None:
        self.model = decoder

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ) -> Union[tuple, CausalLMOutputWithPast]:
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        # generate() asks for the last position only (logits_to_keep=1): skip the vocab projection elsewhere.
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                hidden_states = hidden_states[:, -logits_to_keep:, :]
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states).float()

        loss = None
        if labels is not None:
            # Next-token loss: position t predicts label t+1; -100 marks ignored labels.
            shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)

        output = _model_output(
            CausalLMOutputWithPast,
            getattr(outputs, _CACHE_FIELD),
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["DeciLMPreTrainedModel", "DeciLMModel", "DeciLMForCausalLM"]
