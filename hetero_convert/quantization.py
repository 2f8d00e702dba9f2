"""Which quantization a HF checkpoint declares, from its config files alone (no torch: `inspect` uses it).

TensorRT Model Optimizer (ModelOpt) exports quantized checkpoints (the FP8 and NVFP4 Nemotron releases) with
the model's own config.json plus a description of the quantization, in one of three forms by ModelOpt version:

  hf_quant_config.json   every version: {"producer": {"name": "modelopt", "version"}, "quantization":
                         {"quant_algo", "kv_cache_quant_algo", "exclude_modules", ["group_size"]}}
  config.json            0.31-0.33: `quantization_config` with "quant_library": "modelopt"
                         >= 0.35:   `quantization_config` with "quant_method": "modelopt"
                         both: {"quant_algo", "ignore" (= exclude_modules), "kv_cache_scheme", "config_groups",
                         "producer"}; 0.29 and earlier write no quantization_config at all.

When both are present they must agree (algorithm, KV-cache algorithm, exclusions, group size), or the
checkpoint is refused naming both files. `exclude_modules` are module names or fnmatch patterns ("lm_head",
"model.layers.0.self_attn*"); they list the quantizable modules that were left unquantized. Which weight
formats we dequantize and how is `io/quantized.py`; this module only decides whether a checkpoint is one we
read, refusing everything else by name.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .errors import CheckpointError

HF_QUANT_CONFIG = "hf_quant_config.json"
MODELOPT = "modelopt"

# quant_algo -> (weight format, whether each quantized Linear carries an input_scale)
SUPPORTED = {
    "FP8": ("fp8", True),  # F8_E4M3 weight, one F32 scale per tensor
    "FP8_PER_CHANNEL_PER_TOKEN": ("fp8_per_channel", False),  # one F32 scale per output row; dynamic activations
    "NVFP4": ("nvfp4", True),  # packed E2M1, an F8_E4M3 scale per 16 inputs, an F32 global scale
    "W4A16_NVFP4": ("nvfp4", False),  # the same weights, activations unquantized
}
NVFP4_GROUP = 16
# ModelOpt's other export algorithms, and why their weights cannot be restored by a per-weight dequantization
# (or are not implemented here). Anything not listed is refused as unknown.
REFUSED = {
    "W4A16_AWQ": "AWQ int4 weights carry a pre_quant_scale that belongs to the previous layer's output",
    "W4A8_AWQ": "AWQ int4 weights carry a pre_quant_scale that belongs to the previous layer's output",
    "NVFP4_AWQ": "AWQ weights carry a pre_quant_scale that belongs to the previous layer's output",
    "NVFP4_SVD": "SVDQuant adds a pre_quant_scale and a low-rank residual (svdquant_lora_a/b) to each weight",
    "W8A8_SQ_PER_CHANNEL": "SmoothQuant weights carry per-channel smoothing factors (pre_quant_scale)",
    "W8A16": "int8 weight-only checkpoints are not implemented",
    "W4A8_NVFP4_FP8": "its mixed FP4-weight / FP8-activation scales are not implemented",
    "W4A8_MXFP4_FP8": "MXFP4 weights (E8M0 scales per 32) are not implemented",
    "MXFP4": "MXFP4 weights (E8M0 scales per 32) are not implemented",
    "MXFP8": "MXFP8 weights (E8M0 scales per 32) are not implemented",
    "FP8_PB_WO": "128x128 block-scaled FP8 is not implemented",
    "FP8_PB_REAL": "128x128 block-scaled FP8 is not implemented",
    "MIXED_PRECISION": "per-layer algorithms (quantized_layers) are not implemented",
}
# KV-cache quantization leaves k_scale / v_scale on k_proj / v_proj: consumed and dropped for bf16 weights.
KV_CACHE_SUPPORTED = ("FP8", "NVFP4")
MAX_EXCLUDES = 1_000_000
CONFIG_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}  # config.json's torch_dtype (no torch here)


@dataclass(frozen=True)
class QuantScheme:
    """A ModelOpt quantization, as declared by the checkpoint."""

    quant_algo: str  # upper-case, one of SUPPORTED
    kv_cache_quant_algo: str | None
    exclude_modules: tuple[str, ...]
    group_size: int | None
    producer: str  # "modelopt 0.35.0", or "modelopt" when no version is stated
    declared_in: tuple[str, ...]  # the files (and forms) that declare it

    @property
    def weight_format(self) -> str:
        return SUPPORTED[self.quant_algo][0]

    @property
    def input_scales(self) -> bool:
        return SUPPORTED[self.quant_algo][1]

    @cached_property
    def _matchers(self) -> tuple[frozenset, tuple[str, ...]]:
        """Plain names in a set, wildcard patterns apart: an unsummarised list of thousands stays cheap."""
        wild = tuple(p for p in self.exclude_modules if any(c in p for c in "*?["))
        return frozenset(self.exclude_modules) - set(wild), wild

    def excluded(self, module: str) -> bool:
        """Whether the module (a name without ".weight") was left unquantized."""
        names, patterns = self._matchers
        return module in names or any(module == p or fnmatch.fnmatchcase(module, p) for p in patterns)

    def as_dict(self) -> dict:
        return {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo,
                "exclude_modules": list(self.exclude_modules), "group_size": self.group_size,
                "producer": self.producer, "declared_in": list(self.declared_in)}


def _show(value: object) -> str:
    s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


def _algo(value: object, where: str, field: str, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if type(value) is not str or not value or len(value) > 64 or not value.isprintable():
        raise CheckpointError(f"{where}: {field} must be an algorithm name, got {_show(value)}")
    return value.upper()


def _excludes(value: object, where: str, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if type(value) is not list or len(value) > MAX_EXCLUDES or not all(
            type(v) is str and 0 < len(v) <= 1024 and v.isprintable() for v in value):
        raise CheckpointError(f"{where}: {field} must be a list of module names or patterns, got {_show(value)}")
    return tuple(dict.fromkeys(value))  # ModelOpt may list lm_head twice


def _group_size(value: object, where: str, field: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value <= 0:
        raise CheckpointError(f"{where}: {field} must be a positive integer, got {_show(value)}")
    return value


def _from_hf_quant_config(path: Path) -> dict:
    from .config_checks import read_config_file

    try:
        raw = read_config_file(path)
    except Exception as e:  # noqa: BLE001 - a PlanError from the shared reader: same message, checkpoint error
        raise CheckpointError(str(e)) from None
    where = path.name
    producer = raw.get("producer")
    if not isinstance(producer, dict) or producer.get("name") != MODELOPT:
        raise CheckpointError(f"{where}: producer is {_show(producer)}, not ModelOpt ({{'name': 'modelopt'}}); "
                              f"only ModelOpt exports are read")
    q = raw.get("quantization")
    if not isinstance(q, dict):
        raise CheckpointError(f"{where}: no 'quantization' object")
    version = producer.get("version")
    return {"quant_algo": _algo(q.get("quant_algo"), where, "quantization.quant_algo"),
            "kv_cache_quant_algo": _algo(q.get("kv_cache_quant_algo"), where, "quantization.kv_cache_quant_algo",
                                         allow_none=True),
            "exclude_modules": _excludes(q.get("exclude_modules"), where, "quantization.exclude_modules"),
            "group_size": _group_size(q.get("group_size"), where, "quantization.group_size"),
            "producer": f"{MODELOPT} {version}" if type(version) is str and version.isprintable() else MODELOPT,
            "declared_in": where}


def _kv_scheme(value: object, where: str) -> str | None:
    """0.35+ writes {"dynamic": false, "num_bits": 8, "type": "float"} for FP8; 0.31-0.33 the name itself."""
    if value is None or isinstance(value, str):
        return _algo(value, where, "quantization_config.kv_cache_scheme", allow_none=True)
    if isinstance(value, dict) and value.get("num_bits") == 8 and value.get("type") == "float":
        return "FP8"
    raise CheckpointError(f"{where}: quantization_config.kv_cache_scheme {_show(value)} is not a KV-cache "
                          f"quantization this tool knows (FP8 is {{'num_bits': 8, 'type': 'float'}})")


def _from_config(qc: object, where: str) -> dict:
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be an object, got {_show(qc)}")
    method, library = qc.get("quant_method"), qc.get("quant_library")
    if method is not None:
        if type(method) is not str or not method.lower().startswith(MODELOPT):
            raise CheckpointError(f"{where}: quantization_config.quant_method {_show(method)} is not supported: only "
                                  f"ModelOpt exports (quant_method 'modelopt') of FP8 and NVFP4 are read")
        form = "quant_method"
    elif library == MODELOPT:
        form = "quant_library"
    else:
        raise CheckpointError(f"{where}: quantization_config names neither quant_method nor quant_library "
                              f"'modelopt': not a ModelOpt export, refusing to guess how its weights are stored")
    group = None
    groups = qc.get("config_groups")
    if isinstance(groups, dict) and isinstance(groups.get("group_0"), dict):
        weights = groups["group_0"].get("weights")
        if isinstance(weights, dict):
            group = _group_size(weights.get("group_size"), where, "config_groups.group_0.weights.group_size")
    producer = qc.get("producer")
    version = producer.get("version") if isinstance(producer, dict) else None
    return {"quant_algo": _algo(qc.get("quant_algo"), where, "quantization_config.quant_algo"),
            "kv_cache_quant_algo": _kv_scheme(qc.get("kv_cache_scheme"), where),
            "exclude_modules": _excludes(qc.get("ignore"), where, "quantization_config.ignore"),
            "group_size": group,
            "producer": f"{MODELOPT} {version}" if type(version) is str and version.isprintable() else MODELOPT,
            "declared_in": f"{where} quantization_config ({form})"}


def read_quantization(config: dict, directory: str | Path | None = None) -> QuantScheme | None:
    """The ModelOpt quantization `config` (and `directory`'s hf_quant_config.json) declare, None for an
    unquantized checkpoint; CheckpointError, naming the file and field, for anything not read here."""
    found = []
    hfq = Path(directory) / HF_QUANT_CONFIG if directory is not None else None
    if hfq is not None and hfq.is_file():
        found.append(_from_hf_quant_config(hfq))
    if config.get("quantization_config") is not None:
        found.append(_from_config(config["quantization_config"], "config.json"))
    if not found:
        return None
    first = found[0]
    for other in found[1:]:
        for key in ("quant_algo", "kv_cache_quant_algo", "group_size"):
            a, b = first[key], other[key]
            if a != b and not (key == "group_size" and None in (a, b)):
                raise CheckpointError(f"{first['declared_in']} and {other['declared_in']} disagree on {key}: "
                                      f"{_show(a)} vs {_show(b)}")
        if set(first["exclude_modules"]) != set(other["exclude_modules"]):
            only = sorted(set(first["exclude_modules"]) ^ set(other["exclude_modules"]))
            raise CheckpointError(f"{first['declared_in']} and {other['declared_in']} disagree on the excluded "
                                  f"modules ({_show(only)} in one only)")
    where = " and ".join(f["declared_in"] for f in found)
    algo = first["quant_algo"]
    if algo not in SUPPORTED:
        why = REFUSED.get(algo, "not an algorithm ModelOpt's HF export is known to write")
        raise CheckpointError(f"{where}: quant_algo '{algo}' is not supported ({why}); supported: "
                              f"{', '.join(SUPPORTED)}")
    kv = first["kv_cache_quant_algo"]
    if kv is not None and kv not in KV_CACHE_SUPPORTED:
        raise CheckpointError(f"{where}: kv_cache_quant_algo '{kv}' is not supported (read: "
                              f"{', '.join(KV_CACHE_SUPPORTED)} or none)")
    group = next((f["group_size"] for f in found if f["group_size"] is not None), None)
    if SUPPORTED[algo][0] == "nvfp4":
        if group not in (None, NVFP4_GROUP):
            raise CheckpointError(f"{where}: NVFP4 group_size {group} is not supported (ModelOpt's NVFP4 scales "
                                  f"blocks of {NVFP4_GROUP})")
        group = NVFP4_GROUP
    return QuantScheme(algo, kv, first["exclude_modules"], group, next(
        (f["producer"] for f in found if f["producer"] != MODELOPT), MODELOPT), tuple(f["declared_in"] for f in found))


# ---- sizes, for `inspect` ------------------------------------------------------------------------------------


def is_linear(key: str, shape: tuple[int, ...]) -> bool:
    """A weight ModelOpt's default configuration quantizes unless excluded: every 2-D weight but the
    embedding (norms and embeddings are never quantizer-wrapped)."""
    return len(shape) == 2 and key.endswith(".weight") and key != "model.embed_tokens.weight"


def stored_bytes(scheme: QuantScheme, key: str, shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes one HF tensor takes in the quantized checkpoint (with its scales), `itemsize` that of the
    unquantized tensors."""
    n = math.prod(shape)
    if not is_linear(key, shape) or scheme.excluded(key[: -len(".weight")]):
        return n * itemsize
    fmt, inputs = SUPPORTED[scheme.quant_algo]
    extra = 4 if inputs else 0
    if fmt == "fp8":
        size = n + 4 + extra
    elif fmt == "fp8_per_channel":
        size = n + 4 * shape[0] + extra
    else:
        size = n // 2 + n // NVFP4_GROUP + 4 + extra
    if scheme.kv_cache_quant_algo and key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
        size += 4
    return size


def describe_quantization(plan, scheme: QuantScheme) -> dict:
    """What `inspect` shows: the scheme, each layer's weight format, and the stored and dequantized sizes."""
    itemsize = CONFIG_ITEMSIZE.get(plan.torch_dtype, 2)
    fmt = scheme.weight_format
    layers, stored, dequantized = [], 0, 0
    for key, shape in plan.global_hf_tensors().items():
        stored += stored_bytes(scheme, key, shape, itemsize)
        dequantized += math.prod(shape) * itemsize
    for layer in plan.layers:
        tensors = plan.layer_hf_tensors(layer)
        linears = [k for k, s in tensors.items() if is_linear(k, s)]
        quantized = [k for k in linears if not scheme.excluded(k[: -len(".weight")])]
        s = sum(stored_bytes(scheme, k, shape, itemsize) for k, shape in tensors.items())
        d = sum(math.prod(shape) for shape in tensors.values()) * itemsize
        stored, dequantized = stored + s, dequantized + d
        kind = "-" if not linears else fmt if len(quantized) == len(linears) else \
            plan.torch_dtype if not quantized else "mixed"
        layers.append({"layer": layer.index, "weights": kind, "stored_bytes": s, "dequantized_bytes": d})
    return {**scheme.as_dict(), "weight_format": fmt, "dequantized_dtype": plan.torch_dtype,
            "stored_bytes": stored, "dequantized_bytes": dequantized, "layers": layers}
