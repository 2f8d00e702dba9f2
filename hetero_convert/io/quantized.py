"""A ModelOpt FP8 / NVFP4 checkpoint read as the model it encodes: every quantized weight presented, dequantized,
under its plain name, so the converters, verify's reference and the live-model loader read it like any other
checkpoint (`open_checkpoint` is the one entry point).

Stored per quantized Linear `P` (ModelOpt's HF export; docs/conversion.md cites the sources):

  FP8        P.weight F8_E4M3 [out, in]      P.weight_scale F32 scalar          (P.input_scale F32 scalar)
  FP8 per-channel  P.weight F8_E4M3 [out, in]  P.weight_scale F32 [out]
  NVFP4      P.weight U8 [out, in/2]         P.weight_scale F8_E4M3 [out, in/16]  P.weight_scale_2 F32 scalar
             (two E2M1 values per byte, element 2j in the low nibble)              (P.input_scale F32 scalar)
  FP8/NVFP4 KV cache: self_attn.k_proj.k_scale, self_attn.v_proj.v_scale, F32 scalars

Dequantization, exactly as ModelOpt's own dequantizers compute it, into the model's dtype T (config.json's
torch_dtype, bf16 for every release):
  FP8    W = T(q) * T(s)                      (FP8QTensor.dequantize: both cast to T, multiplied in T)
  NVFP4  W = T(E2M1[n] * (f32(S) * s2))       (NVFP4QTensor.dequantize: block scale times global scale in
                                               fp32, times the E2M1 value in fp32, one cast to T)
Scales, input scales and KV-cache scales are consumed: each belongs to exactly one plain weight, whose entry
in `tensors` accounts for their bytes, so the converters' coverage check ("every stored tensor has a place")
sees each stored tensor exactly once. Whatever does not fit (a scale without its weight, a missing scale, an
unexpected dtype or shape, a quantized weight the exclusions list, a non-positive scale) is refused, by name,
before anything is read.

Reads stay lazy: a chunk of rows (and columns) reads only the packed rows and scale rows it needs, and is
dequantized in blocks of at most BLOCK_ELEMENTS, so the converters' memory bound holds.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import dtypes
from ..errors import CheckpointError
from ..quantization import QuantScheme, is_linear, read_quantization
from .hf_index import quoted
from .hf_reader import HFCheckpoint, TensorInfo

FP8 = torch.float8_e4m3fn
PLAIN_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
SCALES = ("weight_scale", "weight_scale_2", "input_scale")
KV_SCALES = {"k_scale": "self_attn.k_proj", "v_scale": "self_attn.v_proj"}
# Tensors of other quantization exports (or of ModelOpt's internal state) that a per-weight dequantization
# cannot account for: refused by name rather than reported as merely unexpected.
FOREIGN = {
    "pre_quant_scale": "an AWQ/SmoothQuant pre-quantization scale (it belongs to the previous layer's output)",
    "k_bias": "an affine KV-cache bias (NVFP4_AFFINE)",
    "v_bias": "an affine KV-cache bias (NVFP4_AFFINE)",
    "output_scale": "an output-quantizer scale, which ModelOpt's HF export never writes",
    "weight_scale_inv": "a DeepSeek-style block scale, not a ModelOpt export",
    "svdquant_lora_a": "an SVDQuant low-rank residual",
    "svdquant_lora_b": "an SVDQuant low-rank residual",
    "_amax": "ModelOpt quantizer state (a fake-quantized model, not an export)",
}
# E2M1 by nibble (bit 3 sign, bits 0-2 magnitude): ModelOpt's table, with +0 for code 8.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
NVFP4_GROUP = 16
BLOCK_ELEMENTS = 1 << 22  # dequantize at most this many elements at a time (~16 MiB of fp32 temporaries)


# ---- the formulas ----------------------------------------------------------------------------------------------


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ModelOpt FP8: the codes and the scale each cast to `dtype`, then multiplied in `dtype`. (Multiplying
    by the fp32 scale instead rounds differently for most scales.) `scale`: 0-dim, or [rows, 1] per channel."""
    return q.to(dtype) * scale.to(dtype)


