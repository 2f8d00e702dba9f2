# coding=utf-8
"""Configuration of DeciLM / Nemotron-NAS heterogeneous decoder models.

This file is shipped next to converted checkpoints as `trust_remote_code` code, so it may only import
`torch`-free stdlib modules and `transformers`; it must never import `hetero_convert`.

A DeciLM model is a Llama decoder in which every layer ("block") carries its own description:

    block_configs[i] = {"attention": {...}, "ffn": {...}}

The attention sub-block is either normal GQA (with this layer's own KV-head count), a single `Linear(H, H)`
("replace_with_linear") or absent ("no_op"); the same three choices exist for the FFN, whose width is given by
`ffn_mult`. The top-level `intermediate_size` and `num_key_value_heads` are kept `null`, as in the released
configs, because no single value describes all layers: use `ffn_width(i)` and `num_kv_heads(i)` instead.

The parsing rules (defaults, the `ffn_mult` rounding, what is forced to None) follow the released NVIDIA
checkpoints. Features that no released checkpoint uses and that this implementation does not model (sliding
window, attention sinks) are rejected with a `ValueError` instead of being silently ignored.
"""

import dataclasses
from typing import Any, Optional

from transformers import PretrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Block configs
# --------------------------------------------------------------------------------------------------------------

# Keys of the newer (puzzletron) block schema that describe model features we do not implement. When one of them
# holds a real value we refuse the config: dropping it (what the released parser does with unknown keys) would
# build a different network than the checkpoint's.
_UNSUPPORTED_ATTENTION_KEYS = ("mamba", "llama4")
_UNSUPPORTED_FFN_KEYS = ("moe",)
_UNSUPPORTED_BLOCK_KEYS = ("parallel_blocks",)


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """Width of a SwiGLU FFN described by `ffn_mult`.

    `int()` truncates 2/3 * ffn_mult * hidden, then the result is rounded *up* to the next multiple of 256
    (e.g. hidden 8192, ffn_mult 1.0 -> 5461 -> 5632). `ffn_mult` is first rounded to 6 decimals, as the
    released parser stores it that way (it removes float noise such as 2.6250000001).
    """
    ffn_mult = round(float(ffn_mult), 6)
    width = int(2 * ffn_mult * hidden_size / 3)
    remainder = width % 256
    if remainder:
        width += 256 - remainder
    return width


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """One layer's attention sub-block (released field names and defaults)."""

    no_op: bool = False
    replace_with_linear: bool = False
    # GQA group size: this layer has num_attention_heads // n_heads_in_group KV heads.
    n_heads_in_group: Optional[int] = None
    window_length: Optional[int] = None
    num_sink_tokens: Optional[int] = None
    use_prefill_window_in_sink_attention: bool = False
    unshifted_sink: bool = False
    # A training-only guard in the released code; it changes neither weights nor the forward pass.
    sparsify: Optional[tuple] = None
    # Newer schema: the KV-head count stated directly. Kept only when the input used it, so that released
    # configs serialise back to exactly their released keys.
    num_key_value_heads: Optional[int] = None

    @property
    def is_normal(self) -> bool:
        return not self.no_op and not self.replace_with_linear


@dataclasses.dataclass(frozen=True)
class FFNConfig:
    """One layer's FFN sub-block (released field names and defaults)."""

    no_op: bool = False
    replace_with_linear: bool = False
    ffn_mult: Optional[float] = None
    sparsify: Optional[tuple] = None
    # Newer schema: the width stated directly (kept only when the input used it).
    intermediate_size: Optional[int] = None

    @property
    def is_normal(self) -> bool:
        return not self.no_op and not self.replace_with_linear


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    @property
    def is_dummy(self) -> bool:
        """Both sub-blocks removed: the layer is an identity and owns no parameters (Ultra-253B)."""
        return self.attention.no_op and self.ffn.no_op


def _as_bool(value: Any, name: str, layer_idx: int) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"block_configs[{layer_idx}]: `{name}` must be a boolean, got {value!r}")
    return value


