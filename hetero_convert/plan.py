"""config.json -> per-layer plan.

A `ModelPlan` is the one description of a model that every other module works from: the converter maps
tensors per layer kind, the spec builder feeds megatron-core, the HF exporter regenerates `block_configs`,
and `inspect` counts parameters, all from the same plan. It is built from any config form found in the wild
(see `load_plan`), and building it is where bad configs are rejected, with the layer named.

Layer kinds:
  attention: "gqa" (softmax attention with this layer's own KV-head count), "linear" (one H x H matrix
             after the input norm, with a residual add), "none" (no norm, no attention, no residual).
  ffn:       "swiglu" (gate/up/down with this layer's own width), "linear", "none".
A layer with both parts "none" is a dummy layer (Ultra-253B has 81 of them): identity, no parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_checks import check_config, read_config_file

GQA, LINEAR, NONE, SWIGLU = "gqa", "linear", "none", "swiglu"

DECILM_MODEL_TYPES = ("nemotron-nas", "deci")

# Released block_configs list every subblock field (the remote code serialises dataclasses with asdict),
# in this key order. We regenerate exactly this form on export.
RELEASED_ATTENTION_DEFAULTS: dict[str, Any] = {
    "n_heads_in_group": None,
    "no_op": False,
    "num_sink_tokens": None,
    "replace_with_linear": False,
    "sparsify": None,
    "unshifted_sink": False,
    "use_prefill_window_in_sink_attention": False,
    "window_length": None,
}
RELEASED_FFN_DEFAULTS: dict[str, Any] = {
    "ffn_mult": None,
    "no_op": False,
    "replace_with_linear": False,
    "sparsify": None,
}
# Fields of the newer (Model-Optimizer puzzletron) schema that we understand: they state counts directly.
NEWER_ATTENTION_KEYS = {"num_key_value_heads"}
NEWER_FFN_KEYS = {"intermediate_size"}
# Fields whose non-default value changes the forward pass in a way this project does not implement.
# Accepting them silently would produce a model that computes something else, so they are refused.
UNSUPPORTED_ATTENTION = {
    "window_length": None,
    "num_sink_tokens": None,
    "unshifted_sink": False,
    "use_prefill_window_in_sink_attention": False,
    "mamba": None,
    "llama4": None,
    "head_dim": None,
    "position_embedding_type": "rope",
}
UNSUPPORTED_FFN = {"moe": None, "hidden_act": "silu", "gated": True}
# Fields with no effect on the forward pass or on the weights.
HARMLESS_KEYS = {"sparsify", "weights_precision"}


class PlanError(ValueError):
    """A config that cannot be planned. The message names the layer (0-based) where one is involved."""


def ffn_mult_to_width(ffn_mult: float, hidden_size: int) -> int:
    """The DeciLM rule: int(2*m*H/3) rounded up to a multiple of 256 (ffn_mult first rounded to 6 decimals)."""
    width = int(2 * round(ffn_mult, 6) * hidden_size / 3)
    return width if width % 256 == 0 else width + 256 - width % 256


def width_to_ffn_mult(width: int, hidden_size: int) -> float | None:
    """The shortest 6-decimal ffn_mult that reproduces `width` exactly, or None if none can."""
    if width % 256:
        return None  # the rule always yields a multiple of 256
    exact = 3 * width / (2 * hidden_size)
    for digits in range(0, 7):
        for candidate in (round(exact, digits), round(exact + 10**-digits, digits)):
            if candidate > 0 and ffn_mult_to_width(candidate, hidden_size) == width:
                return candidate
    return None


@dataclass(frozen=True)
class Attention:
    kind: str  # GQA | LINEAR | NONE
    num_kv_heads: int | None = None

    def __post_init__(self):
        assert self.kind in (GQA, LINEAR, NONE), self.kind
        assert (self.kind == GQA) == (self.num_kv_heads is not None), self


@dataclass(frozen=True)
class FFN:
    kind: str  # SWIGLU | LINEAR | NONE
    width: int | None = None
    # As stated by the source config (rounded to 6 decimals), else derived from the width when expressible.
    ffn_mult: float | None = None

    def __post_init__(self):
        assert self.kind in (SWIGLU, LINEAR, NONE), self.kind
        assert (self.kind == SWIGLU) == (self.width is not None), self


@dataclass(frozen=True)
class LayerPlan:
    index: int
    attention: Attention
    ffn: FFN

    @property
    def is_dummy(self) -> bool:
        return self.attention.kind == NONE and self.ffn.kind == NONE

    def describe(self) -> str:
        a = {GQA: f"GQA kv={self.attention.num_kv_heads}", LINEAR: "linear", NONE: "-"}[self.attention.kind]
        f = {SWIGLU: f"SwiGLU {self.ffn.width}", LINEAR: "linear", NONE: "-"}[self.ffn.kind]
        return "dummy" if self.is_dummy else f"{a} | {f}"


@dataclass(frozen=True)
class ModelPlan:
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    layers: tuple[LayerPlan, ...]
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None (plain RoPE) or the normalised llama3 dict: rope_type, factor, low/high_freq_factor, original_max.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    # Where the plan came from: "decilm", "decilm-newer", "decilm-7b", "llama".
    source_format: str = "decilm"
    # Token ids, carried through to the exported config untouched.
    special_tokens: dict = field(default_factory=dict)

    # ---- dimensions --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_factor(self) -> float | None:
        return None if self.rope_scaling is None else float(self.rope_scaling["factor"])

    def qkv_rows(self, layer: LayerPlan) -> int:
        return (self.num_attention_heads + 2 * layer.attention.num_kv_heads) * self.head_dim

    # ---- counting ------------------------------------------------------------------------------------
    def layer_parameters(self, layer: LayerPlan) -> dict[str, int]:
        h, attn, ffn = self.hidden_size, 0, 0
        if layer.attention.kind == GQA:  # norm + QKV + output projection
            attn = h + self.qkv_rows(layer) * h + h * self.num_attention_heads * self.head_dim
        elif layer.attention.kind == LINEAR:  # norm + H x H
            attn = h + h * h
        if layer.ffn.kind == SWIGLU:  # norm + gate, up, down
            ffn = h + 3 * h * layer.ffn.width
        elif layer.ffn.kind == LINEAR:
            ffn = h + h * h
        return {"attention": attn, "ffn": ffn, "total": attn + ffn}

    def embedding_parameters(self) -> int:
        per = self.vocab_size * self.hidden_size
        return per if self.tie_word_embeddings else 2 * per

    def num_parameters(self, include_embeddings: bool = True) -> int:
        body = sum(self.layer_parameters(layer)["total"] for layer in self.layers) + self.hidden_size
        return body + (self.embedding_parameters() if include_embeddings else 0)

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        kv_heads = sum(l.attention.num_kv_heads for l in self.layers if l.attention.kind == GQA)
        return 2 * kv_heads * self.head_dim * bytes_per_value

    # ---- regenerating configs ------------------------------------------------------------------------
    def hf_block_configs(self) -> list[dict]:
        """block_configs in the released form: every subblock key, ffn_mult for widths."""
        out = []
        for layer in self.layers:
            attn = dict(RELEASED_ATTENTION_DEFAULTS)
            attn["no_op"] = layer.attention.kind == NONE
            attn["replace_with_linear"] = layer.attention.kind == LINEAR
            if layer.attention.kind == GQA:
                attn["n_heads_in_group"] = self.num_attention_heads // layer.attention.num_kv_heads
            ffn = dict(RELEASED_FFN_DEFAULTS)
            ffn["no_op"] = layer.ffn.kind == NONE
            ffn["replace_with_linear"] = layer.ffn.kind == LINEAR
            if layer.ffn.kind == SWIGLU:
                mult = layer.ffn.ffn_mult or width_to_ffn_mult(layer.ffn.width, self.hidden_size)
                if mult is not None and ffn_mult_to_width(mult, self.hidden_size) == layer.ffn.width:
                    ffn["ffn_mult"] = mult
                else:
                    # Not expressible as ffn_mult (width not a multiple of 256): state it in the newer schema,
                    # which our HF model and megatron-core both read.
                    ffn["intermediate_size"] = layer.ffn.width
            out.append({"attention": attn, "ffn": ffn})
        return out

    def megatron_block_configs(self) -> list[dict]:
        """block_configs in megatron-core's native keys, so its parser never has to guess or pop."""
        return [
            {
                "attention": {
                    "no_op": l.attention.kind == NONE,
                    "replace_with_linear": l.attention.kind == LINEAR,
                    "num_query_groups": l.attention.num_kv_heads,
                },
                "mlp": {
                    "no_op": l.ffn.kind == NONE,
                    "replace_with_linear": l.ffn.kind == LINEAR,
                    "ffn_hidden_size": l.ffn.width,
                },
            }
            for l in self.layers
        ]

    def hf_config(self) -> dict:
        """A complete DeciLM config.json (without auto_map, which the exporter adds with the code files)."""
        cfg = {
            "architectures": ["DeciLMForCausalLM"],
            "model_type": "nemotron-nas",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": None,
            "max_position_embeddings": self.max_position_embeddings,
            "mlp_bias": False,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": None,
            "pretraining_tp": 1,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
            "vocab_size": self.vocab_size,
            "block_configs": self.hf_block_configs(),
        }
        cfg.update(self.special_tokens)
        return cfg

    def llama_config(self) -> dict | None:
        """A LlamaForCausalLM config.json when every layer is the same GQA + SwiGLU layer, else None."""
        kinds = {(l.attention.kind, l.attention.num_kv_heads, l.ffn.kind, l.ffn.width) for l in self.layers}
        if len(kinds) != 1:
            return None
        attn, kv, ffn, width = kinds.pop()
        if attn != GQA or ffn != SWIGLU:
            return None
        cfg = {k: v for k, v in self.hf_config().items() if k not in ("block_configs",)}
        cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", num_key_value_heads=kv,
                   intermediate_size=width, head_dim=self.head_dim)
        return cfg

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ModelPlan":
        d = dict(d)
        d["layers"] = tuple(
            LayerPlan(l["index"], Attention(**l["attention"]), FFN(**l["ffn"])) for l in d["layers"]
        )
        return cls(**d)


