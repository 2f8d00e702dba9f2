"""ModelOpt Puzzletron ("AnyModel") children: the parent's own architecture plus per-layer overrides, read into
the per-layer plan and written back in the schema they came in.

Two config forms (ModelOpt's `modelopt/torch/puzzletron`, docs/conversion.md cites the files):

  puzzletron  the parent's config.json unchanged (model_type "llama", LlamaForCausalLM, its own
              num_key_value_heads and intermediate_size, which no layer need use) plus `block_configs`, one
              entry per layer: {"attention": {"no_op", "replace_with_linear", "sparsify", "weights_precision",
              "num_key_value_heads", "llama4", "mamba"}, "ffn": {"no_op", "replace_with_linear", "sparsify",
              "weights_precision", "moe", "intermediate_size"}, "parallel_blocks": null}.
  anymodel    the same, rewritten for vLLM: "architectures": ["AnyModel"], "base_architecture", and a sparse
              `per_layer_config` {"<layer>": {"skip": ["attention", "mlp"], "num_key_value_heads",
              "intermediate_size"}} stating only what differs from the global values; no block_configs.

Tensor names are the parent's (model.layers.{i}.self_attn.q_proj.weight, ...); a removed sub-block has no
tensors (its norm is the identity and its output zero: the residual passes the input on, as DeciLM's no_op
and megatron-core's IdentityOp). Refused by name: linear replacements (Puzzletron's runtime implements only
no_op, and no tensor name for them is defined), MoE, Mamba and Llama-4 blocks, parallel blocks, the
experimental v2 schema (`subblock_configs`), and per-layer overrides megatron-core cannot express (heads,
head_dim, sliding windows, activations).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import PlanError
from .kinds import Attention, FFN

if TYPE_CHECKING:  # annotations only: plan.py calls the parsers, which return each layer's two halves
    from .plan import LayerPlan, ModelPlan

GQA, NONE, SWIGLU = "gqa", "none", "swiglu"  # the kinds' names (kinds/)
Layer = tuple[Attention, FFN]

# parent family -> (model_type, architecture, the attention kind of its layers)
PARENTS = {"llama": ("llama", "LlamaForCausalLM", GQA), "qwen3": ("qwen3", "Qwen3ForCausalLM", "gqa_qk_norm")}
PUZZLETRON, ANYMODEL = "puzzletron", "anymodel"
# source_format of a plan: the schema, prefixed by the family unless it is Llama; "qwen3" is a plain Qwen3 model
FORMATS = (PUZZLETRON, ANYMODEL, "qwen3-puzzletron", "qwen3-anymodel", "qwen3")
ATTENTION_KEYS = {"no_op", "replace_with_linear", "sparsify", "weights_precision", "num_key_value_heads", "llama4",
                  "mamba"}
FFN_KEYS = {"no_op", "replace_with_linear", "sparsify", "weights_precision", "moe", "intermediate_size",
            "hidden_act"}
PER_LAYER_KEYS = {"skip", "num_key_value_heads", "intermediate_size"}
SKIPS = {"attention": "attention", "mlp": "ffn"}
MAX_COUNT = 10**8


def family_of_format(source_format: str) -> str | None:
    """The native transformers family that runs a plan of this source format (None: our DeciLM classes)."""
    if source_format.startswith("qwen3"):
        return "qwen3"
    return "llama" if source_format in ("llama", PUZZLETRON, ANYMODEL) else None


def schema_of_format(source_format: str) -> str | None:
    """PUZZLETRON or ANYMODEL for a Puzzletron child's source format, else None."""
    return next((s for s in (PUZZLETRON, ANYMODEL) if source_format.endswith(s)), None)


def format_for(family: str, schema: str | None) -> str:
    if schema is None:
        return family
    return schema if family == "llama" else f"{family}-{schema}"


def check_family(cfg: dict, family: str) -> None:
    """What a native parent's config may say that megatron-core's heterogeneous layers cannot express."""
    if family == "qwen3":
        if cfg.get("use_sliding_window"):
            raise PlanError("use_sliding_window=true (Qwen3 sliding-window layers) is not supported")
        types = cfg.get("layer_types")
        if types is not None and (type(types) is not list or any(t != "full_attention" for t in types)):
            raise PlanError(f"layer_types {_show(types)}: only full attention is supported")


