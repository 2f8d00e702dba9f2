"""ModelOpt FP8 / NVFP4 checkpoints: dequantized exactly as ModelOpt defines it, every stored tensor accounted
for, malformed quantization metadata refused by name, and conversions that stream.

The expected values here come from an independent decode (E2M1 from its bit layout, products in numpy's
float32/float64), not from the package's dequantizer."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hetero_convert.convert import hf_to_megatron, megatron_to_hf
from hetero_convert.describe import describe_path
from hetero_convert.errors import HeteroConvertError
from hetero_convert.fixtures_modelopt import (cast_e2m1, pack_e2m1, quantization_files, tiny_super_config,
                                              write_modelopt_checkpoint)
from hetero_convert.io.dcp import DCPReader
from hetero_convert.io.megatron_checkpoint import ITERATION_DIR
from hetero_convert.io.quantized import dequantize_fp8, dequantize_nvfp4, open_checkpoint, unpack_e2m1
from hetero_convert.quantization import read_quantization

FP8 = torch.float8_e4m3fn


# ---- an independent decode ------------------------------------------------------------------------------------


def e2m1_value(code: int) -> float:
    """E2M1 from its bits: sign, 2 exponent bits (bias 1), 1 mantissa bit; code 8 is +0 as ModelOpt has it."""
    e, m = (code >> 1) & 3, code & 1
    mag = m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
    return -mag if code & 8 and mag else mag


def reference_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    p = packed.numpy()
    codes = np.stack((p & 0x0F, p >> 4), axis=-1).reshape(p.shape[0], -1)
    values = np.vectorize(e2m1_value)(codes).astype(np.float32)
    combined = block_scale.to(torch.float32).numpy() * np.float32(s2.item())  # fp32 product
    return torch.from_numpy(values * np.repeat(combined, 16, axis=1)).to(torch.bfloat16)


def reference_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The exact product of the code and the bf16-rounded scale, rounded once to bf16."""
    s = scale.to(torch.bfloat16).double()
    return (q.double() * (s if s.dim() == 0 else s.reshape(-1, 1))).to(torch.bfloat16)


