"""`hetero-convert prune`: a smaller heterogeneous (DeciLM) model, chosen per layer by measurement.

    calibration.py the calibration text (default: a mix made from Python's standard library) and its windows
    parent.py      the parent, layer by layer
    candidates.py  the variants of a layer, the statistics they are fitted from, how each is initialised
    scoring.py     one sweep over the parent: every variant fitted, then swapped alone into the parent and
                   scored (KL to the parent, LM loss) on held-back calibration tokens
    fits.py        the fitted tensors of every variant, stored next to the scores
    search.py      costs, and the exact multiple-choice knapsack over the per-layer variants
    export.py      the chosen model as a DeciLM checkpoint (safetensors, config, remote code, tokenizer)
    progress.py    what the user sees while it runs

`prune()` runs them in that order; the benchmark and the tests use the pieces directly.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..plan import load_plan
from ..dtypes import SHORT as DTYPES
from ..errors import ConversionError, PruneError
from ..io.staging import PRUNE, check_output
from .calibration import default_texts, mixed_windows, tokenize_texts
from .candidates import Recipe, attention_options, ffn_options
from .export import REPORT_FILE, export_checkpoint, export_units
from .fits import FITS_DIR, FitStore
from .parent import ParentModel, source_config
from .progress import Progress
from .scoring import (
    SCORES_FILE,
    load_scores,
    recipe_json,
    save_scores,
    score_all,
    split_windows,
    sweep,
    work_plan,
)
from .search import (
    TARGETS,
    InfeasibleBudget,
    fixed_cost,
    layer_cost,
    model_cost,
    select,
    solve_mckp,
)

COMPUTE_DTYPES = {k: DTYPES[k] for k in ("fp32", "bf16")}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in COMPUTE_DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


@dataclass
class PruneOptions:
    calib_tokens: int = 16384  # calibration tokens in all: fit windows + held-back scoring windows
    score_tokens: int = 768  # of those, held back from the fits: the tokens every variant is scored on
    seq_len: int = 256
    batch_size: int = 4
    device: str = "cpu"
    # Dtype of the scoring forwards: None = bf16 on a GPU, and on a CPU with native bf16 arithmetic, else fp32.
    # The statistics pass runs in fp32 and accumulates in fp64 either way.
    compute_dtype: str | None = None
    ffn_widths: list[int] | None = None  # None: the format's widths, subsampled to max_ffn_widths
    max_ffn_widths: int = 8
    flops_context: int = 4096  # sequence length the attention term of --target-flops assumes
    score_key: str = "kl"  # "kl" or "lm_loss" (its increase over the parent)
    max_resident_bytes: int | None = None  # parent layers kept built on the device (default: half a GPU / 8 GiB)
    recipe: Recipe = field(default_factory=Recipe)
    keep_fits: bool = True  # leave OUT/prune_fits (the fitted tensors of every variant) for later --reuse-scores


def check_out_dir(out: Path, overwrite: bool, src: Path) -> None:
    """OUT must be new, empty, or a previous prune output (io/outputs.py says exactly what that may hold), and
    never the source or a folder around it; checked before any calibration work."""
    try:
        check_output(out, PRUNE, overwrite, sources=[src])
    except ConversionError as e:
        raise PruneError(str(e)) from None


def model_summary(plan, flops_context: int) -> dict:
    return {
        "params": plan.num_parameters(),
        "non_embedding_params": plan.num_parameters(include_embeddings=False),
        "kv_cache_bytes_per_token": model_cost(plan, "kv_cache"),
        "flops_per_token": model_cost(plan, "flops", flops_context),
    }


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware does bf16 arithmetic natively (GPUs; CPUs with AVX512-BF16 or AMX, where it is
    about twice as fast as fp32), else fp32 (emulated bf16 is slower than fp32)."""
    if device.type != "cpu":
        return torch.bfloat16
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if native else torch.float32


def smallest_fraction(plan, target: str, flops_context: int = 4096, ffn_widths=None, max_ffn_widths: int = 8) -> float:
    """The lowest fraction of the parent's cost any plan of the variant menu reaches (every layer at its
    cheapest variant): known before any scoring, so an unreachable target is refused up front."""
    total = model_cost(plan, target, flops_context)
    least = fixed_cost(plan, target)
    for layer in plan.layers:
        least += min(layer_cost(plan, type(layer)(layer.index, a, f), target, flops_context)
                     for a in attention_options(plan, layer) for f in ffn_options(plan, layer, ffn_widths, max_ffn_widths))
    return least / total if total else 0.0


def check_target(plan, target: str, fraction: float, options: PruneOptions) -> None:
    flag = f"--target-{target.replace('_', '-')}"
    if not 0 < fraction <= 1:
        raise PruneError(f"{flag} {fraction:g}: the target is a fraction of the parent, in (0, 1]")
    least = smallest_fraction(plan, target, options.flops_context, options.ffn_widths, options.max_ffn_widths)
    if fraction < least:
        raise PruneError(f"{flag} {fraction:g} is below what removing every layer reaches ({least:.4g} of the "
                         f"parent: what no layer choice changes)")