def fp8_table(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize_fp8` of each of the 256 codes with one per-tensor scale: a weight is then one lookup per
    element (torch's fp8 -> bf16 cast alone is ~4x slower on CPU than the lookup)."""
    return dequantize_fp8(torch.arange(256, dtype=torch.uint8).view(FP8), scale, dtype)


_PAIR_TABLE: torch.Tensor | None = None


def _pair_table() -> torch.Tensor:
    """[65536, 4] fp32: the four E2M1 values of every two consecutive bytes, read as one little-endian uint16
    (first byte low). One lookup per two bytes is ~1.8x faster on CPU than one per byte (1 MiB, cached)."""
    global _PAIR_TABLE
    if _PAIR_TABLE is None:
        codes = torch.arange(65536)
        first, second = codes & 0xFF, codes >> 8
        table = torch.tensor(E2M1, dtype=torch.float32)
        _PAIR_TABLE = torch.stack((table[first & 0x0F], table[first >> 4], table[second & 0x0F], table[second >> 4]), 1)
    return _PAIR_TABLE


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> fp32 [..., 2n]: byte j holds element 2j in its low nibble and 2j+1 in its high one."""
    flat = packed.reshape(-1)
    if flat.numel() % 2 or sys.byteorder != "little":
        flat = torch.cat((flat, flat.new_zeros(2 - flat.numel() % 2 if flat.numel() % 2 else 0)))
        if sys.byteorder != "little":  # the pairs below are read first-byte-low
            flat = flat.view(-1, 2).flip(1).reshape(-1)
    index = flat.view(torch.int16).to(torch.int32) & 0xFFFF
    values = torch.index_select(_pair_table(), 0, index).view(-1)[: packed.numel() * 2]
    return values.view(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """ModelOpt NVFP4 (non-fused path): per-block scale x global scale in fp32, times the E2M1 values in fp32,
    one cast to `dtype`. packed uint8 [rows, n/2], block_scale F8_E4M3 [rows, n/16], global_scale fp32 0-dim."""
    return _nvfp4_products(packed, block_scale, global_scale).to(dtype)


def _nvfp4_products(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """The fp32 products E2M1[n] * (f32(S) * s2), before the one cast."""
    combined = block_scale.to(torch.float32) * global_scale.to(torch.float32)
    values = unpack_e2m1(packed).view(packed.shape[0], -1, NVFP4_GROUP)
    values.mul_(combined.unsqueeze(-1))
    return values.view(packed.shape[0], -1)


# ---- the checkpoint -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized Linear weight: its stored parts and the scalars already read (and checked)."""

    name: str  # the plain name, e.g. model.layers.3.mlp.up_proj.weight
    fmt: str  # "fp8", "fp8_per_channel", "nvfp4"
    shape: tuple[int, int]  # [out, in] of the dequantized weight
    weight: TensorInfo
    scale: TensorInfo
    table: torch.Tensor | None  # per-tensor FP8: the 256 codes dequantized with this weight's scale
    global_scale: torch.Tensor | None  # NVFP4 weight_scale_2
    consumed: tuple[str, ...]  # every stored tensor this weight accounts for


def _first_row(bad: torch.Tensor) -> int:
    return int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0, 0])


def _suffix(name: str) -> tuple[str, str]:
    module, _, suffix = name.rpartition(".")
    return module, suffix


class QuantizedCheckpoint:
    """The tensors of a ModelOpt checkpoint as the unquantized model holds them (a `TensorSource`): `tensors`
    has one entry per plain weight (its nbytes: the stored bytes it accounts for); quantized ones read as their
    dequantized values in `dtype`."""

    def __init__(self, ckpt: HFCheckpoint, scheme: QuantScheme, dtype: torch.dtype):
        self.raw, self.scheme, self.dtype, self.dir = ckpt, scheme, dtype, ckpt.dir
        self.tensors: dict[str, TensorInfo] = {}
        self.quantized: dict[str, QuantizedWeight] = {}
        problems = self._build()
        if problems:
            raise CheckpointError(f"{self.dir}: {len(problems)} problem(s) with the ModelOpt {scheme.quant_algo} "
                                  f"checkpoint ({', '.join(scheme.declared_in)}), nothing written:\n  - "
                                  + "\n  - ".join(problems[:50]))

    # ---- what is stored, and who owns it --------------------------------------------------------------------
    def _build(self) -> list[str]:
        raw, problems = self.raw.tensors, []
        weights = {_suffix(n)[0] for n in raw if _suffix(n)[1] == "weight"}
        parts: dict[str, dict[str, TensorInfo]] = {}
        for name, info in raw.items():
            module, suffix = _suffix(name)
            foreign = next((why for key, why in FOREIGN.items() if suffix == key or suffix.endswith(key)), None)
            if foreign is not None or "_quantizer." in name:
                problems.append(f"tensor {quoted(name)} is {foreign or 'ModelOpt quantizer state'}: not read")
            elif suffix in SCALES or suffix in KV_SCALES:
                if module not in weights:
                    problems.append(f"scale {quoted(name)} belongs to no weight ('{module}.weight' is absent)")
                else:
                    parts.setdefault(module, {})[suffix] = info
            elif suffix != "weight":
                self.tensors[name] = info  # passed through; an unexpected name is the coverage check's to report
        for module in sorted(weights):
            problems += self._module(module, parts.get(module, {}))
        return problems

    def _module(self, module: str, parts: dict[str, TensorInfo]) -> list[str]:
        s, name = self.scheme, f"{module}.weight"
        w = self.raw.tensors[name]
        problems: list[str] = []
        for kv, owner in KV_SCALES.items():
            if kv in parts:
                if not module.endswith(owner):
                    problems.append(f"{quoted(module + '.' + kv)}: a {kv} belongs to a {owner}, not here")
                elif s.kv_cache_quant_algo is None:
                    problems.append(f"{quoted(module + '.' + kv)}: a KV-cache scale, but kv_cache_quant_algo is "
                                    f"null")
                else:
                    problems += self._scalar(parts[kv])[1]
            elif s.kv_cache_quant_algo and module.endswith(owner) and not s.excluded(module):
                problems.append(f"{quoted(module + '.' + kv)} is missing (kv_cache_quant_algo "
                                f"{s.kv_cache_quant_algo})")
        kv_parts = [p for k, p in parts.items() if k in KV_SCALES]
        quant = {k: p for k, p in parts.items() if k not in KV_SCALES}
        if w.dtype not in (FP8, torch.uint8):
            if quant:
                problems.append(f"{quoted(name)} is {w.dtype} (not quantized) but has "
                                f"{', '.join(sorted(quant))}")
            elif is_linear(name, w.shape) and not s.excluded(module):
                problems.append(f"{quoted(name)} is stored unquantized ({w.dtype}) but is not in exclude_modules "
                                f"{list(s.exclude_modules)[:8]}: the checkpoint and its quantization config disagree")
            self.tensors[name] = replace(w, nbytes=w.nbytes + sum(p.nbytes for p in kv_parts))
            return problems
        if s.excluded(module):
            problems.append(f"{quoted(name)} is quantized ({w.dtype}) but exclude_modules lists '{module}'")
            return problems
        fmt = s.weight_format
        want = torch.uint8 if fmt == "nvfp4" else FP8
        if w.dtype != want or len(w.shape) != 2:
            problems.append(f"{quoted(name)} is {w.dtype} {list(w.shape)}; {s.quant_algo} stores a 2-D "
                            f"{dtypes.SAFETENSORS_NAMES[want]} weight")
            return problems
        need = {"weight_scale"} | ({"weight_scale_2"} if fmt == "nvfp4" else set()) | \
            ({"input_scale"} if s.input_scales else set())
        for k in sorted(need - set(quant)):
            problems.append(f"{quoted(module + '.' + k)} is missing ({s.quant_algo} weight {quoted(name)})")
        for k in sorted(set(quant) - need):
            problems.append(f"{quoted(module + '.' + k)} does not belong to a {s.quant_algo} weight")
        if problems:
            return problems
        out, cols = w.shape
        scale, table, global_scale = quant["weight_scale"], None, None
        if fmt == "nvfp4":
            shape = (out, 2 * cols)
            if shape[1] % NVFP4_GROUP:
                problems.append(f"{quoted(name)}: {shape[1]} inputs are not a multiple of the NVFP4 block "
                                f"{NVFP4_GROUP}")
            elif scale.dtype == torch.uint8 and len(scale.shape) == 1:
                problems.append(f"{quoted(scale.name)} is 1-D U8: the swizzled layout of TensorRT-LLM kernels, "
                                f"not ModelOpt's HF export ([out, in/16] F8_E4M3)")
            elif scale.dtype != FP8 or scale.shape != (out, shape[1] // NVFP4_GROUP):
                problems.append(f"{quoted(scale.name)} is {scale.dtype} {list(scale.shape)}; NVFP4 block scales are "
                                f"F8_E4M3 {[out, shape[1] // NVFP4_GROUP]}")
            global_scale, more = self._scalar(quant["weight_scale_2"])
            problems += more
        else:
            shape = (out, cols)
            if fmt == "fp8":
                value, more = self._scalar(scale)
                problems += more
                table = fp8_table(value, self.dtype) if value is not None else None
            elif scale.dtype != torch.float32 or scale.shape not in ((out,), (out, 1)):
                problems.append(f"{quoted(scale.name)} is {scale.dtype} {list(scale.shape)}; per-channel FP8 "
                                f"scales are F32 [{out}]")
        if "input_scale" in quant:
            problems += self._scalar(quant["input_scale"])[1]
        if problems:
            return problems
        consumed = (name,) + tuple(p.name for p in parts.values())
        self.quantized[name] = QuantizedWeight(name, fmt, shape, w, scale, table, global_scale, consumed)
        stored = w.nbytes + sum(p.nbytes for p in parts.values())
        self.tensors[name] = TensorInfo(name, w.file, self.dtype, shape, stored, w.offset)
        return problems

    def _scalar(self, info: TensorInfo) -> tuple[torch.Tensor | None, list[str]]:
        """A per-tensor F32 scale ([] or [1], both occur), read and checked: finite and positive."""
        if info.dtype != torch.float32 or math.prod(info.shape) != 1 or len(info.shape) > 1:
            return None, [f"{quoted(info.name)} is {info.dtype} {list(info.shape)}; ModelOpt writes an F32 scalar"]
        value = self.raw.read(info.name).reshape(())
        if not (math.isfinite(float(value)) and float(value) > 0):
            return None, [f"{quoted(info.name)} = {float(value)!r}: a scale must be finite and positive"]
        return value, []

    # ---- reading ---------------------------------------------------------------------------------------------
    def dtype_of(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def read_into(self, out: torch.Tensor, name: str, row_start: int, cols: slice | None = None) -> None:
        q = self.quantized.get(name)
        if q is None:
            self.raw.read_into(out, name, row_start, cols)
            return
        if out.dtype != self.dtype:
            raise ValueError(f"read_into: {name} reads as {self.dtype}, buffer is {out.dtype}")
        c0, c1, _ = (cols or slice(None)).indices(q.shape[1])
        step = max(1, BLOCK_ELEMENTS // max(1, c1 - c0))
        for a in range(0, out.shape[0], step):
            rows = slice(row_start + a, row_start + min(out.shape[0], a + step))
            block = out[a:a + step]
            self._dequantize(q, rows, c0, c1, block)
            lo, hi = torch.aminmax(block.reshape(-1)) if block.numel() else (torch.zeros(()), torch.zeros(()))
            if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                bad = ~torch.isfinite(block)
                raise CheckpointError(f"{quoted(name)} row {rows.start + _first_row(bad)}: {int(bad.sum())} values "
                                      f"dequantize to NaN/Inf (NaN codes in {q.weight.name} or {q.scale.name})")

    def _dequantize(self, q: QuantizedWeight, rows: slice, c0: int, c1: int, out: torch.Tensor) -> None:
        """Rows `rows`, columns c0..c1 of the dequantized weight, into `out` (contiguous)."""
        n, full = rows.stop - rows.start, (c0, c1) == (0, q.shape[1])
        if q.fmt == "nvfp4":
            b0, b1 = c0 // NVFP4_GROUP * NVFP4_GROUP, min(q.shape[1], -(-c1 // NVFP4_GROUP) * NVFP4_GROUP)
            packed = torch.empty((n, (b1 - b0) // 2), dtype=torch.uint8)
            self.raw.read_into(packed, q.weight.name, rows.start, None if full else slice(b0 // 2, b1 // 2))
            block_scale = torch.empty((n, (b1 - b0) // NVFP4_GROUP), dtype=FP8)
            self.raw.read_into(block_scale, q.scale.name, rows.start,
                               None if full else slice(b0 // NVFP4_GROUP, b1 // NVFP4_GROUP))
            if block_scale.numel() and not float(block_scale.to(torch.float32).min()) > 0:
                row = rows.start + _first_row(~(block_scale.to(torch.float32) > 0))
                raise CheckpointError(f"{quoted(q.scale.name)} row {row}: block scales must be finite and positive "
                                      f"(ModelOpt writes 2^-9..448)")
            w = _nvfp4_products(packed, block_scale, q.global_scale)
            out.copy_(w if full else w[:, c0 - b0:c1 - b0])  # the one cast to the model's dtype
            return
        codes = torch.empty((n, c1 - c0), dtype=FP8)
        self.raw.read_into(codes, q.weight.name, rows.start, None if full else slice(c0, c1))
        if q.fmt == "fp8":
            index = codes.view(torch.uint8).reshape(-1).to(torch.int32)
            torch.index_select(q.table, 0, index, out=out.view(-1))
            return
        scale = self.raw.read(q.scale.name, rows=rows).reshape(n, 1)
        bad = ~(torch.isfinite(scale) & (scale > 0))
        if bool(bad.any()):
            raise CheckpointError(f"{quoted(q.scale.name)} row {rows.start + _first_row(bad)}: scales must be "
                                  f"finite and positive")
        out.copy_(dequantize_fp8(codes, scale, self.dtype))

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        info = self.tensors[name]
        if name not in self.quantized:
            return self.raw.read(name, rows, cols)
        r0, r1, _ = (rows or slice(None)).indices(info.shape[0])
        c0, c1, _ = (cols or slice(None)).indices(info.shape[1])
        out = torch.empty((r1 - r0, c1 - c0), dtype=self.dtype)
        self.read_into(out, name, r0, cols)
        return out

    # ---- totals -------------------------------------------------------------------------------------------
    def files(self) -> list[Path]:
        return self.raw.files()

    def total_bytes(self) -> int:
        """Bytes of the tensors as read (dequantized), which is what a conversion writes at --dtype keep."""
        return sum(math.prod(t.shape) * t.dtype.itemsize if n in self.quantized else t.nbytes
                   for n, t in self.tensors.items())

    def record(self) -> dict:
        """The quantization and what was consumed, for the converted checkpoint's description."""
        counts: dict[str, int] = {}
        for q in self.quantized.values():
            for part in q.consumed[1:]:
                counts[_suffix(part)[1]] = counts.get(_suffix(part)[1], 0) + 1
        kv = sum(1 for n in self.tensors if n not in self.quantized for k in KV_SCALES
                 if f"{n[:-len('.weight')]}.{k}" in self.raw.tensors)
        if kv:
            counts["kv_scales_on_unquantized_weights"] = kv
        return {**self.scheme.as_dict(), "dequantized_to": dtypes.config_name(self.dtype),
                "quantized_weights": len(self.quantized), "consumed": counts,
                "stored_bytes": self.raw.total_bytes()}


def open_checkpoint(directory: str | Path, config: dict | None = None) -> HFCheckpoint | QuantizedCheckpoint:
    """The HF checkpoint in `directory` as a `TensorSource`: a ModelOpt-quantized one dequantized on read, any
    other as stored. FP8 tensors without a ModelOpt quantization config are refused (their scales would be
    ignored)."""
    from ..plan import load_config

    directory = Path(directory)
    config = load_config(directory) if config is None else config
    scheme = read_quantization(config, directory)
    ckpt = HFCheckpoint(directory)
    if scheme is None:
        fp8 = sorted(n for n, t in ckpt.tensors.items() if t.dtype == FP8)
        if fp8:
            raise CheckpointError(f"{directory}: tensor {quoted(fp8[0])} (and {len(fp8) - 1} more) is stored as "
                                  f"F8_E4M3, but neither config.json nor hf_quant_config.json declares a ModelOpt "
                                  f"quantization: refusing to read quantized codes without their scales")
        return ckpt
    try:
        dtype = dtypes.from_config(config.get("torch_dtype") or config.get("dtype"))
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    return QuantizedCheckpoint(ckpt, scheme, dtype)
