"""verify: megatron-core's GPTModel judged against the fp64 HF model (layer-streamed), on CPU (gloo).

Each layout is one torchrun launch for all fixtures (starting torchrun and importing megatron costs more
than these models' forward passes).
"""

import gc
import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from conftest import dtype_kwarg, restate_description
from safetensors.torch import load_file, save_file

from hetero_convert.convert import hf_to_megatron
from hetero_convert.fixtures import write_random_checkpoint
from hetero_convert.io.hf_index import CheckpointError
from hetero_convert.reference import LayerStreamedReference, reference_forward
from hetero_convert.parity import FACTOR, compare_logits, floors, judge, make_inputs, verify_many

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


@pytest.mark.megatron
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_every_fixture_matches_at_layout(converted, tmp_path, tp, pp):
    pairs = [converted[name] for name in FIXTURES]
    reports = verify_many(pairs, tp=tp, pp=pp, device="cpu", dtype="fp32", batch=2, seq_len=24,
                          workdir=tmp_path)
    for name, r in zip(FIXTURES, reports):
        m = r.metrics
        assert r.ok, (name, r.failures, m)
        # Judged against fp64, next to HF-fp32: both are measurably off the truth, by comparable amounts.
        assert 0 < m["megatron_fp64_max_rel_diff"] <= r.thresholds["max_rel_diff"] < 1e-5
        assert 0 < m["hf_fp64_max_rel_diff"] < 1e-5
        assert m["megatron_fp64_top1_decisive"] == 1.0 and m["decisive_fraction"] > 0.5
        assert r.positions < r.batch * r.seq_len  # rows of different lengths: padding was exercised
        assert r.prompts.startswith("random ids")  # these checkpoints have no tokenizer
        assert [l.layer for l in r.layers] == list(range(len(r.layers)))  # every layer, across stages
        assert all(l.ok for l in r.layers), [(l.layer, l.hf_rel, l.megatron_rel) for l in r.layers if not l.ok]


# ---- negative cases at hidden 1024: each corruption must fail verify, naming the layer ---------------------------


def blk(group=None, mult=None, attn="gqa", ffn="swiglu") -> dict:
    return {"attention": {"n_heads_in_group": group if attn == "gqa" else None, "no_op": attn == "none",
                          "replace_with_linear": attn == "linear"},
            "ffn": {"ffn_mult": mult if ffn == "swiglu" else None, "no_op": ffn == "none",
                    "replace_with_linear": ffn == "linear"}}


# Ultra's and 51B's kinds at the hidden size where the old fixed fp32 bound started to fail correct conversions;
# few layers and a small vocabulary keep it cheap on 2 cores (benchmarks/verify_at_size.py runs 24 layers).
HIDDEN_1024 = {
    "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "hidden_act": "silu",
    "hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 6, "vocab_size": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 16.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "block_configs": [blk(2, 2.4375), blk(attn="none", ffn="none"), blk(attn="linear", mult=1.95),
                      blk(4, 2.4375), blk(attn="none", mult=4.875), blk(16, ffn="linear")],
}