def calibration_windows(tokenizer, texts: dict[str, str], options: PruneOptions, progress: Progress):
    """(windows, domain of each window) of `texts` ({domain: text}), with a warning when they hold fewer
    tokens than --calib-tokens asks for."""
    ids, available, domains = mixed_windows(tokenize_texts(tokenizer, texts), options.calib_tokens, options.seq_len)
    if ids.numel() < options.calib_tokens:
        progress.warn(f"the calibration text has {available:,} tokens ({ids.shape[0]} windows of {options.seq_len}), "
                      f"fewer than --calib-tokens {options.calib_tokens:,}: using {ids.numel():,}")
    score = len(split_windows(ids.shape[0], options.score_tokens, options.seq_len, domains)[1])
    if ids.shape[0] - score < 1 or ids.shape[0] < 2:
        progress.warn("the calibration text is too short to hold scoring tokens back from the fits: the variants "
                      "are scored on the tokens they were fitted on")
    return ids, domains


def as_texts(calib_text) -> dict[str, str]:
    if calib_text is None:
        return default_texts()
    if isinstance(calib_text, str):
        return {"calib": calib_text}
    if isinstance(calib_text, dict):
        return dict(calib_text)
    return {f"calib-{k}": t for k, t in enumerate(calib_text)}


def build_report(parent: ParentModel, sel: dict, scores: dict, options: PruneOptions, reused: bool,
                 seconds: dict) -> dict:
    base, pruned = parent.plan, sel["plan"]
    before, after = model_summary(base, options.flops_context), model_summary(pruned, options.flops_context)
    layers = []
    for info, layer in zip(sel["layers"], pruned.layers):
        layers.append({**info, "params": base.layer_parameters(layer)["total"],
                       "kv_cache_bytes_per_token": layer_cost(base, layer, "kv_cache")})
    return {
        "source": str(parent.dir),
        "target": {"kind": sel["target"], "fraction": sel["fraction"], "budget": sel["budget"],
                   "parent": sel["parent_cost"], "chosen": sel["cost"]},
        "search": {"score": options.score_key, "predicted_summed_score": sel["score"], "exact": sel["exact"],
                   "cost_unit": sel["cost_unit"]},
        "parent": before,
        "pruned": after,
        "ratios": {k: after[k] / before[k] if before[k] else None for k in before},
        "scores_reused": reused,
        "calibration": scores.get("calibration"),
        "parent_lm_loss": scores.get("parent_lm_loss"),
        "options": {k: v for k, v in asdict(options).items() if k != "recipe"} | {"recipe": recipe_json(options.recipe)},
        # What the forwards of this run used (the option may be None = the device's default), and what the
        # scores were measured in (a reused file may come from another run).
        "compute_dtype": dtype_name(parent.dtype),
        "scores_compute_dtype": scores.get("compute_dtype"),
        "seconds": seconds,
        "layers": layers,
    }