def _show(value: object) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def family_of(cfg: dict) -> str | None:
    """The parent family of a native (non-DeciLM) config, by model_type."""
    return next((f for f, (model_type, _, _) in PARENTS.items() if cfg.get("model_type") == model_type), None)


def schema_of(cfg: dict) -> str | None:
    """The source format of a native-family config: a Puzzletron child ("puzzletron", "anymodel",
    "qwen3-puzzletron", "qwen3-anymodel") or a plain Qwen3 ("qwen3"); None for anything else (DeciLM, plain
    Llama). A config in a Puzzletron form whose parent is not supported is refused here."""
    if cfg.get("architectures") == ["AnyModel"] or cfg.get("per_layer_config") is not None:
        schema = ANYMODEL
    elif cfg.get("block_configs") is not None and cfg.get("model_type") not in (None, "nemotron-nas", "deci") \
            and "DeciLMForCausalLM" not in (cfg.get("architectures") or []):
        schema = PUZZLETRON  # block_configs under a native parent's config
    elif family_of(cfg) == "qwen3" and cfg.get("block_configs") is None:
        check_family(cfg, "qwen3")
        return "qwen3"
    else:
        return None
    family = family_of(cfg)
    if family is None:
        raise PlanError(f"a Puzzletron child of a {_show(cfg.get('model_type'))} parent is not supported (parents "
                        f"read: {', '.join(PARENTS)})")
    if schema == ANYMODEL and cfg.get("base_architecture") != PARENTS[family][1]:
        raise PlanError(f"AnyModel base_architecture {_show(cfg.get('base_architecture'))} does not match model_type "
                        f"'{cfg.get('model_type')}' ({PARENTS[family][1]} expected)")
    check_family(cfg, family)
    return format_for(family, schema)


def _count(value: object, where: str) -> int:
    if type(value) is not int or not 0 < value <= MAX_COUNT:
        raise PlanError(f"{where} must be a positive integer, got {_show(value)}")
    return value


def _gqa(layer: int, kv: int, heads: int, family: str) -> Attention:
    if heads % kv:
        raise PlanError(f"layer {layer}: num_attention_heads {heads} is not divisible by {kv} KV heads")
    return Attention(PARENTS[family][2], kv)


# ---- parsing --------------------------------------------------------------------------------------------------


def parse_block(i: int, block: object, heads: int, family: str = "llama") -> Layer:
    """One Puzzletron `block_configs` entry."""
    if not isinstance(block, dict):
        raise PlanError(f"layer {i}: block config is not an object: {_show(block)}")
    if "subblock_configs" in block:
        raise PlanError(f"layer {i}: Puzzletron v2 'subblock_configs' blocks (feature/puzzletron_v2, experimental) "
                        f"are not supported")
    extra = set(block) - {"attention", "ffn", "parallel_blocks"}
    if extra:
        raise PlanError(f"layer {i}: unknown Puzzletron block keys {sorted(extra)}; refusing to guess their meaning")
    if block.get("parallel_blocks") is not None:
        raise PlanError(f"layer {i}: parallel_blocks are not supported")
    parts = []
    for part, keys, unsupported in (("attention", ATTENTION_KEYS, ("llama4", "mamba")), ("ffn", FFN_KEYS, ("moe",))):
        d = block.get(part) or {}
        if not isinstance(d, dict):
            raise PlanError(f"layer {i}: {part} is not an object: {_show(d)}")
        unknown = set(d) - keys
        if unknown:
            raise PlanError(f"layer {i}: unknown Puzzletron {part} keys {sorted(unknown)}; refusing to guess their "
                            f"meaning")
        for key in unsupported:
            if d.get(key) is not None:
                raise PlanError(f"layer {i}: {part}.{key} blocks are not supported (megatron-core's heterogeneous "
                                f"layers are attention and MLP only)")
        if d.get("replace_with_linear"):
            raise PlanError(f"layer {i}: {part}.replace_with_linear is not supported for Puzzletron children (its "
                            f"AnyModel runtime implements only no_op, and names no tensor for a linear replacement)")
        if d.get("hidden_act") not in (None, "silu"):
            raise PlanError(f"layer {i}: ffn.hidden_act {_show(d['hidden_act'])} is not supported (SwiGLU only)")
        if d.get("no_op"):
            parts.append(Attention(NONE) if part == "attention" else FFN(NONE))
        elif part == "attention":
            parts.append(_gqa(i, _count(d.get("num_key_value_heads"), f"layer {i}: attention.num_key_value_heads"),
                              heads, family))
        else:
            parts.append(FFN(SWIGLU, _count(d.get("intermediate_size"), f"layer {i}: ffn.intermediate_size")))
    return parts[0], parts[1]


