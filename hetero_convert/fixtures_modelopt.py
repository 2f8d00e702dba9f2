"""Synthetic ModelOpt FP8 / NVFP4 checkpoints, in the exact layout ModelOpt's HF export writes (tests and
benchmarks; no released quantized checkpoint can be downloaded here).

The quantizer is written from ModelOpt's definitions (docs/conversion.md cites them):
  FP8    scale = amax / 448 (amax over the whole tensor), codes = fp8_e4m3fn(W / scale), F32 0-dim scale;
         per-channel: amax per output row, scale F32 [out].
  NVFP4  global scale s2 = amax / (6 * 448); per block of 16 inputs S = fp8(block_amax / (6 * s2)), all-zero
         blocks 1.0, clamped to [2^-9, 448]; codes = E2M1(W / (S * s2)) with ties to even, packed two per byte,
         element 2j in the low nibble.
  Linears that read the same input share their per-tensor weight amax and their input scale, as ModelOpt's
  fusion pre-processing makes them (q/k/v; gate/up); o_proj, down_proj and the linear replacements stand alone.
  KV-cache scales (k_proj.k_scale, v_proj.v_scale) are amax / 448 clamped to >= 1, as ModelOpt 0.29-0.40 do.

`form` picks the config files of a ModelOpt version: "0.29" (hf_quant_config.json only), "0.33" (also
config.json quantization_config with quant_library), "0.35" (quant_method, the form of every later version).
Tensors are generated and written one layer at a time, so a benchmark checkpoint is written in bounded memory.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from .fixtures import bundled_config, random_tensor
from .io.hf_checkpoint import ShardedWriter, plan_shards
from .mappings import expected_hf_keys
from .plan import load_config, load_plan
from .quantization import SUPPORTED, is_linear

FP8 = torch.float8_e4m3fn
E4M3_MAX, E2M1_MAX = 448.0, 6.0
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # magnitude code = bounds below |x| (+1 on the odd ties)
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
VERSIONS = {"0.29": "0.29.0", "0.33": "0.33.0", "0.35": "0.35.0"}


# ---- the quantizer -------------------------------------------------------------------------------------------


def quantize_fp8(w: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale): scale = amax / 448 in fp32 (0-dim, or [out] for a per-row amax)."""
    scale = (amax.to(torch.float32) / E4M3_MAX)
    per_row = scale.reshape(-1, 1) if scale.dim() else scale
    return (w.to(torch.float32) / per_row).to(FP8), scale