def prune(src, out, calib_text=None, *, target: str, fraction: float, options: PruneOptions | None = None,
          calib_ids: torch.Tensor | None = None, reuse_scores: bool = False, scores_from: str | Path | None = None,
          megatron: str | Path | None = None, tp: int = 1, pp: int = 1, overwrite: bool = False,
          progress: Progress | None = None) -> dict:
    """Score (or reuse scores), search under the budget, export; return the report.

    calib_text: None (the default mix from Python's standard library), one text, a list of texts or
    {domain: text}; or calib_ids, ready [n, seq_len] token windows.
    """
    options = options or PruneOptions()
    progress = progress if progress is not None else Progress()
    src, out = Path(src), Path(out)
    if target not in TARGETS:
        raise PruneError(f"target must be one of {TARGETS}")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise PruneError("--device cuda: no CUDA device is available")
    if options.compute_dtype not in (None, *COMPUTE_DTYPES):
        raise PruneError(f"--compute-dtype must be one of {sorted(COMPUTE_DTYPES)}")
    check_out_dir(out, overwrite, src)
    check_target(load_plan(source_config(src)), target, fraction, options)  # before any work
    t0 = time.time()
    device = torch.device(options.device)
    parent = ParentModel(src, options.device, dtype=COMPUTE_DTYPES.get(options.compute_dtype) or
                         default_compute_dtype(device), max_resident_bytes=options.max_resident_bytes)

    def windows_now():
        if calib_ids is not None:
            return calib_ids, None
        from transformers import AutoTokenizer

        return calibration_windows(AutoTokenizer.from_pretrained(src), as_texts(calib_text), options, progress)

    reused = reuse_scores or scores_from is not None
    seconds = {}
    tmp_store = None
    if reused:
        scores_path = Path(scores_from) if scores_from else out
        scores = load_scores(scores_path)
        if scores["plan"] != json.loads(json.dumps(parent.plan.to_json())):
            raise PruneError("the saved scores were computed for a different model")
        store = FitStore((scores_path if scores_path.is_dir() else scores_path.parent) / FITS_DIR)
        if scores.get("compute_dtype", dtype_name(parent.dtype)) != dtype_name(parent.dtype):
            scores["compute_dtype_note"] = (f"scores were measured in {scores['compute_dtype']}; this run's dtype "
                                            f"({dtype_name(parent.dtype)}) is not used: the fits are reused")
        sel = _select(parent, scores, target, fraction, options)
        if not store.covers(parent.plan, sel["plan"]):
            # No (complete) fit store beside the scores: fit the chosen variants again, on this calibration.
            ids, domains = windows_now()
            if fingerprint_sha(ids) != scores["calibration"].get("calibration_sha256_16"):
                scores["calibration_note"] = "calibration differs from the one the scores were measured on"
            tmp_store = FitStore(tempfile.mkdtemp(prefix="prune-fits-"))
            wanted = {i: [l] for i, l in enumerate(sel["plan"].layers) if l != parent.plan.layers[i]}
            per_layer = [[{"layer": c} for c in wanted.get(d, [])] for d in range(parent.plan.num_layers)]
            n_score = len(split_windows(ids.shape[0], options.score_tokens, options.seq_len, domains)[1]) * ids.shape[1]
            units = work_plan(parent, ids.numel() - n_score, n_score, per_layer, options.recipe, score=False)
            progress.plan(sum(units[:max(wanted, default=0) + 1]) +
                          sum(export_units(parent.plan, i) for i in range(parent.plan.num_layers)))
            sweep(parent, ids, options.recipe, tmp_store, score_tokens=options.score_tokens,
                  batch_size=options.batch_size, score=False, wanted=wanted, domains=domains, progress=progress)
            store = tmp_store
        seconds["calibration"] = round(time.time() - t0, 1)
        seconds["scoring"] = 0.0
    else:
        ids, domains = windows_now()
        seconds["calibration"] = round(time.time() - t0, 1)
        out.mkdir(parents=True, exist_ok=True)
        store = FitStore(out / FITS_DIR)
        n_score = len(split_windows(ids.shape[0], options.score_tokens, options.seq_len, domains)[1]) * ids.shape[1]
        from .scoring import layer_variants

        per_layer = [layer_variants(parent, d, options.ffn_widths, options.max_ffn_widths)
                     for d in range(parent.plan.num_layers)]
        progress.plan(sum(work_plan(parent, ids.numel() - n_score, n_score, per_layer, options.recipe)) +
                      sum(export_units(parent.plan, i) for i in range(parent.plan.num_layers)))
        t1 = time.time()
        scores = score_all(parent, ids, options.recipe, store, score_tokens=options.score_tokens,
                           batch_size=options.batch_size, ffn_widths=options.ffn_widths,
                           max_ffn_widths=options.max_ffn_widths, domains=domains, progress=progress)
        if domains is not None:
            scores["calibration"]["domains"] = {d: domains.count(d) for d in dict.fromkeys(domains)}
        scores["compute_dtype"] = dtype_name(parent.dtype)
        store.write_meta({"calibration": scores["calibration"], "plan": scores["plan"],
                          "compute_dtype": scores["compute_dtype"]})
        save_scores(scores, out)  # saved before the search, so a failed search never loses them
        seconds["scoring"] = round(time.time() - t1, 1)
        sel = _select(parent, scores, target, fraction, options)
    if progress.total == 0:
        progress.plan(sum(export_units(parent.plan, i) for i in range(parent.plan.num_layers)))

    report = build_report(parent, sel, scores, options, reused, seconds)
    report["warnings"] = list(progress.warnings)
    if scores_from is not None and not (out / SCORES_FILE).exists():
        save_scores(scores, out)
    t2 = time.time()
    try:
        export_checkpoint(parent, store, sel["plan"], out, report, overwrite=True, progress=progress)
    finally:
        if tmp_store is not None:
            shutil.rmtree(tmp_store.dir, ignore_errors=True)
    if not options.keep_fits:
        shutil.rmtree(out / FITS_DIR, ignore_errors=True)
    report["seconds"]["export"] = round(time.time() - t2, 1)
    report["seconds"]["total"] = round(time.time() - t0, 1)
    if megatron is not None:
        from ..convert import hf_to_megatron

        summary = hf_to_megatron(out, megatron, tp=tp, pp=pp, overwrite=overwrite)
        report["megatron"] = {"path": str(megatron), "tp": tp, "pp": pp, "seconds": round(summary.seconds, 1)}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _select(parent, scores, target, fraction, options):
    try:
        return select(parent.plan, scores, target, fraction, options.flops_context, options.score_key)
    except InfeasibleBudget as e:
        raise PruneError(str(e)) from None


def fingerprint_sha(ids: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


__all__ = [
    "TARGETS",
    "FitStore",
    "InfeasibleBudget",
    "ParentModel",
    "Progress",
    "PruneError",
    "PruneOptions",
    "Recipe",
    "check_target",
    "export_checkpoint",
    "layer_cost",
    "model_cost",
    "prune",
    "score_all",
    "select",
    "solve_mckp",
    "sweep",
]