def _as_positive_int(value: Any, name: str, layer_idx: int) -> Optional[int]:
    if value is None:
        return None
    # JSON may give 8.0; anything that is not a whole number is a broken config.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value <= 0:
        raise ValueError(f"block_configs[{layer_idx}]: `{name}` must be a positive integer, got {value!r}")
    return int(value)


def _as_sparsify(value: Any) -> Optional[tuple]:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _split_known_keys(raw: dict, known: set, what: str, layer_idx: int, unsupported: tuple) -> dict:
    """Keep the keys we understand; refuse features we do not model; warn about and drop anything else."""
    for key in unsupported:
        if raw.get(key) not in (None, False, {}, []):
            raise ValueError(
                f"block_configs[{layer_idx}].{what}.{key} = {raw[key]!r} is not supported by this DeciLM "
                f"implementation"
            )
    unknown = sorted(set(raw) - known - set(unsupported))
    if unknown:
        logger.warning("block_configs[%d].%s: ignoring unknown keys %s", layer_idx, what, unknown)
    return {k: v for k, v in raw.items() if k in known}


_ATTENTION_KEYS = {f.name for f in dataclasses.fields(AttentionConfig)}
_FFN_KEYS = {f.name for f in dataclasses.fields(FFNConfig)}


def _parse_attention(raw: Any, layer_idx: int, num_attention_heads: int) -> AttentionConfig:
    if isinstance(raw, AttentionConfig):
        raw = _subblock_to_dict(raw)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"block_configs[{layer_idx}].attention must be a dict, got {type(raw).__name__}")
    raw = _split_known_keys(raw, _ATTENTION_KEYS, "attention", layer_idx, _UNSUPPORTED_ATTENTION_KEYS)

    no_op = _as_bool(raw.get("no_op"), "attention.no_op", layer_idx)
    linear = _as_bool(raw.get("replace_with_linear"), "attention.replace_with_linear", layer_idx)
    if no_op and linear:
        raise ValueError(
            f"block_configs[{layer_idx}].attention: `no_op` and `replace_with_linear` cannot both be true"
        )
    sparsify = _as_sparsify(raw.get("sparsify"))
    if no_op or linear:
        # Released semantics: the GQA / window / sink fields mean nothing without real attention and are
        # forced to None.
        return AttentionConfig(no_op=no_op, replace_with_linear=linear, sparsify=sparsify)

    window_length = raw.get("window_length")
    num_sink_tokens = raw.get("num_sink_tokens")
    unshifted_sink = _as_bool(raw.get("unshifted_sink"), "attention.unshifted_sink", layer_idx)
    if window_length is not None or num_sink_tokens is not None or unshifted_sink:
        raise ValueError(
            f"block_configs[{layer_idx}].attention: sliding-window / attention-sink layers (window_length="
            f"{window_length!r}, num_sink_tokens={num_sink_tokens!r}, unshifted_sink={unshifted_sink}) are not "
            f"supported here (no released Nemotron-NAS checkpoint uses them)"
        )

    group = _as_positive_int(raw.get("n_heads_in_group"), "attention.n_heads_in_group", layer_idx)
    kv_heads = _as_positive_int(raw.get("num_key_value_heads"), "attention.num_key_value_heads", layer_idx)
    if group is None and kv_heads is None:
        raise ValueError(
            f"block_configs[{layer_idx}].attention: a normal attention layer needs `n_heads_in_group` "
            f"(or `num_key_value_heads`)"
        )
    if group is not None and num_attention_heads % group != 0:
        raise ValueError(
            f"block_configs[{layer_idx}].attention: num_attention_heads={num_attention_heads} is not divisible "
            f"by n_heads_in_group={group}"
        )
    if kv_heads is not None:
        if num_attention_heads % kv_heads != 0:
            raise ValueError(
                f"block_configs[{layer_idx}].attention: num_attention_heads={num_attention_heads} is not "
                f"divisible by num_key_value_heads={kv_heads}"
            )
        if group is None:
            group = num_attention_heads // kv_heads
        elif num_attention_heads // group != kv_heads:
            raise ValueError(
                f"block_configs[{layer_idx}].attention: n_heads_in_group={group} and num_key_value_heads="
                f"{kv_heads} disagree for num_attention_heads={num_attention_heads}"
            )
    return AttentionConfig(
        n_heads_in_group=group,
        use_prefill_window_in_sink_attention=_as_bool(
            raw.get("use_prefill_window_in_sink_attention"), "attention.use_prefill_window_in_sink_attention",
            layer_idx,
        ),
        sparsify=sparsify,
        num_key_value_heads=kv_heads,
    )


