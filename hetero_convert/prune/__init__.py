"""`hetero-convert prune`: a smaller heterogeneous (DeciLM) model, chosen per layer by measurement.

    parent.py      the parent, layer by layer; one calibration pass caching every layer's input
    candidates.py  the variants of a layer and how each is initialised from the parent (no training)
    scoring.py     each variant swapped alone into the parent: KL to the parent and LM loss
    search.py      costs, and the exact multiple-choice knapsack over the per-layer variants
    export.py      the chosen model as a DeciLM checkpoint (safetensors, config, remote code, tokenizer)

`prune()` runs them in that order; the benchmark and the tests use the pieces directly.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..dtypes import SHORT as DTYPES
from ..errors import PruneError
from .candidates import Recipe
from .export import REPORT_FILE, export_checkpoint
from .parent import Calibration, ParentModel, calibrate, calibration_ids
from .scoring import SCORES_FILE, load_scores, save_scores, score_all
from .search import TARGETS, InfeasibleBudget, layer_cost, model_cost, select, solve_mckp

# What a previous prune run leaves in OUT; anything else there needs --overwrite.
OWN_FILES = {SCORES_FILE, REPORT_FILE}


COMPUTE_DTYPES = {k: DTYPES[k] for k in ("fp32", "bf16")}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in COMPUTE_DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


@dataclass
class PruneOptions:
    calib_tokens: int = 16384  # tokens the statistics (least squares, importances) are measured on
    score_tokens: int = 4096  # of those, tokens every variant is scored on
    seq_len: int = 256
    batch_size: int = 4
    device: str = "cpu"
    # Dtype of the scoring forwards: None = fp32 on CPU, bf16 on a GPU. Statistics accumulate in fp64 either way.
    compute_dtype: str | None = None
    ffn_widths: list[int] | None = None  # None: the format's widths, subsampled to max_ffn_widths
    max_ffn_widths: int = 8
    flops_context: int = 4096  # sequence length the attention term of --target-flops assumes
    score_key: str = "kl"  # "kl" or "lm_loss" (its increase over the parent)
    max_resident_bytes: int | None = None  # parent layers kept built on the device (default: half a GPU / 8 GiB)
    recipe: Recipe = field(default_factory=Recipe)


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PruneError(f"{out} exists and is not a directory")
    if out.is_dir() and not overwrite:
        foreign = [p.name for p in out.iterdir() if p.name not in OWN_FILES]
        if foreign and not (out / REPORT_FILE).is_file():
            raise PruneError(f"{out} holds other files ({', '.join(sorted(foreign)[:4])}); use --overwrite")


def model_summary(plan, flops_context: int) -> dict:
    return {
        "params": plan.num_parameters(),
        "non_embedding_params": plan.num_parameters(include_embeddings=False),
        "kv_cache_bytes_per_token": model_cost(plan, "kv_cache"),
        "flops_per_token": model_cost(plan, "flops", flops_context),
    }


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
        "options": {k: v for k, v in asdict(options).items() if k != "recipe"} | {"recipe": asdict(options.recipe)},
        # What the forwards of this run used (the option may be None = the device's default), and what the
        # scores were measured in (a reused file may come from another run).
        "compute_dtype": dtype_name(parent.dtype),
        "scores_compute_dtype": scores.get("compute_dtype"),
        "seconds": seconds,
        "layers": layers,
    }


def prune(src, out, calib_text: str | None = None, *, target: str, fraction: float,
          options: PruneOptions | None = None, calib_ids: torch.Tensor | None = None, reuse_scores: bool = False,
          scores_from: str | Path | None = None, megatron: str | Path | None = None, tp: int = 1, pp: int = 1,
          overwrite: bool = False, progress=None) -> dict:
    """Score (or reuse scores), search under the budget, export; return the report."""
    options = options or PruneOptions()
    src, out = Path(src), Path(out)
    if target not in TARGETS:
        raise PruneError(f"target must be one of {TARGETS}")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise PruneError("--device cuda: no CUDA device is available")
    check_out_dir(out, overwrite)
    t0 = time.time()
    if options.compute_dtype not in (None, *COMPUTE_DTYPES):
        raise PruneError(f"--compute-dtype must be one of {sorted(COMPUTE_DTYPES)}")
    parent = ParentModel(src, options.device, dtype=COMPUTE_DTYPES.get(options.compute_dtype),
                         max_resident_bytes=options.max_resident_bytes)
    if calib_ids is None:
        if calib_text is None:
            raise PruneError("calibration text or token ids are required")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src)
        calib_ids = calibration_ids(tokenizer, calib_text, options.calib_tokens, options.seq_len)
    calib = calibrate(parent, calib_ids, options.score_tokens // options.seq_len, options.batch_size, progress)
    t1 = time.time()

    reused = reuse_scores or scores_from is not None
    if reused:
        scores = load_scores(Path(scores_from) if scores_from else out)
        if scores["plan"] != json.loads(json.dumps(parent.plan.to_json())):
            raise PruneError("the saved scores were computed for a different model")
        if scores["calibration"] != calib.fingerprint():
            # Scores stay meaningful, but fitted variants are rebuilt from this calibration, not the scored one.
            scores["calibration_note"] = "calibration differs from the one the scores were measured on"
        if scores.get("compute_dtype", dtype_name(parent.dtype)) != dtype_name(parent.dtype):
            scores["compute_dtype_note"] = (f"scores were measured in {scores['compute_dtype']}; this run fits the "
                                            f"chosen variants in {dtype_name(parent.dtype)}")
    else:
        scores = score_all(parent, calib, options.recipe, options.ffn_widths, options.max_ffn_widths, progress)
        scores["compute_dtype"] = dtype_name(parent.dtype)
        out.mkdir(parents=True, exist_ok=True)
        save_scores(scores, out)  # saved before the search, so a failed search never loses them
    t2 = time.time()

    try:
        sel = select(parent.plan, scores, target, fraction, options.flops_context, options.score_key)
    except InfeasibleBudget as e:
        raise PruneError(str(e)) from None
    seconds = {"calibration": round(t1 - t0, 1), "scoring": round(t2 - t1, 1) if not reused else 0.0}
    report = build_report(parent, sel, scores, options, reused, seconds)
    if scores_from is not None and not (out / SCORES_FILE).exists():
        save_scores(scores, out)
    export_checkpoint(parent, calib, sel["plan"], out, options.recipe, report, overwrite=True, progress=progress)
    report["seconds"]["total"] = round(time.time() - t0, 1)
    if megatron is not None:
        from ..convert import hf_to_megatron

        summary = hf_to_megatron(out, megatron, tp=tp, pp=pp, overwrite=overwrite)
        report["megatron"] = {"path": str(megatron), "tp": tp, "pp": pp, "seconds": round(summary.seconds, 1)}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report


__all__ = ["Calibration", "InfeasibleBudget", "ParentModel", "PruneError", "PruneOptions", "Recipe", "TARGETS",
           "calibrate", "export_checkpoint", "layer_cost", "model_cost", "prune", "score_all", "select",
           "solve_mckp"]
