"""The fitted tensors of every scored variant, one safetensors file per layer, next to prune_scores.json.

A record holds only what is not the parent's own: merged k/v projections, a linear replacement's weight, a
narrower FFN's kept channel indices and refitted down_proj. Export (and a later `--reuse-scores` run under
another budget) builds the chosen layers from the parent's tensors and these records, so it needs neither the
calibration text nor another pass over the parent.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..plan import LayerPlan, ModelPlan
from .candidates import attention_name, ffn_name, part_tensors

FITS_DIR = "prune_fits"
FITS_META = "fits.json"


class FitStore:
    """Records keyed "<part>.<variant>.<tensor>" (e.g. "ffn.w512.keep"), one file per layer."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def path(self, i: int) -> Path:
        return self.dir / f"layer-{i:05d}.safetensors"

    def write_layer(self, i: int, records: dict[tuple[str, str], dict]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        flat = {f"{part}.{name}.{k}": v.cpu().contiguous() for (part, name), rec in records.items()
                for k, v in rec.items()}
        tmp = self.path(i).with_suffix(".tmp")
        save_file(flat, str(tmp), metadata={"format": "pt"})
        tmp.replace(self.path(i))

    def write_meta(self, meta: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / FITS_META).write_text(json.dumps(meta, indent=1) + "\n")

    def meta(self) -> dict | None:
        p = self.dir / FITS_META
        return json.loads(p.read_text()) if p.is_file() else None

    def record(self, i: int, part: str, name: str) -> dict | None:
        """The record of one part variant; {} for a variant that needs none; None when it is not stored."""
        if name in ("keep", "none", "removed"):
            return {}
        if not self.path(i).is_file():
            return None
        prefix = f"{part}.{name}."
        with safe_open(str(self.path(i)), "pt") as f:
            keys = [k for k in f.keys() if k.startswith(prefix)]  # noqa: SIM118 (safe_open has no __iter__)
            if not keys:
                return None
            return {k[len(prefix):]: f.get_tensor(k) for k in keys}

    def covers(self, plan: ModelPlan, chosen: ModelPlan) -> bool:
        return all(self.layer_records(plan, chosen.layers[i]) is not None for i in range(plan.num_layers))

    def layer_records(self, plan: ModelPlan, choice: LayerPlan) -> dict | None:
        base = plan.layers[choice.index]
        out = {}
        for part, name in (("attention", attention_name(choice.attention, base.attention)),
                           ("ffn", ffn_name(choice.ffn, base.ffn))):
            rec = self.record(choice.index, part, name)
            if rec is None:
                return None
            out[part] = rec
        return out

    def layer_tensors(self, plan: ModelPlan, choice: LayerPlan, parent_tensors: dict) -> dict:
        """All layer-local tensors of `choice`, from the parent's tensors and the stored records."""
        records = self.layer_records(plan, choice)
        if records is None:
            raise ValueError(f"layer {choice.index}: no fitted tensors stored for {choice.describe()} in {self.dir}")
        base = plan.layers[choice.index]
        out = part_tensors(base, "attention", choice.attention, parent_tensors, records["attention"])
        out.update(part_tensors(base, "ffn", choice.ffn, parent_tensors, records["ffn"]))
        return out


def is_fitted(base: LayerPlan, choice: LayerPlan) -> bool:
    return any(n not in ("keep", "none") for n in (attention_name(choice.attention, base.attention),
                                                   ffn_name(choice.ffn, base.ffn)))


def cast_record(record: dict, dtype: torch.dtype) -> dict:
    return {k: v if not v.is_floating_point() else v.to(dtype) for k, v in record.items()}