def _parse_ffn(raw: Any, layer_idx: int, hidden_size: int) -> FFNConfig:
    if isinstance(raw, FFNConfig):
        raw = _subblock_to_dict(raw)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"block_configs[{layer_idx}].ffn must be a dict, got {type(raw).__name__}")
    # Older puzzletron files carry a per-FFN activation and a `gated` flag; only gated SiLU (SwiGLU) is modelled.
    if raw.get("hidden_act") not in (None, "silu") or raw.get("gated") is False:
        raise ValueError(
            f"block_configs[{layer_idx}].ffn: only a gated SiLU (SwiGLU) FFN is supported, got "
            f"hidden_act={raw.get('hidden_act')!r}, gated={raw.get('gated')!r}"
        )
    raw = _split_known_keys(
        {k: v for k, v in raw.items() if k not in ("hidden_act", "gated")},
        _FFN_KEYS, "ffn", layer_idx, _UNSUPPORTED_FFN_KEYS,
    )

    no_op = _as_bool(raw.get("no_op"), "ffn.no_op", layer_idx)
    linear = _as_bool(raw.get("replace_with_linear"), "ffn.replace_with_linear", layer_idx)
    if no_op and linear:
        raise ValueError(f"block_configs[{layer_idx}].ffn: `no_op` and `replace_with_linear` cannot both be true")
    sparsify = _as_sparsify(raw.get("sparsify"))
    if no_op or linear:
        return FFNConfig(no_op=no_op, replace_with_linear=linear, sparsify=sparsify)

    ffn_mult = raw.get("ffn_mult")
    width = _as_positive_int(raw.get("intermediate_size"), "ffn.intermediate_size", layer_idx)
    if ffn_mult is None and width is None:
        raise ValueError(
            f"block_configs[{layer_idx}].ffn: a normal FFN needs `ffn_mult` (or `intermediate_size`)"
        )
    if ffn_mult is not None:
        if isinstance(ffn_mult, bool) or not isinstance(ffn_mult, (int, float)) or ffn_mult <= 0:
            raise ValueError(f"block_configs[{layer_idx}].ffn: `ffn_mult` must be a positive number, got {ffn_mult!r}")
        ffn_mult = round(float(ffn_mult), 6)
        if width is not None and ffn_mult_to_intermediate_size(ffn_mult, hidden_size) != width:
            raise ValueError(
                f"block_configs[{layer_idx}].ffn: ffn_mult={ffn_mult} gives width "
                f"{ffn_mult_to_intermediate_size(ffn_mult, hidden_size)}, but intermediate_size={width}"
            )
    return FFNConfig(ffn_mult=ffn_mult, sparsify=sparsify, intermediate_size=width)


