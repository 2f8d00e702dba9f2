"""A Megatron-LM training run's saved args -> the config.json its model is planned from.

A heterogeneous run keeps the HF config it was given (`--heterogeneous-layers-config-path`) in
`heterogeneous_layers_config_encoded_json`. A homogeneous Llama run has only its standard args, from which a
LlamaForCausalLM config is rebuilt; what a Llama cannot hold (biases, MoE, QK norm, LayerNorm, partial or
interleaved RoPE, ...) is refused by name. Arg names are those Megatron-LM 0.16 .. 0.19 store: a
TransformerConfig field becomes the arg of the same name, so `--norm-epsilon` is stored as `layernorm_epsilon`
(runs of megatron-core 0.15 and earlier stored `norm_epsilon`, also read).

The args come from an untrusted file (read by io/safe_pickle's restricted unpickler): every value is checked
for its type here, and the rebuilt config goes through the same checks as any config.json.
"""

from __future__ import annotations

import numbers

from ..config_checks import parse_config_text
from ..errors import ConversionError, PlanError

# megatron's llama3 RoPE scaling fixes these (only the factor is an arg): layout.py checks a HF config against
# the same constants.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Settings a Llama does not have: refused when the run set them (absent means megatron's default, off).
NOT_LLAMA = (("add_bias_linear", "biases in the linear layers"), ("add_qkv_bias", "a QKV bias"),
             ("qk_layernorm", "QK layer norms"), ("multi_latent_attention", "multi-latent attention"),
             ("rotary_interleaved", "interleaved RoPE"), ("layernorm_zero_centered_gamma", "zero-centred norms"),
             ("apply_layernorm_1p", "zero-centred norms"), ("num_experts", "mixture-of-experts layers"))


