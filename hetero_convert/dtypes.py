"""The one table of dtype names: what users type, what config.json and safetensors headers say, and torch's.

  short  "fp32" | "bf16" | "fp16"             options of the CLI and the worker (`--dtype`)
  config "float32" | "bfloat16" | "float16"   config.json's torch_dtype / dtype, the description's "dtype"
  safetensors "F32" | "BF16" | ...            header dtypes (integers too: checkpoints may carry them; F8_E4M3
                                              and U8 are the stored forms of quantized weights)
"""

from __future__ import annotations

import torch

from .errors import HeteroConvertError

SHORT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIG = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,  # ModelOpt FP8 weights and NVFP4 block scales (io/quantized.py)
}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS.items()}
# What a Megatron checkpoint may store a model weight as (a training run's master copy may be fp64).
WEIGHTS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHORT_NAMES = {v: k for k, v in SHORT.items()}


def parse(name: str | torch.dtype | None, allowed: tuple[str, ...] = tuple(SHORT), what: str = "dtype",
          keep: bool = False) -> torch.dtype | None:
    """A torch dtype from a short name (or a dtype, passed through). `keep=True` also accepts "keep" and
    None, meaning "the source's own dtype", returned as None."""
    if name is None or (keep and name == "keep"):
        if keep:
            return None
        raise HeteroConvertError(f"{what} is required")
    if isinstance(name, torch.dtype):
        if SHORT_NAMES.get(name) in allowed:
            return name
        raise HeteroConvertError(f"{what} {name} is not one of {[SHORT[a] for a in allowed]}")
    if name in allowed:
        return SHORT[name]
    choices = (["keep"] if keep else []) + list(allowed)
    raise HeteroConvertError(f"{what} must be one of {choices}, got {name!r}")


def config_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (config.json's spelling)."""
    return str(dtype).replace("torch.", "")


def short_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16"; other dtypes by their config name."""
    return SHORT_NAMES.get(dtype, config_name(dtype))


def from_config(name: str | None, default: torch.dtype = torch.bfloat16) -> torch.dtype:
    """config.json's torch_dtype (None: `default`); anything else than the three float names is refused."""
    if name is None:
        return default
    if name not in CONFIG:
        raise HeteroConvertError(f"config torch_dtype {name!r} is not one of {list(CONFIG)}")
    return CONFIG[name]