def parse_per_layer(cfg: dict, num_layers: int, heads: int, family: str = "llama") -> list[Layer]:
    """The vLLM AnyModel form (and a plain model: no overrides): the global values, overridden per layer."""
    kv = _count(cfg.get("num_key_value_heads") or heads, "num_key_value_heads")
    width = _count(cfg.get("intermediate_size"), "intermediate_size")
    per_layer = cfg.get("per_layer_config") or {}
    if not isinstance(per_layer, dict):
        raise PlanError(f"per_layer_config must be an object, got {_show(per_layer)}")
    for key in per_layer:
        if not (key.isdigit() and str(int(key)) == key and int(key) < num_layers):
            raise PlanError(f"per_layer_config key {_show(key)} is not a layer index below {num_layers}")
    layers = []
    for i in range(num_layers):
        entry = per_layer.get(str(i), {})
        if not isinstance(entry, dict):
            raise PlanError(f"layer {i}: per_layer_config entry is not an object: {_show(entry)}")
        unknown = set(entry) - PER_LAYER_KEYS
        if unknown:
            raise PlanError(f"layer {i}: per_layer_config overrides {sorted(unknown)}, which megatron-core's "
                            f"heterogeneous layers cannot express (per layer: skip, num_key_value_heads, "
                            f"intermediate_size)")
        skip = entry.get("skip", [])
        if type(skip) is not list or not set(skip) <= set(SKIPS) or len(set(skip)) != len(skip):
            raise PlanError(f"layer {i}: per_layer_config skip {_show(skip)} is not a list of 'attention'/'mlp'")
        attention = Attention(NONE) if "attention" in skip else _gqa(
            i, _count(entry.get("num_key_value_heads", kv), f"layer {i}: num_key_value_heads"), heads, family)
        ffn = FFN(NONE) if "mlp" in skip else FFN(
            SWIGLU, _count(entry.get("intermediate_size", width), f"layer {i}: intermediate_size"))
        layers.append((attention, ffn))
    return layers


def parse_layers(cfg: dict, source_format: str, num_layers: int, heads: int) -> list[Layer]:
    """(attention, FFN) of every layer of a config in `source_format` (see `schema_of`)."""
    family, schema = family_of_format(source_format), schema_of_format(source_format)
    if schema == PUZZLETRON:
        blocks = cfg["block_configs"]
        if len(blocks) != num_layers:
            raise PlanError(f"block_configs has {len(blocks)} blocks but num_hidden_layers is {num_layers}")
        return [parse_block(i, b, heads, family) for i, b in enumerate(blocks)]
    layers = parse_per_layer(cfg, num_layers, heads, family)
    if cfg.get("block_configs") is not None:  # both forms: they must say the same
        blocks = parse_layers(cfg, format_for(family, PUZZLETRON), num_layers, heads)
        differ = [i for i, (a, b) in enumerate(zip(layers, blocks)) if a != b]
        if differ:
            raise PlanError(f"per_layer_config and block_configs disagree at layer(s) {differ[:8]}")
    return layers


# ---- writing back ---------------------------------------------------------------------------------------------


def _globals(plan: "ModelPlan", source: dict | None) -> tuple[int, int]:
    """The top-level num_key_value_heads and intermediate_size: the source's (a child keeps its parent's),
    else the largest of the layers'."""
    kvs = [l.attention.num_kv_heads for l in plan.layers if l.attention.num_kv_heads]
    widths = [l.ffn.width for l in plan.layers if l.ffn.kind == SWIGLU]
    kv = (source or {}).get("num_key_value_heads") or max(kvs, default=plan.num_attention_heads)
    width = (source or {}).get("intermediate_size") or max(widths, default=4 * plan.hidden_size)
    return int(kv), int(width)