class _Args:
    """Typed reads of the args namespace; every refusal names the arg and where the args came from."""

    def __init__(self, args, where: str):
        self.args, self.where = args, where

    def has(self, name: str) -> bool:
        return getattr(self.args, name, None) is not None

    def raw(self, *names: str, required: bool = True):
        for name in names:
            if self.has(name):
                return getattr(self.args, name)
        if required:
            alt = f" (or '{names[1]}')" if len(names) > 1 else ""
            raise ConversionError(f"{self.where}: the training args have no '{names[0]}'{alt}: cannot rebuild the "
                                  f"model's config without it")
        return None

    def integer(self, *names: str, required: bool = True) -> int | None:
        v = self.raw(*names, required=required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
            raise ConversionError(f"{self.where}: training arg '{self._name(names)}' is {_show(v)}, not a positive "
                                  f"integer")
        return int(v)

    def number(self, *names: str, required: bool = True) -> float | None:
        v = self.raw(*names, required=required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ConversionError(f"{self.where}: training arg '{self._name(names)}' is {_show(v)}, not a number")
        return float(v)

    def flag(self, name: str) -> bool:
        v = getattr(self.args, name, None)
        if v is None:
            return False
        if not isinstance(v, bool):
            raise ConversionError(f"{self.where}: training arg '{name}' is {_show(v)}, not true/false")
        return v

    def _name(self, names) -> str:
        return next((n for n in names if self.has(n)), names[0])


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def vocab_size(a: _Args) -> tuple[int, list[str]]:
    """The vocabulary: `vocab_size` when the run was given one (--vocab-size, e.g. with a NullTokenizer), else
    `padded_vocab_size` (all a run with a real tokenizer records: the tokenizer's size padded to a multiple of
    make_vocab_size_divisible_by x TP), with a note that the padding rows are exported as vocabulary rows."""
    exact = a.integer("vocab_size", required=False)
    if exact is not None:
        return exact, []
    padded = a.integer("padded_vocab_size", "vocab_size")
    return padded, [f"{a.where}: the training args record no vocab_size, only padded_vocab_size = {padded}: the "
                    f"exported embedding and output layer have {padded} rows, the tokenizer's vocabulary plus "
                    f"megatron's padding rows (whatever the run left in them)"]


def config_from_args(args, where: str) -> tuple[dict, list[str]]:
    """(the config.json of the run's model, notes for the conversion summary)."""
    if args is None or isinstance(args, (str, bytes, numbers.Number, list, tuple, dict)):
        raise ConversionError(f"{where}: 'args' is a {type(args).__name__}, not a training run's argument namespace")
    a = _Args(args, where)
    encoded = a.raw("heterogeneous_layers_config_encoded_json", required=False)
    if encoded:
        return _heterogeneous(a, encoded)
    return _llama(a)


def _heterogeneous(a: _Args, encoded) -> tuple[dict, list[str]]:
    name = "heterogeneous_layers_config_encoded_json"
    if not isinstance(encoded, (str, bytes)):
        raise ConversionError(f"{a.where}: training arg '{name}' is {_show(encoded)}, not JSON text")
    try:  # the config.json the run was given: the same checks as a config file's
        cfg = parse_config_text(encoded, f"training arg '{name}'")
    except PlanError as e:
        raise ConversionError(f"{a.where}: {e}") from None
    notes: list[str] = []
    if "vocab_size" not in cfg:
        cfg["vocab_size"], notes = vocab_size(a)
    # Megatron-LM persists the HF config.json the run was given; the model-level sizes are also args.
    for key, arg in (("hidden_size", "hidden_size"), ("num_attention_heads", "num_attention_heads"),
                     ("num_hidden_layers", "num_layers")):
        if key not in cfg:
            cfg[key] = a.integer(arg)
    if "tie_word_embeddings" not in cfg:
        cfg["tie_word_embeddings"] = not a.flag("untie_embeddings_and_output_weights") \
            if a.has("untie_embeddings_and_output_weights") else False
    return cfg, notes


def _llama(a: _Args) -> tuple[dict, list[str]]:
    """A LlamaForCausalLM config from a homogeneous run's standard args."""
    for name, want in (("normalization", "RMSNorm"), ("position_embedding_type", "rope")):
        got = a.raw(name)
        if got != want:
            raise ConversionError(f"{a.where}: training arg {name} = {_show(got)}: only Llama models ({name} = "
                                  f"{want!r}) can be exported from a run without a heterogeneous layers config")
    if a.raw("swiglu") is not True:
        raise ConversionError(f"{a.where}: training arg swiglu = {_show(a.raw('swiglu'))}: only Llama models "
                              f"(SwiGLU MLPs) can be exported from a run without a heterogeneous layers config")
    for name, what in NOT_LLAMA:
        v = getattr(a.args, name, None)
        if v not in (None, False, 0):
            raise ConversionError(f"{a.where}: training arg {name} = {_show(v)}: a Llama has no {what}, so this "
                                  f"run cannot be exported")
    percent = a.number("rotary_percent", required=False)
    if percent is not None and percent != 1.0:
        raise ConversionError(f"{a.where}: training arg rotary_percent = {percent}: a Llama rotates every channel "
                              f"(1.0)")
    heads, hidden = a.integer("num_attention_heads"), a.integer("hidden_size")
    kv = a.integer("num_query_groups") if a.flag("group_query_attention") else heads
    head_dim = a.integer("kv_channels", required=False)
    if head_dim is not None and head_dim * heads != hidden:
        raise ConversionError(f"{a.where}: training arg kv_channels = {head_dim}, but hidden_size / "
                              f"num_attention_heads = {hidden} / {heads}: a Llama's head size is their quotient")
    untie = a.raw("untie_embeddings_and_output_weights")
    if not isinstance(untie, bool):
        raise ConversionError(f"{a.where}: training arg 'untie_embeddings_and_output_weights' is {_show(untie)}, "
                              f"not true/false")
    vocab, notes = vocab_size(a)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "num_hidden_layers": a.integer("num_layers"), "hidden_size": hidden, "num_attention_heads": heads,
        "num_key_value_heads": kv, "intermediate_size": a.integer("ffn_hidden_size"),
        "rms_norm_eps": a.number("layernorm_epsilon", "norm_epsilon"),
        "rope_theta": a.number("rotary_base"),
        "max_position_embeddings": a.integer("max_position_embeddings", "seq_length"),
        "vocab_size": vocab, "tie_word_embeddings": not untie,
        "attention_bias": False, "mlp_bias": False,
    }
    if a.flag("bf16") or a.flag("fp16"):
        cfg["torch_dtype"] = "bfloat16" if a.flag("bf16") else "float16"
    if a.flag("use_rope_scaling"):
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": a.number("rope_scaling_factor"), **LLAMA3_FIXED}
    return cfg, notes
