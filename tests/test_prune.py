"""`prune`: exact initialisations, exact search, and an output that loads everywhere it must."""

from __future__ import annotations

import json
import shutil
import random
from pathlib import Path

import pytest
import torch

from hetero_convert.fixtures import write_random_checkpoint
from hetero_convert.plan import (
    FFN,
    GQA,
    LINEAR,
    NONE,
    Attention,
    LayerPlan,
    ffn_mult_to_width,
    load_plan,
)
from hetero_convert.pruning import FitStore, Recipe, export_checkpoint, select
from hetero_convert.pruning.calibration import mixed_windows
from hetero_convert.pruning.candidates import (
    LeastSquares,
    collect_stats,
    default_ffn_widths,
    layer_tensors,
    merge_kv_heads,
    narrow_ffn,
    refit_downs,
    ridge_solve,
)
from hetero_convert.pruning.parent import ParentModel
from hetero_convert.pruning.scoring import score_all, split_windows
from hetero_convert.pruning.search import brute_force, layer_cost, model_cost, solve_mckp
from conftest import dtype_kwarg

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 64,
    "intermediate_size": 768, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512, "vocab_size": 300,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}


def calibration_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)[:12])


def make_tokenizer(directory: Path, text: str) -> None:
    """A byte-level BPE with at most TINY's 300 ids, so the model and its tokenizer agree."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>") \
        .save_pretrained(directory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random Llama whose output distribution is far from uniform (so KL scores mean something), with a
    tokenizer."""
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("tiny-llama")
    write_random_checkpoint(TINY, d, dtype=torch.float32)
    path = d / "model.safetensors"
    state = load_file(path)
    for k in state:
        if k.endswith(("embed_tokens.weight", "lm_head.weight")):
            state[k] *= 25.0
        elif k.endswith(("proj.weight",)):
            state[k] *= 4.0
    save_file(state, str(path), metadata={"format": "pt"})
    make_tokenizer(d, calibration_text())
    return d


def calib_ids(n: int = 8, seq: int = 32) -> torch.Tensor:
    return torch.randint(3, 300, (n, seq), generator=torch.Generator().manual_seed(0))


# ---- exact where it must be ---------------------------------------------------------------------------------------


def test_keeping_everything_is_the_parent_bit_for_bit(tiny, tmp_path):
    parent = ParentModel(tiny)
    tensors = parent.layer_tensors(1)
    kept = narrow_ffn(tensors, 768, None, Recipe())
    assert all(kept[k] is tensors[k] for k in kept)
    assert merge_kv_heads(tensors["self_attn.k_proj.weight"], 4, 2, 2) is tensors["self_attn.k_proj.weight"]
    # A search with the whole parent in budget keeps every layer whole ...
    store = FitStore(tmp_path / "fits")
    scores = score_all(parent, calib_ids(), Recipe(), store, score_tokens=64, batch_size=2)
    sel = select(parent.plan, scores, "params", 1.0)
    assert all(l["attention"] == "keep" and l["ffn"] == "keep" for l in sel["layers"])
    # ... and exporting it reproduces every tensor and every logit.
    out = export_checkpoint(parent, store, sel["plan"], tmp_path / "keep")
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for key, shard in index.items():
        with safe_open(str(out / shard), "pt") as f:
            assert torch.equal(f.get_tensor(key), parent.ckpt.read(key)), key
    from transformers import AutoModelForCausalLM

    from hetero_convert.hf import DeciLMConfig, DeciLMForCausalLM

    config = DeciLMConfig(**parent.plan.hf_config())
    ref = DeciLMForCausalLM.from_pretrained(tiny, config=config, **dtype_kwarg(torch.float32)).eval()
    got = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **dtype_kwarg(torch.float32)).eval()
    ids = calib_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)


def test_least_squares_recovers_a_linear_map():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 32, generator=g)
    ls = LeastSquares(32, 24, torch.float64, "cpu")
    for _ in range(4):
        x = torch.randn(500, 32, generator=g)
        ls.add(x, x @ w.T)
    assert torch.allclose(ls.solve(1e-10).float(), w, atol=1e-5)