def plan_family(plan: "ModelPlan") -> str:
    """The native family a plan's layers belong to (a DeciLM plan without linear layers is a Llama child)."""
    family = family_of_format(plan.source_format)
    if family is None and any(l.attention.kind == PARENTS["qwen3"][2] for l in plan.layers):
        return "qwen3"
    return family or "llama"


def expressible(plan: "ModelPlan", family: str | None = None) -> list[str]:
    """Why the plan cannot be written as a Puzzletron child of `family` (empty when it can)."""
    attention = PARENTS[family or plan_family(plan)][2]
    return [f"layer {l.index}: {part} is {sub.kind}" for l in plan.layers
            for part, sub, ok in (("attention", l.attention, attention), ("ffn", l.ffn, SWIGLU))
            if sub.kind not in (ok, NONE)]


def block_config(layer: "LayerPlan") -> dict[str, Any]:
    """One entry as Puzzletron serialises it (every field, keys sorted as transformers writes them)."""
    a, f = layer.attention, layer.ffn
    attention = {"llama4": None, "mamba": None, "no_op": a.kind == NONE, "num_key_value_heads": a.num_kv_heads,
                 "replace_with_linear": False, "sparsify": None, "weights_precision": "bf16"}
    ffn = {"intermediate_size": f.width, "moe": None, "no_op": f.kind == NONE, "replace_with_linear": False,
           "sparsify": None, "weights_precision": "bf16"}
    return {"attention": attention, "ffn": ffn, "parallel_blocks": None}


def per_layer_config(plan: "ModelPlan", kv: int, width: int) -> dict[str, dict]:
    """The sparse vLLM form: only what differs from the global values, skip lists first."""
    out = {}
    for layer in plan.layers:
        entry: dict[str, Any] = {}
        skip = [name for name, part in SKIPS.items() if getattr(layer, part).kind == NONE]
        if skip:
            entry["skip"] = skip
        if layer.attention.kind != NONE and layer.attention.num_kv_heads != kv:
            entry["num_key_value_heads"] = layer.attention.num_kv_heads
        if layer.ffn.kind != NONE and layer.ffn.width != width:
            entry["intermediate_size"] = layer.ffn.width
        if entry:
            out[str(layer.index)] = entry
    return out


# Keys of a source config that are not carried into an exported one: what the export restates, and what would
# describe other weights (a dequantized export is no longer quantized).
NOT_CARRIED = {"block_configs", "per_layer_config", "quantization_config", "auto_map", "torch_dtype", "dtype",
               "architectures", "base_architecture"}


OMITTED_DEFAULTS = {"mlp_bias", "pretraining_tp", "attention_bias", "attention_dropout", "use_cache"}


def export_config(plan: "ModelPlan", source_format: str, source: dict | None = None) -> dict:
    """config.json in `source_format` (a Puzzletron child of its family, or a plain Qwen3): everything the plan
    determines, from the plan; the parent's global KV heads and width and the keys the plan does not know
    (initializer_range, anymodel_arch_info, ...) from the source config when it is one of the same family."""
    family, schema = family_of_format(source_format), schema_of_format(source_format)
    problems = expressible(plan, family)
    if problems:
        raise PlanError(f"the model cannot be written as a {family} Puzzletron child ({'; '.join(problems[:5])})")
    model_type, arch, _ = PARENTS[family]
    same = source if source and family_of(source) == family else {}
    kv, width = _globals(plan, same)
    cfg = {k: v for k, v in same.items() if k not in NOT_CARRIED}
    # keys at their default that a family's configs leave out (Qwen3 has no mlp_bias) stay out when they were
    cfg.update({k: v for k, v in plan.hf_config(block_configs=False).items()
                if not (same and k in OMITTED_DEFAULTS and k not in same)})
    cfg.update(architectures=[arch], model_type=model_type, num_key_value_heads=kv, intermediate_size=width,
               head_dim=plan.head_dim)
    if schema is None:  # a plain model: its layers must all be alike
        if per_layer_config(plan, kv, width):
            schema = PUZZLETRON
        else:
            return cfg
    if schema == PUZZLETRON:
        cfg["block_configs"] = [block_config(layer) for layer in plan.layers]
        return cfg
    cfg.update(architectures=["AnyModel"], base_architecture=arch, per_layer_config=per_layer_config(plan, kv, width))
    return cfg
