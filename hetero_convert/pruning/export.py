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
from pathlib import Path

import torch

from ..io.hf_checkpoint import ShardedWriter, copy_tokenizer, has_tokenizer, write_config, write_generation_config
from ..io.staging import PRUNE, Staging
from ..plan import LayerPlan, ModelPlan, load_plan
from .fits import FITS_DIR, FitStore, is_fitted
from .parent import ParentModel
from .scoring import SCORES_FILE

REPORT_FILE = "pruning_report.json"


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
    old_scores = out_dir / SCORES_FILE
    carried_scores = old_scores.read_text() if old_scores.is_file() else None
    old_fits = out_dir / FITS_DIR
    with Staging(out_dir, overwrite, kind=PRUNE, sources=[parent.dir]) as stage:
        tmp = stage.begin()
        # One shard per layer that has tensors, then the embedding, final norm and output layer: the export
        # holds one layer in memory, and every shard's layout is known from the plan before it is written.
        by_layer = [[(k, dtype, s) for k, s in plan.layer_hf_tensors(l).items()] for l in plan.layers if not l.is_dummy]
        shards = [u for u in by_layer if u] + [[(k, dtype, s) for k, s in plan.global_hf_tensors().items()]]
        writer = ShardedWriter(tmp, shards)
        try:
            layers = [i for i, l in enumerate(plan.layers) if not l.is_dummy]
            total = len(layers) + 1
            for k, i in enumerate(layers):
                base, layer = parent.plan.layers[i], plan.layers[i]
                if needs_stats(base, layer) and fits is None:
                    raise ValueError(f"layer {i}: {layer.describe()} is fitted on calibration data; no fits given")
                store = fits if fits is not None else FitStore(tmp)  # holds nothing: kept and removed parts only
                for n, t in store.layer_tensors(parent.plan, layer, parent.layer_tensors(i)).items():
                    writer.write(f"model.layers.{i}.{n}", t.to(dtype).contiguous())
                if progress is not None:
                    progress.step(export_units(parent.plan, i), f"export: layer {i} written ({k + 1}/{total - 1})")
            writer.write("model.embed_tokens.weight", parent.embed.to(dtype).contiguous())
            writer.write("model.norm.weight", parent.ckpt.read("model.norm.weight").to(dtype))
            if not plan.tie_word_embeddings:
                writer.write("lm_head.weight", parent.ckpt.read("lm_head.weight").to(dtype))
            writer.close()  # fails unless every tensor the plan implies was written: nothing missing or extra
        except BaseException:
            writer.abort()
            raise
        writer.write_index()
        tokenizer_from = parent.dir if has_tokenizer(parent.dir) else None
        parent_config = parent.dir / "config.json"
        write_config(tmp, plan, dtype, json.loads(parent_config.read_text()) if parent_config.is_file() else None)
        write_generation_config(tmp, plan, parent.dir / "generation_config.json")
        if tokenizer_from is not None:
            copy_tokenizer(tokenizer_from, tmp)
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
        stage.commit()
    return out_dir


def _normalised(plan: ModelPlan) -> ModelPlan:
    """The plan as a config round trip gives it back (ffn_mult filled in from the width)."""
    return load_plan(plan.hf_config())