def test_linear_replacement_fitted_on_a_linear_layer_recovers_it(tiny):
    """A layer whose attention *is* a linear map (replace_with_linear): the fitted replacement is that map."""
    parent = ParentModel(tiny)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 64, generator=g) * 0.1
    layer = LayerPlan(0, Attention(LINEAR), FFN(NONE))
    norm = 1 + 0.1 * torch.randn(64, generator=g)
    module = parent.build(layer, {"input_layernorm.weight": norm, "self_attn.linear_attn.weight": w})
    batches = [torch.randn(2, 32, 64, generator=g) for _ in range(4)]
    stats = collect_stats(module, batches, *parent.positional(32))
    fitted = layer_tensors(parent.plan, parent.plan.layers[0], LayerPlan(0, Attention(LINEAR), parent.plan.layers[0].ffn),
                           {**parent.layer_tensors(0), "input_layernorm.weight": norm}, stats, Recipe(ridge=1e-10))
    assert torch.allclose(fitted["self_attn.linear_attn.weight"], w, atol=1e-4)


def test_kv_merge_of_identical_heads_reproduces_the_outputs(tiny):
    parent = ParentModel(tiny)
    tensors = dict(parent.layer_tensors(0))
    for name in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        w = tensors[name].clone()
        w[16:32] = w[0:16]  # head_dim 16: KV head 1 := KV head 0
        tensors[name] = w
    base = parent.plan.layers[0]
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(3))
    full = parent.build(base, tensors)
    stats = collect_stats(full, [x], *parent.positional(32))
    for recipe in (Recipe(kv_merge="mean"), Recipe(kv_merge="importance")):
        merged_plan = LayerPlan(0, Attention(GQA, 1), base.ffn)
        merged = layer_tensors(parent.plan, base, merged_plan, tensors, stats, recipe)
        assert merged["self_attn.k_proj.weight"].shape == (16, 64)
        with torch.no_grad():
            torch.testing.assert_close(parent.run(parent.build(merged_plan, merged), x), parent.run(full, x),
                                       atol=1e-6, rtol=1e-6)
    # Equal weights on identical heads: the merged rows are the head itself, exactly.
    merged = merge_kv_heads(tensors["self_attn.k_proj.weight"], 4, 2, 1)
    assert torch.equal(merged, tensors["self_attn.k_proj.weight"][:16])


def test_nested_refit_equals_a_direct_ridge_solve_per_width():
    """All widths share one Cholesky factor per ridge (their kept sets are nested); each width's down_proj
    must still be exactly that width's own ridge solution."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(600, 48, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 48, dtype=torch.float64)
    from hetero_convert.pruning.candidates import LayerStats

    stats = LayerStats(act_sq=a.pow(2).sum(0), act_gram=a.T @ a)
    down = torch.randn(16, 48, generator=g, dtype=torch.float64)
    order = torch.argsort(stats.act_sq * down.pow(2).sum(0), descending=True)
    recipe = Recipe(refit_ridge=0.3, cv=False)
    fitted = refit_downs(stats, down, order, [8, 20, 33], recipe)
    for w, (got, info) in fitted.items():
        idx = order[:w]
        g_ss = stats.act_gram[idx][:, idx]
        lam = 0.3 * stats.act_gram[order[:33]][:, order[:33]].diagonal().mean()
        want = torch.linalg.solve(g_ss + lam * torch.eye(w, dtype=torch.float64),
                                  stats.act_gram[idx] @ down.T + lam * down.T[idx]).T
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        assert info["ridge"] == 0.3
    assert ridge_solve(stats.act_gram, stats.act_gram @ down.T, 0.0).shape == (48, 16)


def test_cross_validation_prefers_no_refit_when_the_fit_tokens_mislead():
    """A refit learned on tokens whose channels are correlated in a way held-out tokens are not: the
    held-out error picks the parent's own columns (ridge None) over the refit."""
    from hetero_convert.pruning.candidates import LayerStats

    g = torch.Generator().manual_seed(5)
    base = torch.randn(400, 12, generator=g, dtype=torch.float64)
    fit = torch.cat([base, base[:, :4] * 3], dim=1)  # channels 12..15 are copies of 0..3 on the fit tokens
    held = torch.randn(300, 16, generator=g, dtype=torch.float64)  # ... and independent on held-out tokens
    down = torch.randn(8, 16, generator=g, dtype=torch.float64)
    stats = LayerStats(act_sq=torch.ones(16, dtype=torch.float64), act_gram=fit.T @ fit)
    heldout = LayerStats(samples={"acts": held, "ffn_y": held @ down.T})
    order = torch.arange(16)
    (down_cv, info), = refit_downs(stats, down, order, [12], Recipe(), heldout).values()
    assert info["ridge"] is None and torch.equal(down_cv, down[:, :12])
    # Without cross-validation the refit happily moves the dropped channels' weight onto their fit-time copies.
    (down_fit, _), = refit_downs(stats, down, order, [12], Recipe(cv=False)).values()
    assert not torch.allclose(down_fit, down[:, :12], atol=1e-2)


