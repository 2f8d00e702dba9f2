"""verify: HF model vs the real megatron-core GPTModel on CPU (gloo), at four layouts, and negative cases.

Each layout is one torchrun launch for all fixtures (starting torchrun and importing megatron costs more
than these models' forward passes).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hetero_convert.convert import hf_to_megatron
from hetero_convert.fixtures import write_random_checkpoint
from hetero_convert.verify import compare_logits, make_inputs, verify_many

FIXTURES = ["tiny-every-kind", "tiny-tied", "tiny-ultra-kinds", "tiny-llama"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    out = {}
    for name in FIXTURES:
        src = write_random_checkpoint(name, root / name / "hf", seed=5, max_shard_bytes=1 << 20)
        hf_to_megatron(src, root / name / "meg")
        out[name] = (src, root / name / "meg")
    return out


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_every_fixture_matches_at_layout(converted, tmp_path, tp, pp):
    pairs = [converted[name] for name in FIXTURES]
    reports = verify_many(pairs, tp=tp, pp=pp, device="cpu", dtype="fp32", batch=2, seq_len=24,
                          workdir=tmp_path)
    for name, r in zip(FIXTURES, reports):
        assert r.ok, (name, r.failures, r.metrics)
        assert r.metrics["max_rel_diff"] <= 1e-5 and r.metrics["top1_agreement"] == 1.0
        assert r.positions < r.batch * r.seq_len  # rows of different lengths: padding was exercised
        assert [l.layer for l in r.layers] == list(range(len(r.layers)))  # every layer, across stages


# ---- negative cases: each corruption must fail verify, naming the layer --------------------------------------


def edit_hf(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = {}
    for key, shard in index["weight_map"].items():
        shards.setdefault(shard, None)
    tensors = {}
    for shard in shards:
        tensors.update(load_file(dst / shard))
    edit(tensors)
    for shard in shards:
        names = [k for k, s in index["weight_map"].items() if s == shard]
        save_file({k: tensors[k].contiguous() for k in names}, dst / shard, metadata={"format": "pt"})
    return dst


def swap(a, b):
    def edit(t):
        t[a], t[b] = t[b].clone(), t[a].clone()
    return edit


def transpose(key):
    def edit(t):
        t[key] = t[key].t().contiguous()
    return edit


def test_corruptions_fail_and_name_the_layer(converted, tmp_path):
    src, _ = converted["tiny-every-kind"]
    cases = {
        # layer 7: GQA + SwiGLU; layer 1: GQA with 2 KV heads; layer 2: linear-replacement attention
        "gate/up swapped": (7, swap("model.layers.7.mlp.gate_proj.weight", "model.layers.7.mlp.up_proj.weight")),
        "K/V swapped": (1, swap("model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight")),
        "linear replacement transposed": (2, transpose("model.layers.2.self_attn.linear_attn.weight")),
    }
    pairs = []
    for k, (name, (_, edit)) in enumerate(cases.items()):
        bad = edit_hf(src, tmp_path / f"bad{k}", edit)
        hf_to_megatron(bad, tmp_path / f"meg{k}")
        pairs.append((src, tmp_path / f"meg{k}"))

    # The rope factor: megatron's builders fall back to 8 when the factor is not passed; Ultra's is 16.
    usrc, umeg = converted["tiny-ultra-kinds"]
    meg = Path(shutil.copytree(umeg, tmp_path / "meg-rope"))
    desc_path = meg / "release" / "hetero_convert.json"
    desc = json.loads(desc_path.read_text())
    assert desc["plan"]["rope_scaling"]["factor"] == 16.0
    desc["plan"]["rope_scaling"]["factor"] = 8.0
    desc_path.write_text(json.dumps(desc))
    # The structural check alone already refuses the pair...
    with pytest.raises(ValueError, match="rope_scaling"):
        verify_many([(usrc, meg)], device="cpu")
    pairs.append((usrc, meg))
    # ...and without it the logits do.
    reports = verify_many(pairs, device="cpu", dtype="fp32", batch=2, seq_len=24, workdir=tmp_path / "w",
                          structural_check=False)
    expected = [layer for layer, _ in cases.values()] + [0]  # ultra-kinds: layer 0 is the first attention
    for (name, r, layer) in zip(list(cases) + ["rope factor 16 -> 8"], reports, expected):
        assert not r.ok, name
        assert r.metrics["max_rel_diff"] > 1e-4, (name, r.metrics)
        assert r.first_bad_layer == layer, (name, r.first_bad_layer, [(l.layer, l.rel_max_diff) for l in r.layers])
        assert f"first diverging layer: {layer}" in " ".join(r.failures)
        # the layers before the corrupted one agree
        assert all(l.rel_max_diff < 1e-5 for l in r.layers if l.layer < layer)


# ---- metrics and inputs --------------------------------------------------------------------------------------


def test_metrics_ignore_padding_and_detect_differences():
    ids, mask = make_inputs(None, 100, batch=3, seq_len=10, seed=1)
    assert mask.sum(1).tolist() == sorted(mask.sum(1).tolist(), reverse=True) and len(set(mask.sum(1).tolist())) > 1
    a = torch.randn(3, 10, 50)
    b = a.clone()
    b[~mask.bool()] = 1e6  # garbage at padded positions must not count
    m = compare_logits(a, b, mask)
    assert m["max_abs_diff"] == 0 and m["top1_agreement"] == 1 and m["kl_max"] == 0
    b[0, 0, 0] += 5
    m = compare_logits(a, b, mask)
    assert m["max_abs_diff"] == pytest.approx(5, rel=1e-6) and m["kl_max"] > 0


def test_verify_cli_exit_codes(converted, tmp_path):
    src, meg = converted["tiny-tied"]
    out = subprocess.run([sys.executable, "-m", "hetero_convert.cli", "verify", "--hf", str(src), "--megatron",
                          str(meg), "--json", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["ok"] and r["metrics"]["max_rel_diff"] <= 1e-5
    # An impossible threshold makes the same run fail with exit code 1.
    out = subprocess.run([sys.executable, "-m", "hetero_convert.cli", "verify", "--hf", str(src), "--megatron",
                          str(meg), "--max-rel-diff", "0", "--min-top1", "1.0"], capture_output=True, text=True)
    assert out.returncode == 1 and "FAIL" in out.stdout


def test_bf16_top1_counts_only_decisive_positions():
    # Two positions: one clear winner, one near-tie whose order flips. The near-tie does not count in bf16.
    a = torch.tensor([[[10.0, 0.0, 0.0], [5.0, 4.99, 0.0]]])
    b = torch.tensor([[[10.0, 0.0, 0.0], [4.99, 5.0, 0.0]]])
    mask = torch.ones(1, 2, dtype=torch.long)
    m = compare_logits(a, b, mask, top1_margin=2.0**-6)
    assert m["top1_agreement"] == 0.5 and m["top1_agreement_decisive"] == 1.0 and m["decisive_fraction"] == 0.5
    # A flip at a decisive position is counted.
    b2 = torch.tensor([[[0.0, 10.0, 0.0], [5.0, 4.99, 0.0]]])
    assert compare_logits(a, b2, mask, top1_margin=2.0**-6)["top1_agreement_decisive"] == 0.0
    from hetero_convert.verify import DEFAULT_THRESHOLDS, check_thresholds

    assert check_thresholds(m, DEFAULT_THRESHOLDS["bf16"]) == []
    assert check_thresholds(m, DEFAULT_THRESHOLDS["fp32"])  # fp32 counts every position


def test_bf16_is_judged_against_the_fp32_noise_floor():
    from hetero_convert.verify import DEFAULT_THRESHOLDS, bf16_against_fp32, check_thresholds

    g = torch.Generator().manual_seed(0)
    ref32 = torch.randn(2, 16, 200, generator=g) * 4
    mask = torch.ones(2, 16, dtype=torch.long)
    noise = lambda s: torch.randn(ref32.shape, generator=g) * s  # noqa: E731
    hf16 = ref32 + noise(0.1)
    th = DEFAULT_THRESHOLDS["bf16"]
    # Megatron-bf16 as noisy as HF-bf16 (KL above the absolute 1e-3): within the noise floor, passes.
    meg16 = ref32 + noise(0.1)
    m = compare_logits(hf16, meg16, mask, th["top1_margin"])
    m.update(bf16_against_fp32(ref32, hf16, meg16, mask, th["top1_margin"]))
    assert m["fp32ref_hf_bf16_kl_mean"] > 1e-3 and check_thresholds(m, th) == []
    # A real error (three times the noise in KL terms and more) fails, and says against what.
    bad = ref32 + noise(0.4)
    m = compare_logits(hf16, bad, mask, th["top1_margin"])
    m.update(bf16_against_fp32(ref32, hf16, bad, mask, th["top1_margin"]))
    failures = check_thresholds(m, th)
    assert any("mean KL(HF-fp32 || Megatron-bf16)" in f and "HF-bf16's own" in f for f in failures)