def cast_e2m1(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> uint8 E2M1 codes (sign in bit 3), round to nearest with ties to the even code, saturating at 6."""
    a = x.abs()
    bounds = torch.tensor(E2M1_BOUNDS)
    code = (a.unsqueeze(-1) > bounds).sum(-1)
    code += ((a == 0.75) | (a == 1.75) | (a == 3.5)).long()
    return (code | ((x < 0).long() << 3)).to(torch.uint8)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """[..., n] codes -> [..., n/2] bytes, element 2j in the low nibble."""
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def quantize_nvfp4(w: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [out, in/2], block scales F8_E4M3 [out, in/16], global scale fp32 0-dim)."""
    out, inp = w.shape
    s2 = amax.to(torch.float32) / (E2M1_MAX * E4M3_MAX)
    blocks = w.to(torch.float32).view(out, inp // 16, 16)
    block_amax = blocks.abs().amax(-1)
    s = block_amax / (E2M1_MAX * s2)
    s = torch.where(block_amax == 0, torch.ones_like(s), s).clamp(2.0**-9, E4M3_MAX).to(FP8)
    codes = cast_e2m1(blocks / (s.to(torch.float32) * s2).unsqueeze(-1))
    return pack_e2m1(codes.view(out, inp)), s, s2


# ---- the checkpoint --------------------------------------------------------------------------------------------


def _amax(name: str, seed: int, lo: float, hi: float) -> float:
    """A calibration-like amax, deterministic per (seed, name)."""
    return lo + (hi - lo) * (zlib.crc32(f"{seed}:{name}".encode()) % 10007) / 10007


def stored_specs(key: str, shape: tuple[int, ...], algo: str, quantized: bool, kv: str | None,
                 dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The stored tensors of one HF tensor: itself, or its quantized form and scales."""
    module = key[: -len(".weight")]
    kv_specs = []
    if kv and module.endswith("self_attn.k_proj"):
        kv_specs = [(f"{module}.k_scale", torch.float32, ())]
    elif kv and module.endswith("self_attn.v_proj"):
        kv_specs = [(f"{module}.v_scale", torch.float32, ())]
    if not quantized:
        return [(key, dtype, shape)] + kv_specs
    fmt, inputs = SUPPORTED[algo]
    out, inp = shape
    if fmt == "nvfp4":
        specs = [(key, torch.uint8, (out, inp // 2)), (f"{module}.weight_scale", FP8, (out, inp // 16)),
                 (f"{module}.weight_scale_2", torch.float32, ())]
    else:
        specs = [(key, FP8, shape), (f"{module}.weight_scale", torch.float32, (out,) if fmt == "fp8_per_channel" else ())]
    if inputs:
        specs.append((f"{module}.input_scale", torch.float32, ()))
    return specs + kv_specs


def quantized_tensors(weights: dict[str, torch.Tensor], algo: str, seed: int) -> dict[str, torch.Tensor]:
    """The stored tensors of a group of Linears that read the same input (they share the per-tensor amax
    and the input scale, as ModelOpt fuses them)."""
    fmt, inputs = SUPPORTED[algo]
    first = next(iter(weights))
    amax = torch.stack([w.abs().max().to(torch.float32) for w in weights.values()]).max()
    x_amax = torch.tensor(_amax(first, seed, 1.0, 20.0), dtype=torch.float32)
    out = {}
    for key, w in weights.items():
        module = key[: -len(".weight")]
        if fmt == "nvfp4":
            out[key], out[f"{module}.weight_scale"], out[f"{module}.weight_scale_2"] = quantize_nvfp4(w, amax)
            x_scale = x_amax / (E2M1_MAX * E4M3_MAX)
        else:
            row_amax = w.abs().amax(1).to(torch.float32) if fmt == "fp8_per_channel" else amax
            out[key], out[f"{module}.weight_scale"] = quantize_fp8(w, row_amax)
            x_scale = x_amax / E4M3_MAX
        if inputs:
            out[f"{module}.input_scale"] = x_scale.clone()
    return out


def quantization_files(algo: str, form: str, kv: str | None, exclude: list[str]) -> tuple[dict, dict | None]:
    """(hf_quant_config.json, config.json's quantization_config or None) as ModelOpt `form` writes them."""
    version = VERSIONS[form]
    q = {"quant_algo": algo, "kv_cache_quant_algo": kv, "exclude_modules": list(exclude)}
    fmt, inputs = SUPPORTED[algo]
    if fmt == "nvfp4":
        q["group_size"] = 16
    hf_quant = {"producer": {"name": "modelopt", "version": version}, "quantization": q}
    if form == "0.29":
        return hf_quant, None
    bits = 4 if fmt == "nvfp4" else 8
    group = {"weights": {"dynamic": False, "num_bits": bits, "type": "float"}}
    if inputs:
        group["input_activations"] = {"dynamic": False, "num_bits": bits, "type": "float"}
    if fmt == "nvfp4":
        for v in group.values():
            v["group_size"] = 16
    if fmt == "fp8_per_channel":
        group["weights"]["strategy"] = "channel"
    group["targets"] = ["Linear"]
    qc = {"config_groups": {"group_0": group}, "ignore": list(exclude), "quant_algo": algo}
    if kv:
        qc["kv_cache_scheme"] = kv if form == "0.33" else {"dynamic": False, "num_bits": 8, "type": "float"}
    qc["producer"] = {"name": "modelopt", "version": version}
    qc["quant_library" if form == "0.33" else "quant_method"] = "modelopt"
    return hf_quant, qc


def write_modelopt_checkpoint(config: dict | str | Path, out_dir: str | Path, algo: str = "FP8",
                              form: str = "0.35", kv_cache: str | None = "FP8", seed: int = 0,
                              exclude: tuple[str, ...] = ("lm_head",), max_shard_bytes: int = 2 << 20) -> Path:
    """A random bf16 model (`fixtures.random_tensor`, the values of `write_random_checkpoint`) quantized and
    written as ModelOpt `form` exports `algo`."""
    if isinstance(config, str) and not Path(config).exists():
        config = bundled_config(config)
    cfg = dict(config) if isinstance(config, dict) else load_config(config)
    cfg["torch_dtype"] = "bfloat16"
    plan = load_plan(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16

    def excluded(key: str) -> bool:
        from .quantization import QuantScheme

        return QuantScheme(algo, None, tuple(exclude), None, "", ()).excluded(key[: -len(".weight")])

    shapes = expected_hf_keys(plan)
    quantize = {k: is_linear(k, s) and not excluded(k) for k, s in shapes.items()}
    specs = [spec for k, s in shapes.items() for spec in stored_specs(k, s, algo, quantize[k], kv_cache, dtype)]
    writer = ShardedWriter(out, plan_shards([[t] for t in specs], max_shard_bytes))
    try:
        for group in _groups(shapes):
            weights = {k: random_tensor(k, shapes[k], seed, dtype) for k in group}
            if quantize[group[0]]:
                tensors = quantized_tensors(weights, algo, seed)
            else:
                tensors = weights
            for k in group:
                module = k[: -len(".weight")]
                for kv_name, owner in (("k_scale", "self_attn.k_proj"), ("v_scale", "self_attn.v_proj")):
                    if kv_cache and module.endswith(owner):
                        tensors[f"{module}.{kv_name}"] = torch.tensor(max(_amax(module, seed, 50.0, 900.0) / 448, 1.0))
            for name, t in tensors.items():
                writer.write(name, t.contiguous())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    writer.write_index()
    hf_quant, qc = quantization_files(algo, form, kv_cache, list(exclude))
    (out / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4))
    if qc is not None:
        cfg["quantization_config"] = qc
    if plan.source_format.startswith("decilm"):
        from .remote_code import write_remote_code

        cfg["auto_map"] = write_remote_code(out)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _groups(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """The HF tensors in model order, Linears that read the same input together."""
    groups, seen = [], set()
    for key in shapes:
        if key in seen:
            continue
        group = [key]
        module, _, _ = key.rpartition(".weight")
        parent, _, leaf = module.rpartition(".")
        for fused in FUSED:
            if leaf == fused[0]:
                group = [f"{parent}.{m}.weight" for m in fused if f"{parent}.{m}.weight" in shapes]
        seen.update(group)
        groups.append(group)
    return groups


def tiny_super_config(layers: int = 10) -> dict:
    """The released Llama-3.3-Nemotron-Super-49B-v1 config at hidden 128 / 8 heads / vocab 1000: its own
    block_configs (attention-free blocks, n_heads_in_group 8, ffn_mult 5.25 ... 0.5), the first block of each
    distinct kind up to `layers` blocks, so the tiny model has every kind the release has."""
    from .resources import shipped_dir

    name = "released/Llama-3_3-Nemotron-Super-49B-v1.json"
    cfg = load_config(shipped_dir("fixtures", name) / name)
    picked, kinds = [], set()
    for block in cfg["block_configs"]:
        kind = json.dumps(block, sort_keys=True)
        if kind not in kinds:
            kinds.add(kind)
            picked.append(block)
        if len(picked) == layers:
            break
    return {**cfg, "hidden_size": 128, "num_attention_heads": 8, "vocab_size": 1000, "num_hidden_layers": len(picked),
            "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2, "block_configs": picked}