def parse_block_config(raw: Any, layer_idx: int, num_attention_heads: int, hidden_size: int) -> BlockConfig:
    """Turn one `block_configs` entry (a dict, or an already parsed BlockConfig) into a validated BlockConfig."""
    if isinstance(raw, BlockConfig):
        raw = {"attention": raw.attention, "ffn": raw.ffn}
    if not isinstance(raw, dict):
        raise ValueError(f"block_configs[{layer_idx}] must be a dict, got {type(raw).__name__}")
    for key in _UNSUPPORTED_BLOCK_KEYS:
        if raw.get(key) not in (None, False, {}, []):
            raise ValueError(f"block_configs[{layer_idx}].{key} is not supported by this DeciLM implementation")
    unknown = sorted(set(raw) - {"attention", "ffn"} - set(_UNSUPPORTED_BLOCK_KEYS))
    if unknown:
        logger.warning("block_configs[%d]: ignoring unknown keys %s", layer_idx, unknown)
    return BlockConfig(
        attention=_parse_attention(raw.get("attention"), layer_idx, num_attention_heads),
        ffn=_parse_ffn(raw.get("ffn"), layer_idx, hidden_size),
    )


def _subblock_to_dict(sub) -> dict:
    """Released form: every released key, even at its default; newer-schema keys only when they are set."""
    out = dataclasses.asdict(sub)
    if out.get("sparsify") is not None:
        out["sparsify"] = list(out["sparsify"])
    for newer_key in ("num_key_value_heads", "intermediate_size"):
        if newer_key in out and out[newer_key] is None:
            del out[newer_key]
    return out


def block_config_to_dict(block: BlockConfig) -> dict:
    return {"attention": _subblock_to_dict(block.attention), "ffn": _subblock_to_dict(block.ffn)}


# --------------------------------------------------------------------------------------------------------------
# RoPE settings
# --------------------------------------------------------------------------------------------------------------

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_type_of(rope_scaling: Optional[dict]) -> str:
    """The rope type is `rope_scaling.rope_type` (older files: `type`), "default" when absent."""
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default")) or "default"


def _validate_rope_scaling(rope_scaling: Optional[dict]) -> None:
    if rope_scaling is None:
        return
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or null, got {rope_scaling!r}")
    rope_type = rope_type_of(rope_scaling)
    if rope_type == "llama3":
        missing = [k for k in _LLAMA3_KEYS if rope_scaling.get(k) is None]
        if missing:
            raise ValueError(f"llama3 rope_scaling is missing {missing}")
        if rope_scaling["high_freq_factor"] <= rope_scaling["low_freq_factor"]:
            raise ValueError("llama3 rope_scaling needs high_freq_factor > low_freq_factor")
    elif rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported (only 'default' and 'llama3')")


# --------------------------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------------------------