def edit_hf(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
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


@pytest.mark.megatron
def test_corruptions_fail_and_name_the_layer_at_hidden_1024(tmp_path):
    src = write_random_checkpoint(HIDDEN_1024, tmp_path / "hf", seed=3, max_shard_bytes=16 << 20)
    hf_to_megatron(src, tmp_path / "meg")
    cases = {
        "correct": (None, None),
        "gate/up swapped": (4, swap("model.layers.4.mlp.gate_proj.weight", "model.layers.4.mlp.up_proj.weight")),
        "K/V swapped": (3, swap("model.layers.3.self_attn.k_proj.weight", "model.layers.3.self_attn.v_proj.weight")),
        "linear replacement transposed": (2, transpose("model.layers.2.self_attn.linear_attn.weight")),
    }
    pairs = [(src, tmp_path / "meg")]
    for k, (_, edit) in enumerate(cases.values()):
        if edit is not None:
            hf_to_megatron(edit_hf(src, tmp_path / f"bad{k}", edit), tmp_path / f"meg{k}")
            pairs.append((src, tmp_path / f"meg{k}"))

    # The rope factor: megatron's builders fall back to 8 when the factor is not passed; Ultra's is 16.
    meg = Path(shutil.copytree(tmp_path / "meg", tmp_path / "meg-rope"))
    assert json.loads((meg / "release" / "hetero_convert.json").read_text())["plan"]["rope_scaling"]["factor"] == 16.0
    # A description that agrees with itself and its source record (the tensors cannot tell the rope factor).
    restate_description(meg, lambda cfg: cfg["rope_scaling"].update(factor=8.0))
    # The structural check alone already refuses the pair...
    with pytest.raises(ValueError, match="rope_scaling"):
        verify_many([(src, meg)], device="cpu")
    pairs.append((src, meg))
    # ...and without it the logits do: ~1e-4 of the logits' range at these 32 positions, against a bound of
    # a few 1e-6 (twice HF-fp32's own distance from fp64).
    reports = verify_many(pairs, device="cpu", dtype="fp32", batch=2, seq_len=32, workdir=tmp_path / "w",
                          structural_check=False)
    expected = [layer for layer, _ in cases.values()] + [0]  # layer 0 is the first attention layer
    for name, r, layer in zip(list(cases) + ["rope factor 16 -> 8"], reports, expected):
        m = r.metrics
        rows = [(l.layer, l.hf_rel, l.megatron_rel) for l in r.layers]
        if layer is None:
            assert r.ok and all(l.ok for l in r.layers), (r.failures, rows)
            assert r.thresholds["max_rel_diff"] < 2e-5
            continue
        assert not r.ok, (name, m)
        # far outside the noise: at least 10x the bound (the rope factor; the mapping bugs are 10^4 x)
        assert m["megatron_fp64_max_rel_diff"] > 10 * r.thresholds["max_rel_diff"], (name, m)
        assert r.first_bad_layer == layer, (name, r.first_bad_layer, rows)
        assert f"first diverging layer: {layer}" in " ".join(r.failures)
        # the layers before the corrupted one are within bound
        assert all(l.ok for l in r.layers if l.layer < layer), (name, rows)


# ---- the calibrated rule --------------------------------------------------------------------------------------


def noisy(ref, scale, seed):
    return ref + torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_rule_passes_megatron_as_noisy_as_hf_and_fails_a_real_error():
    ref = torch.randn(2, 16, 300, generator=torch.Generator().manual_seed(0)).double() * 4
    mask = torch.ones(2, 16, dtype=torch.long)
    hf = noisy(ref, 1e-3, 1)
    # As noisy as HF-X (a different draw): within FACTOR of HF's distance, in max and in KL.
    metrics, th, failures = judge(ref, hf, noisy(ref, 1e-3, 2), mask, "fp32")
    assert failures == [] and th["max_rel_diff"] == pytest.approx(FACTOR * metrics["hf_fp64_max_rel_diff"])
    assert th["max_mean_kl"] == pytest.approx(FACTOR**2 * metrics["hf_fp64_kl_mean"])
    # Three times HF's noise: out of bound, and the message says against what.
    _, _, failures = judge(ref, hf, noisy(ref, 3e-3, 2), mask, "fp32")
    assert any("Megatron-fp32 - fp64" in f and "HF-fp32's own" in f for f in failures)
    assert any("mean KL(fp64 || Megatron-fp32)" in f for f in failures)


def test_rule_floor_when_hf_is_exact():
    # HF-X equal to the truth must not demand that Megatron-X be exact too: one unit in the last place of X
    # at the largest logit passes, ten do not.
    ref = torch.randn(1, 8, 50, generator=torch.Generator().manual_seed(0)).double()
    mask = torch.ones(1, 8, dtype=torch.long)
    eps, top = torch.finfo(torch.float32).eps, ref.abs().max()
    one_ulp = ref.clone()
    one_ulp[0, 0, 0] += eps * top
    metrics, th, failures = judge(ref, ref.clone(), one_ulp, mask, "fp32")
    assert metrics["hf_fp64_max_rel_diff"] == 0 and th["max_rel_diff"] == floors("fp32")["floor_rel"]
    assert failures == []
    ten = ref.clone()
    ten[0, 0, 0] += 10 * eps * top
    assert judge(ref, ref.clone(), ten, mask, "fp32")[2]


def test_top1_counts_only_positions_no_model_within_bound_can_flip():
    # Position 0: a clear winner; position 1: a near-tie (lead 1e-6) that noise of 1e-5 may flip.
    ref = torch.tensor([[[10.0, 0.0, 0.0], [5.0, 4.999999, 0.0]]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.long)
    noise = torch.tensor([[[1e-5, -1e-5, 0.0], [1e-5, -1e-5, 1e-5]]], dtype=torch.float64)
    hf, meg = ref + noise, ref - noise  # equally far from fp64; Megatron's flips the near-tie
    metrics, th, failures = judge(ref, hf, meg, mask, "fp32")
    assert metrics["megatron_fp64_top1"] == 0.5 and metrics["megatron_fp64_top1_decisive"] == 1.0
    assert metrics["decisive_fraction"] == 0.5 and failures == []
    # A flip where the lead is wider than twice the allowed error is reported as such.
    meg2 = meg.clone()
    meg2[0, 0, 1] = 10.5
    assert any("top-1 agreement with fp64 0.0000 < 1" in f for f in judge(ref, hf, meg2, mask, "fp32")[2])


def test_metrics_ignore_padding_and_detect_differences():
    ids, mask, source = make_inputs(None, 100, batch=3, seq_len=10, seed=1)
    assert source == "random ids (seed 1)"
    assert mask.sum(1).tolist() == sorted(mask.sum(1).tolist(), reverse=True) and len(set(mask.sum(1).tolist())) > 1
    a = torch.randn(3, 10, 50)
    b = a.clone()
    b[~mask.bool()] = 1e6  # garbage at padded positions must not count
    m = compare_logits(a, b, mask)
    assert m["max_abs_diff"] == 0 and m["top1_agreement"] == 1 and m["kl_max"] == 0
    b[0, 0, 0] += 5
    m = compare_logits(a, b, mask)
    assert m["max_abs_diff"] == pytest.approx(5, rel=1e-6) and m["kl_max"] > 0


# ---- the layer-streamed HF side --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-every-kind", "tiny-tied", "tiny-llama"])
def test_reference_equals_the_whole_hf_model(converted, name):
    """The streamed model computes exactly what from_pretrained's model computes (sdpa), layer by layer."""
    from transformers import AutoModelForCausalLM

    import hetero_convert.hf  # noqa: F401

    src, _ = converted[name]
    ids, mask, _ = make_inputs(None, 500, batch=2, seq_len=16)
    ref = reference_forward(src, ids, mask, ("fp64", "fp32", "bf16"))
    keep = mask.bool()
    for d, dt in (("fp64", torch.float64), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(str(src), **dtype_kwarg(dt), attn_implementation="sdpa",
                                                     trust_remote_code=False).eval()
        hidden = {}
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_hook(lambda m, a, o, i=i: hidden.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        # DeciLM returns fp32 logits whatever its dtype; the streamed fp64 stream keeps fp64.
        assert torch.equal(ref[d].logits[keep].to(logits.dtype), logits[keep]), d
        assert sorted(hidden) == sorted(ref[d].hidden)
        for i in hidden:
            assert torch.equal(ref[d].hidden[i][keep], hidden[i][keep].to(ref[d].hidden[i].dtype)), (d, i)
    # fp64 really is more precise: HF-fp32 is measurably off it, bf16 far more.
    rel = {d: (ref[d].logits - ref["fp64"].logits)[keep].abs().max() / ref["fp64"].logits[keep].abs().max()
           for d in ("fp32", "bf16")}
    assert 0 < rel["fp32"] < 1e-5 < 1e-3 < rel["bf16"]


def test_reference_holds_one_layer_at_a_time(converted):
    src, _ = converted["tiny-every-kind"]
    ref = LayerStreamedReference(src)
    alive, built = [], []
    real = ref._layer

    def tracking(i):
        gc.collect()
        alive.append(sum(1 for w in built if w() is not None))
        module = real(i)
        built.append(weakref.ref(module))
        return module

    ref._layer = tracking
    ids, mask, _ = make_inputs(None, 1000, batch=1, seq_len=8)
    ref.run(ids, mask, ("fp64", "fp32"))
    assert len(built) == ref.plan.num_layers and alive == [0] * len(built)
    # weights stay in the checkpoint's dtype; only the stream's cast of one matrix exists at a time
    layer = real(0)
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}


def rewrite_shard_of(src: Path, dst: Path, key: str, change) -> Path:
    """A copy of src where change(tensors of the shard holding `key`, weight_map) edits that shard and the index."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][key]
    tensors = load_file(dst / shard)
    change(tensors, index["weight_map"], shard)
    save_file(tensors, dst / shard, metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_reference_refuses_missing_and_stray_tensors(converted, tmp_path):
    src, _ = converted["tiny-every-kind"]
    ids, mask, _ = make_inputs(None, 1000, batch=1, seq_len=8)
    key = "model.layers.1.self_attn.k_proj.weight"

    def drop(tensors, weight_map, shard):
        tensors.pop(key), weight_map.pop(key)
    with pytest.raises(CheckpointError, match=key):
        reference_forward(rewrite_shard_of(src, tmp_path / "missing", key, drop), ids, mask)

    def add(tensors, weight_map, shard):
        tensors["model.layers.2.mlp.extra.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
        weight_map["model.layers.2.mlp.extra.weight"] = shard
    with pytest.raises(CheckpointError, match=r"model.layers.2.mlp.extra.weight.*layer 2"):
        reference_forward(rewrite_shard_of(src, tmp_path / "stray", "model.layers.2.mlp.down_proj.weight", add),
                          ids, mask)


# ---- prompts and the CLI ---------------------------------------------------------------------------------------


def make_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on Python's docs, with fewer ids than the model's vocabulary."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:10]], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>") \
        .save_pretrained(directory)


@pytest.mark.megatron
def test_verify_cli_text_prompts_under_torchrun_and_exit_codes(converted, tmp_path):
    src, meg = converted["tiny-tied"]
    hf = Path(shutil.copytree(src, tmp_path / "hf"))
    make_tokenizer(hf, 400)  # the model has 500 ids
    # Under the user's own torchrun (TP=2): Megatron in the ranks, then the reference on rank 0 alone.
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "hetero_convert.cli", "verify", "--hf", str(hf), "--megatron", str(meg), "--tp", "2",
                          "--report", str(tmp_path / "r.json"), "--workdir", str(tmp_path / "w")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["ok"] and r["tp"] == 2 and r["prompts"].startswith("English text") and out.stdout.count("PASS") == 1
    assert r["metrics"]["megatron_fp64_max_rel_diff"] <= r["thresholds"]["max_rel_diff"]
    # real text, not random ids: decoding the first row gives back words of Python's documentation
    from transformers import AutoTokenizer

    ids, mask, _ = make_inputs(hf, 500, batch=2, seq_len=32)
    tok = AutoTokenizer.from_pretrained(str(hf), trust_remote_code=False)
    assert len(tok.decode(ids[0][mask[0].bool()]).split()) >= 5
    # An impossible bound makes the run (launching its own torchrun) fail with exit code 1.
    out = subprocess.run([sys.executable, "-m", "hetero_convert.cli", "verify", "--hf", str(hf), "--megatron",
                          str(meg), "--max-rel-diff", "0", "--random-tokens"], capture_output=True, text=True)
    assert out.returncode == 1 and "FAIL" in out.stdout and "random ids" in out.stdout