# ---- parsing ---------------------------------------------------------------------------------------------


def config_path(path: str | Path) -> Path:
    p = Path(path)
    return p / "config.json" if p.is_dir() else p


def load_config(path: str | Path) -> dict:
    """Read config.json from a checkpoint directory or a file path."""
    p = config_path(path)
    if not p.is_file():
        raise PlanError(f"no config.json at {path}")
    return read_config_file(p)  # a JSON object, bounded, no duplicate keys


def load_plan(source: str | Path | dict) -> ModelPlan:
    """Build the per-layer plan from a config dict, a config.json path, or a checkpoint directory.

    Accepted forms:
      - released Nemotron-NAS configs (`block_configs` with full subblock dicts; `n_heads_in_group`,
        `ffn_mult`; model_type "nemotron-nas" or "deci"), and partial subblock dicts relying on defaults;
      - the newer schema stating `num_key_value_heads` / `intermediate_size` per block;
      - Deci/DeciLM-7B: `num_key_value_heads_per_layer` with a global `intermediate_size`;
      - plain LlamaForCausalLM configs.
    """
    cfg = source if isinstance(source, dict) else load_config(source)
    check_config(cfg, "config" if isinstance(source, dict) else str(config_path(source)))
    return _Parser(cfg).plan()


class _Parser:
    def __init__(self, cfg: dict):
        self.cfg = cfg

    def need(self, key: str):
        if self.cfg.get(key) is None:
            raise PlanError(f"config has no '{key}'")
        return self.cfg[key]

    def plan(self) -> ModelPlan:
        c = self.cfg
        hidden, heads = int(self.need("hidden_size")), int(self.need("num_attention_heads"))
        num_layers, vocab = int(self.need("num_hidden_layers")), int(self.need("vocab_size"))
        if hidden % heads:
            raise PlanError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        if c.get("head_dim") is not None and int(c["head_dim"]) != hidden // heads:
            raise PlanError(
                f"head_dim {c['head_dim']} is inconsistent with hidden_size/num_attention_heads = "
                f"{hidden}/{heads} = {hidden // heads}; such models are not supported"
            )
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise PlanError(f"hidden_act '{act}' is not supported: DeciLM and Llama MLPs use SiLU (SwiGLU)")
        for bias in ("attention_bias", "mlp_bias", "o_proj_bias"):
            if c.get(bias):
                raise PlanError(f"{bias}=true is not supported: DeciLM/Llama layers are bias-free")

        if "block_configs" in c and c["block_configs"] is not None:
            layers, fmt = self.parse_blocks(c["block_configs"], num_layers, hidden, heads)
        elif c.get("num_key_value_heads_per_layer") is not None:
            layers, fmt = self.parse_decilm_7b(num_layers, heads), "decilm-7b"
        else:
            layers, fmt = self.parse_llama(num_layers, heads), "llama"

        special = {k: c[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in c}
        return ModelPlan(
            hidden_size=hidden,
            num_attention_heads=heads,
            vocab_size=vocab,
            layers=tuple(layers),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta(c),
            rope_scaling=parse_rope_scaling(rope_scaling_dict(c)),
            max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            torch_dtype=str(c.get("torch_dtype") or c.get("dtype") or "bfloat16"),
            source_format=fmt,
            special_tokens=special,
        )

    def parse_llama(self, num_layers: int, heads: int) -> list[LayerPlan]:
        kv = int(self.cfg.get("num_key_value_heads") or heads)
        width = int(self.need("intermediate_size"))
        if heads % kv:
            raise PlanError(f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv}")
        return [LayerPlan(i, Attention(GQA, kv), FFN(SWIGLU, width)) for i in range(num_layers)]

    def parse_decilm_7b(self, num_layers: int, heads: int) -> list[LayerPlan]:
        per_layer = self.cfg["num_key_value_heads_per_layer"]
        if len(per_layer) != num_layers:
            raise PlanError(
                f"num_key_value_heads_per_layer has {len(per_layer)} entries but num_hidden_layers is {num_layers}"
            )
        width = int(self.need("intermediate_size"))
        layers = []
        for i, kv in enumerate(per_layer):
            if not kv or heads % int(kv):
                raise PlanError(f"layer {i}: num_attention_heads {heads} is not divisible by {kv} KV heads")
            layers.append(LayerPlan(i, Attention(GQA, int(kv)), FFN(SWIGLU, width)))
        return layers

    def parse_blocks(self, blocks, num_layers, hidden, heads) -> tuple[list[LayerPlan], str]:
        if len(blocks) != num_layers:
            raise PlanError(f"block_configs has {len(blocks)} blocks but num_hidden_layers is {num_layers}")
        newer = False
        layers = []
        for i, block in enumerate(blocks):
            if not isinstance(block, dict):
                raise PlanError(f"layer {i}: block config is not a dict: {block!r}")
            extra = set(block) - {"attention", "ffn", "mlp", "parallel_blocks"}
            if extra:
                raise PlanError(f"layer {i}: unknown block keys {sorted(extra)}")
            if block.get("parallel_blocks"):
                raise PlanError(f"layer {i}: parallel_blocks are not supported")
            attn_d = block.get("attention") or {}
            ffn_d = block.get("ffn") if block.get("ffn") is not None else (block.get("mlp") or {})
            attention, n1 = self.parse_attention(i, attn_d, heads)
            ffn, n2 = self.parse_ffn(i, ffn_d, hidden)
            newer |= n1 or n2
            layers.append(LayerPlan(i, attention, ffn))
        return layers, ("decilm-newer" if newer else "decilm")

    @staticmethod
    def check_keys(i: int, part: str, d: dict, known: set, unsupported: dict):
        unknown = set(d) - known - set(unsupported) - HARMLESS_KEYS
        if unknown:
            raise PlanError(f"layer {i}: unknown {part} keys {sorted(unknown)}; refusing to guess their meaning")
        for key, default in unsupported.items():
            if key in d and d[key] is not None and d[key] != default:
                what = {"window_length": "sliding-window attention ", "num_sink_tokens": "sink attention ",
                        "unshifted_sink": "unshifted-sink attention "}.get(key, "")
                raise PlanError(f"layer {i}: {what}({part}.{key}={d[key]!r}) is not supported")
        if d.get("no_op") and d.get("replace_with_linear"):
            raise PlanError(f"layer {i}: {part} has both no_op and replace_with_linear set")

    def parse_attention(self, i: int, d: dict, heads: int) -> tuple[Attention, bool]:
        self.check_keys(i, "attention", d, set(RELEASED_ATTENTION_DEFAULTS) | NEWER_ATTENTION_KEYS,
                        UNSUPPORTED_ATTENTION)
        if d.get("no_op"):
            return Attention(NONE), False
        if d.get("replace_with_linear"):
            return Attention(LINEAR), False
        if d.get("num_key_value_heads") is not None:
            kv = int(d["num_key_value_heads"])
            if kv <= 0 or heads % kv:
                raise PlanError(f"layer {i}: num_attention_heads {heads} is not divisible by {kv} KV heads")
            return Attention(GQA, kv), True
        group = d.get("n_heads_in_group")
        if group is None:
            raise PlanError(f"layer {i}: normal attention needs n_heads_in_group (or num_key_value_heads)")
        group = int(group)
        if group <= 0 or heads % group:
            raise PlanError(f"layer {i}: num_attention_heads {heads} is not divisible by n_heads_in_group {group}")
        return Attention(GQA, heads // group), False

    def parse_ffn(self, i: int, d: dict, hidden: int) -> tuple[FFN, bool]:
        self.check_keys(i, "ffn", d, set(RELEASED_FFN_DEFAULTS) | NEWER_FFN_KEYS, UNSUPPORTED_FFN)
        if d.get("no_op"):
            return FFN(NONE), False
        if d.get("replace_with_linear"):
            return FFN(LINEAR), False
        if d.get("intermediate_size") is not None:
            width = int(d["intermediate_size"])
            if width <= 0:
                raise PlanError(f"layer {i}: ffn.intermediate_size must be positive, got {width}")
            return FFN(SWIGLU, width, width_to_ffn_mult(width, hidden)), True
        if d.get("ffn_mult") is None:
            raise PlanError(f"layer {i}: normal FFN needs ffn_mult (or intermediate_size)")
        mult = round(float(d["ffn_mult"]), 6)
        if mult <= 0:
            raise PlanError(f"layer {i}: ffn_mult must be positive, got {mult}")
        return FFN(SWIGLU, ffn_mult_to_width(mult, hidden), mult), False


def rope_theta(c: dict) -> float:
    """transformers 5.x saves RoPE as `rope_parameters: {"rope_theta": ..., "rope_type": ...}` and no top-level
    `rope_theta`; reading only the old key would silently fall back to 10000 (seen on SmolLM2: theta 100000)."""
    params = c.get("rope_parameters") or {}
    if "rope_theta" in params:
        if c.get("rope_theta") is not None and float(c["rope_theta"]) != float(params["rope_theta"]):
            raise PlanError(f"rope_theta {c['rope_theta']} contradicts rope_parameters.rope_theta {params['rope_theta']}")
        return float(params["rope_theta"])
    return float(c.get("rope_theta", 10000.0))


def rope_scaling_dict(c: dict) -> dict | None:
    if c.get("rope_scaling"):
        return c["rope_scaling"]
    params = c.get("rope_parameters") or {}
    return params if params.get("rope_type", "default") != "default" else None


def parse_rope_scaling(rs: dict | None) -> dict | None:
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise PlanError(f"rope_scaling type '{kind}' is not supported (only default and llama3)")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if rs.get(key) is None:
            raise PlanError(f"llama3 rope_scaling needs '{key}'")
    return {
        "factor": float(rs["factor"]),
        "high_freq_factor": float(rs["high_freq_factor"]),
        "low_freq_factor": float(rs["low_freq_factor"]),
        "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
        "rope_type": "llama3",
    }