class DeciLMConfig(PretrainedConfig):
    r"""Configuration of a DeciLM / Nemotron-NAS model.

    Args mirror the released `config.json` files. `block_configs` is a list with one
    `{"attention": {...}, "ffn": {...}}` dict per layer (partial dicts take defaults); it is stored parsed, as
    `BlockConfig` objects, and written back in the released dict form by `to_dict()`.

    `intermediate_size` and `num_key_value_heads` are accepted but always stored as None (released behaviour):
    per-layer values come from `num_kv_heads(i)` and `ffn_width(i)`.
    """

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        rms_norm_eps: float = 1e-5,
        hidden_act: str = "silu",
        rope_theta: float = 10000.0,
        rope_scaling: Optional[dict] = None,
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        attention_dropout: float = 0.0,
        pretraining_tp: int = 1,
        bos_token_id: Optional[int] = 1,
        eos_token_id: Any = 2,
        pad_token_id: Optional[int] = None,
        block_configs: Optional[list] = None,
        intermediate_size: Optional[int] = None,
        num_key_value_heads: Optional[int] = None,
        **kwargs,
    ):
        if hidden_act != "silu":
            raise ValueError(f"DeciLM only supports hidden_act='silu' (SwiGLU), got {hidden_act!r}")
        if attention_bias or mlp_bias or kwargs.get("o_proj_bias"):
            raise ValueError("DeciLM checkpoints have bias-free projections; attention_bias/mlp_bias must be false")
        if hidden_size % num_attention_heads != 0:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}")
        head_dim = kwargs.pop("head_dim", None)
        if head_dim is not None and head_dim != hidden_size // num_attention_heads:
            raise ValueError(
                f"head_dim={head_dim} differs from hidden_size // num_attention_heads="
                f"{hidden_size // num_attention_heads}; only the released layout is supported"
            )
        if kwargs.get("num_key_value_heads_per_layer") is not None and block_configs is None:
            raise ValueError("the DeciLM-7B format (num_key_value_heads_per_layer) is not supported; use block_configs")
        if pretraining_tp not in (None, 1):
            raise ValueError(f"pretraining_tp={pretraining_tp} is not supported (only 1)")

        # Configs written by transformers 5.x tooling may carry `rope_parameters` (theta inside) instead of
        # `rope_theta` + `rope_scaling`; fold it back into the released pair.
        rope_parameters = kwargs.pop("rope_parameters", None)
        if rope_parameters and rope_scaling is None:
            rope_parameters = dict(rope_parameters)
            rope_theta = rope_parameters.pop("rope_theta", rope_theta)
            rope_scaling = rope_parameters if rope_type_of(rope_parameters) != "default" else None
        _validate_rope_scaling(rope_scaling)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.rope_theta = float(rope_theta)
        self.rope_scaling = dict(rope_scaling) if rope_scaling is not None else None
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.attention_bias = False
        self.mlp_bias = False
        self.attention_dropout = attention_dropout
        self.pretraining_tp = pretraining_tp
        # Released behaviour: these two are always null; they are per-layer quantities here.
        self.intermediate_size = None
        self.num_key_value_heads = None

        if block_configs is None:
            # Only so that `DeciLMConfig()` works (transformers 4.x builds a default instance to diff against):
            # plain multi-head Llama layers.
            block_configs = [{"attention": {"n_heads_in_group": 1}, "ffn": {"ffn_mult": 2.625}}] * num_hidden_layers
        if len(block_configs) != num_hidden_layers:
            raise ValueError(
                f"len(block_configs)={len(block_configs)} does not match num_hidden_layers={num_hidden_layers}"
            )
        self.block_configs = [
            parse_block_config(raw, i, num_attention_heads, hidden_size) for i, raw in enumerate(block_configs)
        ]

        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # transformers 5.x no longer treats these as base-class arguments (it stores them from **kwargs); set
        # them explicitly so every version ends up with the same attributes.
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.tie_word_embeddings = tie_word_embeddings

    # transformers 5.x turns `rope_scaling` into a deprecated alias of `rope_parameters` on the base class. DeciLM
    # configs keep the released pair (`rope_theta`, `rope_scaling`), so shadow that alias with a plain attribute
    # stored in __dict__ (which is also what `to_dict()` serialises).
    @property
    def rope_scaling(self) -> Optional[dict]:
        return self.__dict__.get("rope_scaling")

    @rope_scaling.setter
    def rope_scaling(self, value: Optional[dict]) -> None:
        self.__dict__["rope_scaling"] = value

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_type(self) -> str:
        return rope_type_of(self.rope_scaling)

    # ---- per-layer helpers -------------------------------------------------------------------------------

    def num_kv_heads(self, layer_idx: int) -> int:
        """KV heads of a normal attention layer; 0 for a linear or removed attention."""
        attn = self.block_configs[layer_idx].attention
        if not attn.is_normal:
            return 0
        return self.num_attention_heads // attn.n_heads_in_group

    def ffn_width(self, layer_idx: int) -> int:
        """Intermediate size of a normal FFN; 0 for a linear or removed FFN."""
        ffn = self.block_configs[layer_idx].ffn
        if not ffn.is_normal:
            return 0
        if ffn.intermediate_size is not None:
            return ffn.intermediate_size
        return ffn_mult_to_intermediate_size(ffn.ffn_mult, self.hidden_size)

    # ---- serialisation -----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        output = super().to_dict()
        # Released form: plain dicts listing every sub-block key (the released code used dataclasses.asdict).
        output["block_configs"] = [block_config_to_dict(b) for b in self.block_configs]
        # `rope_scaling` is a plain attribute here; make sure transformers 5.x helpers did not add the 5.x name.
        output.pop("rope_parameters", None)
        return output
