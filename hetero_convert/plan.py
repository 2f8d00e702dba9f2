"""config.json -> per-layer plan.

A `ModelPlan` is the one description of a model that every other module works from: the converter maps
tensors per layer kind, the spec builder feeds megatron-core, the HF exporter regenerates `block_configs`,
and `inspect` counts parameters, all from the same plan. It is built from any config form found in the wild
(see `load_plan`), and building it is where bad configs are rejected, with the layer named.

Layer kinds (each one a module of kinds/, which knows everything about it):
  attention: "gqa" (softmax attention with this layer's own KV-head count), "linear" (one H x H matrix
             after the input norm, with a residual add), "none" (no norm, no attention, no residual).
  ffn:       "swiglu" (gate/up/down with this layer's own width), "linear", "none".
A layer with both parts "none" is a dummy layer (Ultra-253B has 81 of them): identity, no parameters.
This module holds the config schemas (released, newer, DeciLM-7B, Llama) and the model-level fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_checks import check_config, read_config_file
from .errors import PlanError
from .kinds import ATTENTION, FFN_PART, Attention, FFN, kinds
from .kinds.swiglu import ffn_mult_to_width, width_to_ffn_mult

# The kind names as plans, descriptions and the mapping tables store them (kinds/ holds what each means).
GQA, LINEAR, NONE, SWIGLU = "gqa", "linear", "none", "swiglu"

# The block_configs schema of the released checkpoints: every subblock field is listed (the remote code
# serialises dataclasses with asdict), in this key order, and we regenerate exactly this form on export. Each
# kind sets its own fields on top of these defaults (`SubBlockKind.released_fields`).
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
# megatron-core's native block-config keys (so its parser never has to guess or pop), before each kind's own.
MEGATRON_DEFAULTS = {ATTENTION: {"no_op": False, "replace_with_linear": False, "num_query_groups": None},
                     FFN_PART: {"no_op": False, "replace_with_linear": False, "ffn_hidden_size": None}}
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
RELEASED_DEFAULTS = {ATTENTION: RELEASED_ATTENTION_DEFAULTS, FFN_PART: RELEASED_FFN_DEFAULTS}
UNSUPPORTED = {ATTENTION: UNSUPPORTED_ATTENTION, FFN_PART: UNSUPPORTED_FFN}


@dataclass(frozen=True)
class LayerPlan:
    index: int
    attention: Attention
    ffn: FFN

    @property
    def is_dummy(self) -> bool:
        return self.attention.kind == NONE and self.ffn.kind == NONE

    @property
    def parts(self) -> tuple[Attention, FFN]:
        return (self.attention, self.ffn)

    def describe(self) -> str:
        return "dummy" if self.is_dummy else f"{self.attention.spec.describe(self.attention)} | " \
                                              f"{self.ffn.spec.describe(self.ffn)}"


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
    # Where the plan came from: "decilm", "decilm-newer", "decilm-7b", "llama", and the Puzzletron forms
    # "puzzletron" (block_configs in a Llama config) and "anymodel" (vLLM's per_layer_config).
    source_format: str = "decilm"
    # Every *_token_id of the source config (bos, eos, pad, unk, ...), carried to exported configs untouched.
    special_tokens: dict = field(default_factory=dict)
    # A head size other than hidden / heads (Qwen3 states one; megatron-core takes it as kv_channels).
    attention_head_dim: int | None = None

    # ---- dimensions --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_factor(self) -> float | None:
        return None if self.rope_scaling is None else float(self.rope_scaling["factor"])

    def qkv_rows(self, layer: LayerPlan) -> int:
        return (self.num_attention_heads + 2 * layer.attention.num_kv_heads) * self.head_dim

    # ---- tensors -------------------------------------------------------------------------------------
    def global_hf_tensors(self) -> dict[str, tuple[int, ...]]:
        """The tensors outside the layers: embedding, final norm, and the output layer unless tied."""
        out = {"model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
               "model.norm.weight": (self.hidden_size,)}
        if not self.tie_word_embeddings:
            out["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return out

    def layer_hf_tensors(self, layer: LayerPlan) -> dict[str, tuple[int, ...]]:
        """{HF key: shape} of one layer (the union of its two sub-blocks' tensors)."""
        return {t.format(i=layer.index): s for sub in layer.parts for t, s in sub.spec.hf_tensors(self, sub).items()}

    # ---- counting ------------------------------------------------------------------------------------
    def layer_parameters(self, layer: LayerPlan) -> dict[str, int]:
        attn = layer.attention.spec.parameters(self, layer.attention)
        ffn = layer.ffn.spec.parameters(self, layer.ffn)
        return {"attention": attn, "ffn": ffn, "total": attn + ffn}

    def embedding_parameters(self) -> int:
        per = self.vocab_size * self.hidden_size
        return per if self.tie_word_embeddings else 2 * per

    def num_parameters(self, include_embeddings: bool = True) -> int:
        body = sum(self.layer_parameters(layer)["total"] for layer in self.layers) + self.hidden_size
        return body + (self.embedding_parameters() if include_embeddings else 0)

    def layer_kv_cache_values(self, layer: LayerPlan) -> int:
        """KV-cache values this layer stores per token."""
        return sum(sub.spec.kv_cache_values_per_token(self, sub) for sub in layer.parts)

    def layer_flops(self, layer: LayerPlan, context: int = 4096) -> int:
        """Forward FLOPs per token of one layer, `context` the sequence length assumed for attention."""
        return sum(sub.spec.flops_per_token(self, sub, context) for sub in layer.parts)

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return sum(self.layer_kv_cache_values(layer) for layer in self.layers) * bytes_per_value

    def kind_counts(self) -> dict[str, int]:
        """Layers per kind, e.g. {"attention gqa": 49, "attention none": 31, ..., "dummy": 0}."""
        out: dict[str, int] = {}
        for part in (ATTENTION, FFN_PART):
            for k in kinds(part):
                out[f"{part} {k.name}"] = sum(getattr(l, part).kind == k.name for l in self.layers)
        out["dummy"] = sum(l.is_dummy for l in self.layers)
        return out

    # ---- regenerating configs ------------------------------------------------------------------------
    def hf_block_configs(self) -> list[dict]:
        """block_configs in the released form: every subblock key, ffn_mult for widths."""
        out = []
        for layer in self.layers:
            attn = dict(RELEASED_ATTENTION_DEFAULTS) | layer.attention.spec.released_fields(layer.attention, self)
            ffn = dict(RELEASED_FFN_DEFAULTS) | layer.ffn.spec.released_fields(layer.ffn, self)
            out.append({"attention": attn, "ffn": ffn})
        return out

    def megatron_block_configs(self) -> list[dict]:
        """block_configs in megatron-core's native keys, so its parser never has to guess or pop."""
        return [{"attention": MEGATRON_DEFAULTS[ATTENTION] | l.attention.spec.megatron_fields(l.attention),
                 "mlp": MEGATRON_DEFAULTS[FFN_PART] | l.ffn.spec.megatron_fields(l.ffn)} for l in self.layers]

    def hf_config(self, block_configs: bool = True) -> dict:
        """A complete DeciLM config.json (without auto_map, which the exporter adds with the code files);
        `block_configs=False`: only the model-level keys, which the other schemas share."""
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
        }
        if block_configs:
            if self.attention_head_dim is not None:
                raise PlanError(f"head_dim {self.head_dim} (not hidden_size / num_attention_heads) cannot be written "
                                f"in a DeciLM config")
            alien = next((l for l in self.layers if not all(sub.spec.in_decilm for sub in l.parts)), None)
            if alien is not None:
                raise PlanError(f"layer {alien.index} ({alien.describe()}) cannot be written in a DeciLM config; "
                                f"export the model in its own schema")
            cfg["block_configs"] = self.hf_block_configs()
        cfg.update(self.special_tokens)
        return cfg

    def config_form(self, source: dict | None = None) -> dict:
        """config.json in the plan's own source format: a Llama as a Llama, a Puzzletron child or Qwen3 in its
        schema (keys the plan does not know taken from `source`), everything else as DeciLM (no auto_map)."""
        from .puzzletron import FORMATS, export_config

        if self.source_format in FORMATS:
            return export_config(self, self.source_format, source)
        return (self.llama_config() if self.source_format == "llama" else None) or self.hf_config()

    def llama_config(self) -> dict | None:
        """A LlamaForCausalLM config.json when every layer is the same GQA + SwiGLU layer, else None."""
        kinds = {(l.attention.kind, l.attention.num_kv_heads, l.ffn.kind, l.ffn.width) for l in self.layers}
        if len(kinds) != 1:
            return None
        attn, kv, ffn, width = kinds.pop()
        if attn != GQA or ffn != SWIGLU or self.attention_head_dim is not None:
            return None
        cfg = self.hf_config(block_configs=False)
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
      - ModelOpt Puzzletron children of Llama: `block_configs` in the parent's config, or vLLM AnyModel's
        `per_layer_config` (puzzletron.py);
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
        from .puzzletron import family_of, parse_layers, schema_of

        head_dim = None
        if c.get("head_dim") is not None and int(c["head_dim"]) != hidden // heads:
            if family_of(c) != "qwen3":  # megatron takes any kv_channels; our DeciLM model only hidden/heads
                raise PlanError(
                    f"head_dim {c['head_dim']} is inconsistent with hidden_size/num_attention_heads = "
                    f"{hidden}/{heads} = {hidden // heads}; such models are not supported (except Qwen3)"
                )
            head_dim = int(c["head_dim"])
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise PlanError(f"hidden_act '{act}' is not supported: DeciLM and Llama MLPs use SiLU (SwiGLU)")
        for bias in ("attention_bias", "mlp_bias", "o_proj_bias"):
            if c.get(bias):
                raise PlanError(f"{bias}=true is not supported: DeciLM/Llama layers are bias-free")

        schema = schema_of(c)  # a Puzzletron child (its parent's config with per-layer overrides), a Qwen3
        if schema is not None:
            layers = [LayerPlan(i, a, f) for i, (a, f) in enumerate(parse_layers(c, schema, num_layers, heads))]
            fmt = schema
        elif "block_configs" in c and c["block_configs"] is not None:
            layers, fmt = self.parse_blocks(c["block_configs"], num_layers, hidden, heads)
        elif c.get("num_key_value_heads_per_layer") is not None:
            layers, fmt = self.parse_decilm_7b(num_layers, heads), "decilm-7b"
        else:
            layers, fmt = self.parse_llama(num_layers, heads), "llama"

        special = {k: v for k, v in c.items() if k.endswith("_token_id")}
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
            attention_head_dim=head_dim,
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
            attention, n1 = self.parse_part(i, ATTENTION, attn_d, hidden, heads)
            ffn, n2 = self.parse_part(i, FFN_PART, ffn_d, hidden, heads)
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

    def parse_part(self, i: int, part: str, d: dict, hidden: int, heads: int):
        """The first registered kind of `part` that claims the sub-block dict parses it."""
        known = set(RELEASED_DEFAULTS[part]).union(*(k.block_keys for k in kinds(part)))
        self.check_keys(i, part, d, known, UNSUPPORTED[part])
        for k in kinds(part):
            if k.claims(d):
                return k.parse(i, d, hidden, heads)
        raise PlanError(f"layer {i}: no {part} kind matches {d!r}")


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


__all__ = ["Attention", "FFN", "GQA", "LINEAR", "NONE", "SWIGLU", "LayerPlan", "ModelPlan", "PlanError",
           "ffn_mult_to_width", "width_to_ffn_mult", "load_config", "load_plan"]