def reference_dequantized(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ModelOpt checkpoint as the unquantized model holds it."""
    stored = {}
    for f in sorted(src.glob("*.safetensors")):
        stored.update(load_file(f))
    out = {}
    for name, t in stored.items():
        module, _, suffix = name.rpartition(".")
        if suffix != "weight":
            continue
        if t.dtype == torch.uint8:
            out[name] = reference_nvfp4(t, stored[f"{module}.weight_scale"], stored[f"{module}.weight_scale_2"])
        elif t.dtype == FP8:
            out[name] = reference_fp8(t, stored[f"{module}.weight_scale"])
        else:
            out[name] = t
    return out


def load_all(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ---- the formulas ----------------------------------------------------------------------------------------------


def test_fp8_is_modelopts_bf16_product_not_the_fp32_one():
    """ModelOpt casts the scale to the model's dtype before multiplying; multiplying by the fp32 scale (what
    `q.to(bf16) * fp32_scalar` silently does in torch) gives other bf16 values for most elements."""
    q = (torch.randn(64, 64) * 40).to(FP8)
    scale = torch.tensor(0.0123456789, dtype=torch.float32)  # not representable in bf16
    ours = dequantize_fp8(q, scale, torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, reference_fp8(q, scale))
    fp32_route = (q.to(torch.float32) * scale).to(torch.bfloat16)
    assert (ours != fp32_route).float().mean() > 0.1
    per_row = torch.rand(64) + 0.01  # FP8_PER_CHANNEL_PER_TOKEN: one scale per output row
    assert torch.equal(dequantize_fp8(q, per_row.reshape(-1, 1), torch.bfloat16), reference_fp8(q, per_row))


def test_nvfp4_layout_table_and_scales():
    # element 2j in the low nibble; code 8 decodes to +0 (sign bit clear), as in ModelOpt's table
    assert unpack_e2m1(torch.tensor([[0x21, 0x8F]], dtype=torch.uint8)).tolist() == [[0.5, 1.0, -6.0, 0.0]]
    assert unpack_e2m1(torch.tensor([[0x21, 0x8F, 0x03]], dtype=torch.uint8)).tolist() == [[0.5, 1.0, -6.0, 0.0, 1.5,
                                                                                          0.0]]  # odd byte count
    assert torch.signbit(unpack_e2m1(torch.tensor([[0x88]], dtype=torch.uint8))).sum() == 0
    assert [e2m1_value(c) for c in range(16)] == unpack_e2m1(torch.tensor([[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC,
                                                                            0xFE]], dtype=torch.uint8)).tolist()[0]
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (32, 48), generator=g, dtype=torch.uint8)
    block_scale = (torch.rand(32, 6, generator=g) * 8 + 2.0**-9).to(FP8)
    s2 = torch.tensor(0.000123456, dtype=torch.float32)
    assert torch.equal(dequantize_nvfp4(packed, block_scale, s2, torch.bfloat16), reference_nvfp4(packed, block_scale, s2))


def test_fixture_quantizer_rounds_to_nearest_even_and_packs_low_nibble_first():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.75, -0.1, 0.3, 2.9])
    codes = cast_e2m1(x)
    assert [e2m1_value(int(c)) for c in codes] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -1.0, 0.0, 0.5, 3.0]
    assert pack_e2m1(codes.view(1, -1))[0, 0] == codes[0] | (codes[1] << 4)


# ---- config forms and refusals ---------------------------------------------------------------------------------


def write_quant_files(tmp: Path, hf_quant: dict | None, qc: dict | None) -> tuple[dict, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    if hf_quant is not None:
        (tmp / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    return ({"quantization_config": qc} if qc is not None else {}), tmp


@pytest.mark.parametrize("algo", ["FP8", "NVFP4"])
def test_every_modelopt_config_form_reads_alike(tmp_path, algo):
    seen = []
    for form in ("0.29", "0.33", "0.35"):
        hf_quant, qc = quantization_files(algo, form, "FP8", ["lm_head", "lm_head"])
        assert (qc is None) == (form == "0.29")
        only_config = read_quantization(*write_quant_files(tmp_path / f"c{form}", None, qc)) if qc else None
        both = read_quantization(*write_quant_files(tmp_path / form, hf_quant, qc))
        for s in filter(None, (both, only_config)):
            seen.append((s.quant_algo, s.kv_cache_quant_algo, s.exclude_modules, s.group_size))
        assert both.producer == f"modelopt {form}.0"
    assert len(set(seen)) == 1 and seen[0][:3] == (algo, "FP8", ("lm_head",))
    assert seen[0][3] == (16 if algo == "NVFP4" else None)


def modelopt(**q):
    return {"producer": {"name": "modelopt", "version": "0.35.0"},
            "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"], **q}}


@pytest.mark.parametrize("hf_quant,qc,message", [
    (modelopt(quant_algo="W4A16_AWQ"), None, "quant_algo 'W4A16_AWQ' is not supported (AWQ"),
    (modelopt(quant_algo="NVFP4_SVD"), None, "'NVFP4_SVD' is not supported (SVDQuant"),
    (modelopt(quant_algo="MIXED_PRECISION"), None, "'MIXED_PRECISION' is not supported (per-layer"),
    (modelopt(quant_algo="FP8_BLOCK"), None, "'FP8_BLOCK' is not supported (not an algorithm"),
    (modelopt(kv_cache_quant_algo="INT8"), None, "kv_cache_quant_algo 'INT8' is not supported"),
    (modelopt(quant_algo="NVFP4", group_size=32), None, "NVFP4 group_size 32 is not supported"),
    (modelopt(quant_algo=7), None, "quantization.quant_algo must be an algorithm name, got 7"),
    ({"producer": {"name": "llmcompressor"}, "quantization": {}}, None, "not ModelOpt"),
    (None, {"quant_method": "compressed-tensors"}, "quant_method 'compressed-tensors' is not supported"),
    (None, {"quant_method": "fp8", "weight_block_size": [128, 128]}, "quant_method 'fp8' is not supported"),
    (None, {"quant_algo": "FP8"}, "neither quant_method nor quant_library 'modelopt'"),
    (modelopt(), {"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": ["lm_head"]},
     "disagree on quant_algo: 'FP8' vs 'NVFP4'"),
    (modelopt(), {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": []}, "disagree on the excluded modules"),
    (modelopt(), {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head"],
                  "kv_cache_scheme": {"num_bits": 4, "type": "int"}}, "is not a KV-cache quantization"),
])
def test_quantization_metadata_refused_by_name(tmp_path, hf_quant, qc, message):
    with pytest.raises(HeteroConvertError, match=re.escape(message)):
        read_quantization(*write_quant_files(tmp_path, hf_quant, qc))


# ---- checkpoints ---------------------------------------------------------------------------------------------


TWO_LAYERS = {
    "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "hidden_size": 64,
    "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 300, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False,
    "block_configs": [{"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 2.0}},
                      {"attention": {"replace_with_linear": True}, "ffn": {"intermediate_size": 96}}],
}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("modelopt_small")
    return {algo: write_modelopt_checkpoint(TWO_LAYERS, root / algo, algo=algo, max_shard_bytes=1 << 30)
            for algo in ("FP8", "NVFP4")}


def edited(src: Path, dst: Path, edit=None, quant_edit=None) -> Path:
    """A copy of a single-file checkpoint with its tensors (and its quantization in both files) edited."""
    shutil.copytree(src, dst)
    if edit is not None:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if quant_edit is not None:
        hfq = json.loads((dst / "hf_quant_config.json").read_text())
        cfg = json.loads((dst / "config.json").read_text())
        quant_edit(hfq["quantization"], cfg["quantization_config"])
        (dst / "hf_quant_config.json").write_text(json.dumps(hfq))
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


L0 = "model.layers.0"


def set_(key, value):
    def edit(t):
        t[key] = value
    return edit


def drop(*keys):
    def edit(t):
        for k in keys:
            t.pop(k)
    return edit


def exclude(module):
    def edit(q, qc):
        q["exclude_modules"].append(module)
        qc["ignore"].append(module)
    return edit


def no_kv(q, qc):
    q["kv_cache_quant_algo"] = None
    qc.pop("kv_cache_scheme")


MALFORMED = {
    "missing weight_scale": ("FP8", drop(f"{L0}.mlp.up_proj.weight_scale"), None,
                             f"'{L0}.mlp.up_proj.weight_scale' is missing"),
    "missing weight_scale_2": ("NVFP4", drop(f"{L0}.self_attn.o_proj.weight_scale_2"), None,
                               f"'{L0}.self_attn.o_proj.weight_scale_2' is missing"),
    "scale in bf16": ("FP8", set_(f"{L0}.mlp.up_proj.input_scale", torch.tensor(0.5, dtype=torch.bfloat16)), None,
                      f"'{L0}.mlp.up_proj.input_scale' is torch.bfloat16 []; ModelOpt writes an F32 scalar"),
    "negative scale": ("FP8", set_(f"{L0}.mlp.down_proj.weight_scale", torch.tensor(-0.5)), None,
                       "= -0.5: a scale must be finite and positive"),
    "NaN global scale": ("NVFP4", set_(f"{L0}.mlp.down_proj.weight_scale_2", torch.tensor(float("nan"))), None,
                         "nan: a scale must be finite and positive"),
    "swizzled block scales": ("NVFP4", set_(f"{L0}.mlp.down_proj.weight_scale", torch.zeros(64 * 8, dtype=torch.uint8)),
                              None, "1-D U8: the swizzled layout"),
    "block scales of the wrong shape": ("NVFP4", set_(f"{L0}.mlp.down_proj.weight_scale",
                                                     torch.ones(64, 4, dtype=FP8)), None, "are F8_E4M3 [64, 16]"),
    "AWQ pre_quant_scale": ("FP8", set_(f"{L0}.mlp.down_proj.pre_quant_scale", torch.ones(128)), None,
                            "an AWQ/SmoothQuant pre-quantization scale"),
    "quantizer state": ("FP8", set_(f"{L0}.mlp.down_proj.weight_quantizer._amax", torch.ones(())), None,
                        "ModelOpt quantizer state"),
    "scale without a weight": ("FP8", set_("model.layers.1.self_attn.q_proj.input_scale", torch.tensor(0.1)), None,
                               "belongs to no weight"),
    "excluded yet quantized": ("FP8", None, exclude(f"{L0}.mlp.down_proj"),
                               f"is quantized (torch.float8_e4m3fn) but exclude_modules lists '{L0}.mlp.down_proj'"),
    "unlisted bf16 linear": ("FP8", lambda t: (t.pop(f"{L0}.mlp.down_proj.weight_scale"),
                                               t.pop(f"{L0}.mlp.down_proj.input_scale"),
                                               t.__setitem__(f"{L0}.mlp.down_proj.weight", torch.zeros(64, 256,
                                                                                                      dtype=torch.bfloat16))),
                             None, "is stored unquantized (torch.bfloat16) but is not in exclude_modules"),
    "KV scales without KV quantization": ("FP8", None, no_kv, "a KV-cache scale, but kv_cache_quant_algo is null"),
    "NVFP4 codes in an FP8 checkpoint": ("FP8", set_(f"{L0}.mlp.down_proj.weight", torch.zeros(64, 64, dtype=torch.uint8)),
                                         None, "FP8 stores a 2-D F8_E4M3 weight"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_checkpoints_are_refused_by_name_before_writing(small, tmp_path, case):
    algo, edit, quant_edit, message = MALFORMED[case]
    src = edited(small[algo], tmp_path / "src", edit, quant_edit)
    with pytest.raises(HeteroConvertError, match=re.escape(message)):
        hf_to_megatron(src, tmp_path / "meg")
    assert not (tmp_path / "meg").exists()


def test_fp8_codes_without_a_quantization_config_are_refused(small, tmp_path):
    src = Path(shutil.copytree(small["FP8"], tmp_path / "src"))
    (src / "hf_quant_config.json").unlink()
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HeteroConvertError, match="stored as F8_E4M3, but neither config.json nor hf_quant_config"):
        hf_to_megatron(src, tmp_path / "meg")


@pytest.mark.parametrize("algo,key,value,message", [
    ("FP8", f"{L0}.mlp.gate_proj.weight", 0x7F, "dequantize to NaN/Inf (NaN codes"),
    ("NVFP4", f"{L0}.mlp.up_proj.weight_scale", 0x00, "block scales must be finite and positive"),
])
def test_bad_codes_fail_the_conversion_naming_the_tensor(small, tmp_path, algo, key, value, message):
    """Codes are checked as they are dequantized (a header-time check would read every weight twice): the
    conversion fails, names the weight, and leaves nothing behind."""
    def edit(t):
        raw = t[key].view(torch.uint8).clone()
        raw[5, 3] = value
        t[key] = raw.view(t[key].dtype)
    src = edited(small[algo], tmp_path / "src", edit)
    with pytest.raises(HeteroConvertError, match=re.escape(message)) as e:
        hf_to_megatron(src, tmp_path / "meg")
    assert key.rpartition(".weight")[0] in str(e.value) and "row 5:" in str(e.value)
    assert not (tmp_path / "meg").exists()


# ---- conversions ---------------------------------------------------------------------------------------------


CONVERSIONS = [  # (algo, layout, ModelOpt version form, KV-cache algorithm, tp, pp)
    ("FP8", "super", "0.35", "FP8", 2, 2),
    ("NVFP4", "ultra", "0.35", None, 2, 1),
    ("FP8", "ultra", "0.29", "FP8", 1, 2),
    ("NVFP4", "super", "0.33", "FP8", 2, 2),
    ("FP8_PER_CHANNEL_PER_TOKEN", "every-kind", "0.35", "FP8", 2, 1),
    ("W4A16_NVFP4", "every-kind", "0.35", None, 2, 1),
]
LAYOUTS = {"super": tiny_super_config, "ultra": lambda: "tiny-ultra-kinds", "every-kind": lambda: "tiny-every-kind"}


@pytest.mark.parametrize("algo,layout,form,kv,tp,pp", CONVERSIONS, ids=lambda v: str(v))
def test_megatron_tensors_equal_modelopts_dequantization(tmp_path, algo, layout, form, kv, tp, pp):
    src = write_modelopt_checkpoint(LAYOUTS[layout](), tmp_path / "hf", algo=algo, form=form, kv_cache=kv, seed=2)
    s = hf_to_megatron(src, tmp_path / "meg", tp=tp, pp=pp, workers=2)
    expected = reference_dequantized(src)
    # Directly in the Megatron checkpoint: a row-parallel weight (TP column chunks) is the dequantized down_proj.
    reader = DCPReader(tmp_path / "meg" / ITERATION_DIR)
    fc2 = reader.load("decoder.layers.0.mlp.linear_fc2.weight")
    assert fc2.dtype == torch.bfloat16 and torch.equal(fc2, expected["model.layers.0.mlp.down_proj.weight"])
    # And every tensor, through the exact way back: the dequantized model, bit for bit.
    megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    back = load_all(tmp_path / "back")
    assert sorted(back) == sorted(expected)
    assert [k for k in expected if not torch.equal(back[k], expected[k])] == []
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert "quantization_config" not in cfg and not (tmp_path / "back" / "hf_quant_config.json").exists()
    # The description records what was consumed; the summary what was read (the stored bytes, scales included).
    record = json.loads((tmp_path / "meg" / ITERATION_DIR / "hetero_convert.json").read_text())["source"]["quantization"]
    assert record["quant_algo"] == algo and record["quantized_weights"] == sum(
        1 for k, t in load_all(src).items() if k.endswith(".weight") and t.dtype in (FP8, torch.uint8))
    assert s.bytes_read == sum(f.stat().st_size for f in src.glob("*.safetensors")) - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in src.glob("*.safetensors"))


def test_chunks_read_only_their_packed_rows_and_scales(small):
    """Streaming holds for quantized weights: a TP chunk reads its own packed rows (columns) and the matching
    block-scale rows, nothing more; reading a tensor by chunks reads each stored byte once."""
    from hetero_convert.mappings import bind
    from hetero_convert.plan import load_plan

    ckpt = open_checkpoint(small["NVFP4"])
    read: dict[str, int] = {}
    real = ckpt.raw.read_into

    def counting(out, name, row_start, cols=None):
        read[name] = read.get(name, 0) + out.numel() * out.element_size()
        real(out, name, row_start, cols)
    ckpt.raw.read_into = counting
    maps = {m.megatron: m for m in bind(load_plan(small["NVFP4"]), tp=2)}
    for key, stored in (("decoder.layers.0.mlp.linear_fc2.weight", f"{L0}.mlp.down_proj"),  # column chunks
                        ("decoder.layers.0.mlp.linear_fc1.weight", f"{L0}.mlp.up_proj")):  # row chunks
        m = maps[key]
        for c in m.chunks(2):
            read.clear()
            m.read_chunk(ckpt, c, torch.bfloat16)
            if stored.endswith("down_proj"):
                assert read == {f"{stored}.weight": c.sizes[0] * c.sizes[1] // 2,
                                f"{stored}.weight_scale": c.sizes[0] * c.sizes[1] // 16}
        full = ckpt.raw.tensors[f"{stored}.weight"].nbytes + ckpt.raw.tensors[f"{stored}.weight_scale"].nbytes
        read.clear()
        for c in m.chunks(2):
            m.read_chunk(ckpt, c, torch.bfloat16)
        assert sum(v for k, v in read.items() if k.startswith(stored)) == full


def test_inspect_shows_the_quantization_per_layer_and_both_sizes(small, tmp_path):
    for algo, src in small.items():
        d = describe_path(src)
        q = d["quantization"]
        assert q["quant_algo"] == algo and q["exclude_modules"] == ["lm_head"]
        assert [row["weights"] for row in d["layers"]] == [q["weight_format"]] * 2
        ckpt = open_checkpoint(src)
        assert q["stored_bytes"] == ckpt.raw.total_bytes()  # the estimate from the config is the real size
        assert q["dequantized_bytes"] == ckpt.total_bytes() == 2 * d["parameters"]
    from typer.testing import CliRunner

    from hetero_convert.cli import app

    out = CliRunner().invoke(app, ["inspect", str(small["NVFP4"])])
    assert out.exit_code == 0 and "quantization: modelopt 0.35.0 NVFP4 (KV cache FP8; unquantized: lm_head)" in \
        out.output and "dequantized to bfloat16" in out.output


def test_dtype_option_casts_the_dequantized_model(small, tmp_path):
    """The dequantized model is the one in the config's dtype (bf16); --dtype fp32 is its exact upcast, not a
    second, finer dequantization."""
    hf_to_megatron(small["NVFP4"], tmp_path / "meg", dtype="fp32")
    got = DCPReader(tmp_path / "meg" / ITERATION_DIR).load("decoder.layers.0.mlp.linear_fc2.weight")
    want = reference_dequantized(small["NVFP4"])["model.layers.0.mlp.down_proj.weight"]
    assert got.dtype == torch.float32 and torch.equal(got, want.float())


def test_prune_reads_a_quantized_parent_dequantized(small):
    """prune's parent model reads through the same source: its layer tensors are the dequantized weights."""
    from hetero_convert.pruning.parent import ParentModel

    parent = ParentModel(small["FP8"])
    expected = reference_dequantized(small["FP8"])
    got = parent.layer_tensors(0)
    assert sorted(got) == sorted(k[len("model.layers.0."):] for k in expected if k.startswith("model.layers.0."))
    assert all(torch.equal(t, expected[f"model.layers.0.{k}"]) for k, t in got.items())
