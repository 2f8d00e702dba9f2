"""Write the chosen model as a DeciLM checkpoint, one layer at a time.

Each layer's tensors are made (parent tensors for kept parts, the fitted records of the scoring sweep
otherwise, see fits.py) and written to their own safetensors shard before the next layer is touched, so the
export holds at most one layer in memory. The config is the released DeciLM form (`plan.hf_config()`:
block_configs with every key, `ffn_mult` widths, `n_heads_in_group`), with the remote code next to it and
the tokenizer copied from the source.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..convert import staged_output, write_hf_metadata
from ..mappings import bind
from ..plan import LayerPlan, ModelPlan, load_plan
from .fits import FITS_DIR, FitStore, is_fitted
from .parent import ParentModel
from .scoring import SCORES_FILE

REPORT_FILE = "pruning_report.json"
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def needs_stats(parent_layer: LayerPlan, layer: LayerPlan) -> bool:
    return is_fitted(parent_layer, layer)


def export_units(plan: ModelPlan, i: int) -> int:
    """Progress units of writing layer i: its parameters x 64, about the time 64 tokens of forward take."""
    return 64 * plan.layer_parameters(plan.layers[i])["total"]


@torch.no_grad()
def export_checkpoint(parent: ParentModel, fits: FitStore | None, plan: ModelPlan, out_dir: str | Path,
                      report: dict | None = None, overwrite: bool = True, progress=None) -> Path:
    """Write `plan` (a per-layer choice over the parent's layers) to out_dir. `fits` is needed only when some
    layer has a fitted part; `report` is written as pruning_report.json; an existing prune_scores.json and
    fit store in out_dir are kept."""
    out_dir = Path(out_dir)
    plan = dataclasses.replace(plan, source_format="decilm")  # always written as DeciLM, with remote code
    dtype = parent.checkpoint_dtype
    expected = {k for m in bind(plan) for k in m.hf}
    written: dict[str, str] = {}
    old_scores = out_dir / SCORES_FILE
    carried_scores = old_scores.read_text() if old_scores.is_file() else None
    old_fits = out_dir / FITS_DIR
    with staged_output(out_dir, overwrite) as tmp:
        shards = [i for i, l in enumerate(plan.layers) if not l.is_dummy]
        total = len(shards) + 1
        names = [f"model-{k + 1:05d}-of-{total:05d}.safetensors" for k in range(total)]
        for k, i in enumerate(shards):
            base, layer = parent.plan.layers[i], plan.layers[i]
            if needs_stats(base, layer) and fits is None:
                raise ValueError(f"layer {i}: {layer.describe()} is fitted on calibration data; no fits given")
            store = fits if fits is not None else FitStore(tmp)  # holds nothing: kept and removed parts only
            tensors = store.layer_tensors(parent.plan, layer, parent.layer_tensors(i))
            named = {f"model.layers.{i}.{n}": t.to(dtype).contiguous() for n, t in tensors.items()}
            save_file(named, str(tmp / names[k]), metadata={"format": "pt"})
            written.update({n: names[k] for n in named})
            if progress is not None:
                progress.step(export_units(parent.plan, i), f"export: layer {i} written ({k + 1}/{total - 1})")
        globals_ = {"model.embed_tokens.weight": parent.embed, "model.norm.weight": parent.ckpt.read("model.norm.weight")}
        if not plan.tie_word_embeddings:
            globals_["lm_head.weight"] = parent.ckpt.read("lm_head.weight")
        save_file({n: t.to(dtype).contiguous() for n, t in globals_.items()}, str(tmp / names[-1]),
                  metadata={"format": "pt"})
        written.update({n: names[-1] for n in globals_})
        if set(written) != expected:  # the converter's own table of what a checkpoint of this plan holds
            raise AssertionError(f"exported keys differ from the plan: missing {sorted(expected - set(written))[:5]}, "
                                 f"extra {sorted(set(written) - expected)[:5]}")
        size = sum((tmp / n).stat().st_size for n in names)
        index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(written.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        tokenizer_from = parent.dir if any((parent.dir / f).is_file() for f in TOKENIZER_MARKERS) else None
        write_hf_metadata(tmp, plan, dtype, tokenizer_from)
        if (parent.dir / "generation_config.json").is_file():
            shutil.copy2(parent.dir / "generation_config.json", tmp / "generation_config.json")
        if carried_scores is not None:
            (tmp / SCORES_FILE).write_text(carried_scores)
        if old_fits.is_dir():  # moved, not copied: the store can be as large as the model
            old_fits.rename(tmp / FITS_DIR)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        # What every consumer will do first: parse the config we wrote and get back exactly this plan.
        reread = load_plan(tmp)
        if reread.layers != _normalised(plan).layers:
            raise AssertionError("the written config does not reproduce the chosen plan")
    return out_dir


def _normalised(plan: ModelPlan) -> ModelPlan:
    """The plan as a config round trip gives it back (ffn_mult filled in from the width)."""
    return load_plan(plan.hf_config())