def test_calibration_mix_takes_an_equal_share_of_each_domain_interleaved():
    texts = {"a": torch.arange(0, 1000), "b": torch.arange(10_000, 10_300), "c": torch.arange(20_000, 21_000)}
    ids, available, labels = mixed_windows(texts, 1200, 50)
    assert available == 2300 and ids.shape == (24, 50)
    # b has only 6 windows; its shortfall goes to the others
    assert [labels.count(k) for k in "abc"] == [9, 6, 9]
    domain = (ids[:, 0] // 10_000).tolist()
    assert domain[:3] == [0, 1, 2] and [" abc"[1 + d] for d in domain] == labels
    from hetero_convert.pruning.calibration import default_texts

    mix = default_texts()  # made from this interpreter's docs and docstrings: English prose, no source code
    assert set(mix) == {"python-docs", "docstrings"} and min(len(t) for t in mix.values()) > 100_000
    fit, score = split_windows(24, 200, 50, labels)
    assert not set(fit) & set(score) and sorted(fit + score) == list(range(24)) and len(score) == 4
    assert {domain[j] for j in score} == {0, 1, 2}  # the held-back windows see every domain


# ---- search ------------------------------------------------------------------------------------------------------


def test_knapsack_is_the_brute_force_optimum():
    rnd = random.Random(0)
    for _ in range(300):
        groups = rnd.randint(1, 5)
        costs = [[rnd.randint(0, 12) for _ in range(rnd.randint(1, 4))] for _ in range(groups)]
        scores = [[round(rnd.uniform(-1, 3), 3) for _ in g] for g in costs]
        budget = rnd.randint(0, 40)
        ref = brute_force(costs, scores, budget)
        if ref is None:
            with pytest.raises(ValueError):
                solve_mckp(costs, scores, budget)
            continue
        sol = solve_mckp(costs, scores, budget)
        assert sol.exact and sol.cost <= budget
        assert sol.score == pytest.approx(ref[0], abs=1e-9)
        assert sum(scores[g][j] for g, j in enumerate(sol.choice)) == pytest.approx(ref[0], abs=1e-9)


def test_knapsack_with_a_common_divisor_is_exact_and_coarse_costs_stay_feasible():
    rnd = random.Random(1)
    for _ in range(50):
        costs = [[rnd.randint(1, 30) * 576 for _ in range(4)] for _ in range(4)]
        scores = [[rnd.random() for _ in g] for g in costs]
        budget = rnd.randint(40, 100) * 576 + rnd.randint(0, 575)
        ref = brute_force(costs, scores, budget)
        if ref is None:
            continue
        sol = solve_mckp(costs, scores, budget)
        assert sol.exact and sol.unit % 576 == 0 and sol.score == pytest.approx(ref[0])
        try:  # forced rounding of costs (up): never over budget, at worst nothing fits any more
            coarse = solve_mckp(costs, scores, budget, max_bins=20)
        except ValueError:
            continue
        assert not coarse.exact and coarse.cost <= budget and coarse.score >= ref[0] - 1e-12


def test_ffn_widths_are_expressible():
    assert default_ffn_widths(1536, 576) == [256, 512, 768, 1024, 1280]
    wide = default_ffn_widths(28672, 8192)
    assert 1 < len(wide) <= 8
    from hetero_convert.plan import width_to_ffn_mult

    for w in wide:
        mult = width_to_ffn_mult(w, 8192)
        assert w % 256 == 0 and w < 28672 and ffn_mult_to_width(mult, 8192) == w


def test_costs():
    plan = load_plan(TINY)
    layer = plan.layers[0]
    assert layer_cost(plan, layer, "params") == plan.layer_parameters(layer)["total"]
    assert model_cost(plan, "kv_cache") == plan.kv_cache_bytes_per_token(2)
    removed = LayerPlan(0, Attention(NONE), FFN(NONE))
    assert [layer_cost(plan, removed, t) for t in ("params", "kv_cache", "flops")] == [0, 0, 0]
    flops = layer_cost(plan, layer, "flops", flops_context=100)
    assert flops == 2 * (64 * 64 * 2 + 2 * 64 * 32) + 2 * 64 * 100 + 2 * 3 * 64 * 768


# ---- end to end --------------------------------------------------------------------------------------------------


@pytest.mark.megatron
def test_prune_cli_output_loads_converts_and_reuses_scores(tiny, tmp_path):
    from typer.testing import CliRunner

    from hetero_convert.cli import app

    calib = tmp_path / "calib.txt"
    calib.write_text(calibration_text())
    out, meg = tmp_path / "pruned", tmp_path / "pruned-megatron"
    common = ["--calib", str(calib), "--calib-tokens", "1024", "--score-tokens", "256", "--seq-len", "64",
              "--batch-size", "2"]
    r = CliRunner().invoke(app, ["prune", str(tiny), str(out), *common, "--target-params", "0.6",
                                 "--megatron", str(meg), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "pruning_report.json").read_text())
    parent, pruned = load_plan(tiny), load_plan(out)  # the foundation's config validation
    assert report["pruned"]["non_embedding_params"] <= 0.6 * parent.num_parameters(include_embeddings=False)
    assert pruned.num_parameters(include_embeddings=False) == report["pruned"]["non_embedding_params"]
    assert report["search"]["exact"] and not report["scores_reused"]
    assert [l["describe"] for l in report["layers"]] == [l.describe() for l in pruned.layers]
    # The variants were scored on windows held back from their fits.
    scores = json.loads((out / "prune_scores.json").read_text())
    assert scores["calibration"]["score_sequences"] == 4 and scores["calibration"]["fit_sequences"] == 12
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] and config["intermediate_size"] is None and config["num_key_value_heads"] is None
    for block in config["block_configs"]:
        a, f = block["attention"], block["ffn"]
        if not a["no_op"] and not a["replace_with_linear"]:
            assert 4 % a["n_heads_in_group"] == 0
        if not f["no_op"] and not f["replace_with_linear"]:
            assert "intermediate_size" not in f and ffn_mult_to_width(f["ffn_mult"], 64) % 256 == 0
    assert (out / "tokenizer.json").is_file() and (out / "prune_scores.json").is_file()
    assert (meg / "latest_checkpointed_iteration.txt").is_file()
    # The pruned model, converted by --megatron, passes verify: megatron-core's GPTModel matches our HF model.
    from hetero_convert.parity import verify

    parity = verify(out, meg, device="cpu", dtype="fp32", batch=2, seq_len=24, workdir=tmp_path / "verify")
    assert parity.ok, (parity.failures, parity.metrics)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **dtype_kwarg(torch.float32)).eval()
    ids = AutoTokenizer.from_pretrained(out)("def f(x): return x", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 300) and torch.isfinite(logits).all()

    # Same scores, same budget, no calibration text at all: the stored fits rebuild the very same model.
    shards = {p.name: p.read_bytes() for p in out.glob("model-*.safetensors")}
    r = CliRunner().invoke(app, ["prune", str(tiny), str(out), "--target-params", "0.6", "--reuse-scores", "-q"])
    assert r.exit_code == 0, r.output
    assert {p.name: p.read_bytes() for p in out.glob("model-*.safetensors")} == shards

    # Same scores, another budget: no scoring, the KV cache halved.
    r = CliRunner().invoke(app, ["prune", str(tiny), str(out), *common, "--target-kv-cache", "0.5",
                                 "--reuse-scores"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["scores_reused"] and report["seconds"]["scoring"] == 0.0
    assert load_plan(out).kv_cache_bytes_per_token(2) <= 0.5 * parent.kv_cache_bytes_per_token(2)


@pytest.mark.parametrize("flag,value,message", [("--target-params", "1.5", "in (0, 1]"),
                                                ("--target-params", "0", "in (0, 1]"),
                                                ("--target-flops", "0.01", "below what removing every layer")])
def test_infeasible_targets_are_refused_before_any_work(tiny, tmp_path, flag, value, message):
    from typer.testing import CliRunner

    from hetero_convert.cli import app

    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["prune", str(tiny), str(out), flag, value])
    assert r.exit_code != 0 and message in r.output, r.output
    assert not out.exists()  # nothing scored, nothing written


def test_progress_lines_in_a_log_and_a_short_calibration_text_is_named(tiny, tmp_path):
    """Not a terminal (CliRunner): one line per layer with elapsed and remaining time; --quiet: none. A
    calibration text shorter than --calib-tokens is a warning that names both numbers."""
    from typer.testing import CliRunner

    from hetero_convert.cli import app

    calib = tmp_path / "calib.txt"
    calib.write_text(calibration_text()[:6000])
    args = ["--calib", str(calib), "--calib-tokens", "100000", "--score-tokens", "128", "--seq-len", "64",
            "--target-params", "0.7"]
    r = CliRunner().invoke(app, ["prune", str(tiny), str(tmp_path / "a"), *args])
    assert r.exit_code == 0, r.output
    lines = [l for l in r.output.splitlines() if l.startswith("[prune")]
    layer_lines = [l for l in lines if "variants fitted and scored" in l]
    assert [l.split("] ")[1].split(":")[0] for l in layer_lines] == ["layer 1/3", "layer 2/3", "layer 3/3"]
    assert all("elapsed" in l for l in layer_lines) and "left" in layer_lines[0]
    warning = next(l for l in lines if "warning" in l)
    report = json.loads((tmp_path / "a" / "pruning_report.json").read_text())
    used = report["calibration"]["sequences"] * 64
    assert "100,000" in warning and f"using {used:,}" in warning and report["warnings"]
    r = CliRunner().invoke(app, ["prune", str(tiny), str(tmp_path / "b"), *args, "--quiet", "--json"])
    assert r.exit_code == 0 and not [l for l in r.output.splitlines() if l.startswith("[prune")]
    assert json.loads(r.output)["warnings"] == report["warnings"]


def test_prune_refuses_a_foreign_output_directory(tiny, tmp_path):
    from hetero_convert.pruning import PruneError, prune

    (tmp_path / "important.txt").write_text("keep me")
    with pytest.raises(PruneError, match="--overwrite"):
        prune(tiny, tmp_path, calib_ids=calib_ids(), target="params", fraction=0.5)
    with pytest.raises(PruneError, match="--overwrite refused: it holds none of prune_scores.json"):
        prune(tiny, tmp_path, calib_ids=calib_ids(), target="params", fraction=0.5, overwrite=True)
    assert (tmp_path / "important.txt").read_text() == "keep me"
    # A HF checkpoint that no prune run wrote is not rewritten in place (prune's reruns are): --overwrite needed,
    # and even then refused, since it is not a prune output.
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    for overwrite in (False, True):
        with pytest.raises(PruneError, match="so it is not a prune output"):
            prune(tiny, other, calib_ids=calib_ids(), target="params", fraction=0.5, overwrite=overwrite)
    with pytest.raises(PruneError, match="it is the source"):
        prune(tiny, tiny, calib_ids=calib_ids(), target="params", fraction=0.5, overwrite=True)


def test_compute_dtype_is_what_the_scores_are_measured_in(tiny, tmp_path):
    """--compute-dtype reaches the scoring forwards (bf16 rounds the KL scores differently from fp32), the
    report records it, and an unknown value is refused before any work."""
    from hetero_convert.pruning import PruneError, PruneOptions, prune

    kl = {}
    for dt in ("fp32", "bf16"):
        opts = PruneOptions(calib_tokens=256, score_tokens=64, seq_len=32, compute_dtype=dt)
        report = prune(tiny, tmp_path / dt, calib_ids=calib_ids(), target="params", fraction=0.7, options=opts)
        assert report["options"]["compute_dtype"] == dt and report["compute_dtype"] == dt
        assert json.loads((tmp_path / dt / "prune_scores.json").read_text())["compute_dtype"] == dt
        scores = json.loads((tmp_path / dt / "prune_scores.json").read_text())
        kl[dt] = [v["kl"] for layer in scores["layers"] for v in layer["variants"]]
    assert len(kl["fp32"]) == len(kl["bf16"]) and kl["fp32"] != kl["bf16"]
    close = [abs(a - b) <= 0.1 * max(a, 1e-3) for a, b in zip(kl["fp32"], kl["bf16"])]
    assert sum(close) >= 0.8 * len(close)  # the same measurement, at a coarser precision
    # Reusing bf16 scores in an fp32 run is allowed, and the report says so.
    report = prune(tiny, tmp_path / "reuse", calib_ids=calib_ids(), target="params", fraction=0.7,
                   scores_from=tmp_path / "bf16", options=PruneOptions(calib_tokens=256, score_tokens=64, seq_len=32,
                                                                       compute_dtype="fp32"))
    assert report["compute_dtype"] == "fp32" and report["scores_compute_dtype"] == "bf16"
    with pytest.raises(PruneError, match="--compute-dtype must be one of"):
        prune(tiny, tmp_path / "x", calib_ids=calib_ids(), target="params", fraction=0.7,
              options=PruneOptions(compute_dtype="fp8"))
