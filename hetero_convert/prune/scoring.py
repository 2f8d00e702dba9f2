"""Score every layer variant by swapping it alone into the parent.

For layer i the variants are run on the parent's cached input of layer i, then through the parent's layers
i+1..N-1 and head, and compared with the parent's cached output distribution:

    kl       = mean over tokens of KL(parent || model with the variant), in nats
    lm_loss  = the variant-model's next-token cross-entropy on the calibration text

The variants of one layer travel together, concatenated along the batch, so each later parent layer is
fetched once per scored layer whatever the number of variants and batches. Scores go to `prune_scores.json`, which a
later run can search again under another budget (`--reuse-scores`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..plan import Attention, FFN, LayerPlan, NONE
from .candidates import (Recipe, attention_name, attention_options, collect_stats, ffn_name, ffn_options,
                         layer_tensors)
from .parent import Calibration, ParentModel

SCORES_FILE = "prune_scores.json"
SCORES_VERSION = 1


def layer_variants(parent: ParentModel, i: int, ffn_widths=None, max_ffn_widths: int = 8) -> list[dict]:
    """The single-swap variants of layer i: each attention option with the parent FFN, each FFN option with
    the parent attention, and the whole layer removed. "keep" is not scored (its score is 0 by definition)."""
    plan, base = parent.plan, parent.plan.layers[i]
    out = []
    for a in attention_options(plan, base)[1:]:
        if a.kind == NONE and base.ffn.kind == NONE:
            continue  # that is the "layer removed" variant below
        out.append({"part": "attention", "name": attention_name(a, base.attention),
                    "layer": LayerPlan(i, a, base.ffn)})
    for f in ffn_options(plan, base, ffn_widths, max_ffn_widths)[1:]:
        if f.kind == NONE and base.attention.kind == NONE:
            continue
        out.append({"part": "ffn", "name": ffn_name(f, base.ffn), "layer": LayerPlan(i, base.attention, f)})
    if not base.is_dummy:
        out.append({"part": "layer", "name": "removed", "layer": LayerPlan(i, Attention(NONE), FFN(NONE))})
    return out


@torch.no_grad()
def compare(logits: torch.Tensor, probs: torch.Tensor, plogp: torch.Tensor, ids: torch.Tensor):
    """(summed KL, summed NLL, KL tokens, NLL tokens) of a batch of logits [B, S, V] against the parent.

    KL(p || q) = sum p log p - sum p z + logsumexp(z) * sum p, with z the logits: the parent's part is cached,
    and the rest is one dot product and one logsumexp per token (no [S, V] log-softmax temporaries).
    """
    b, s, v = logits.shape
    z = logits.reshape(b * s, v)
    p = probs.to(z.device).reshape(b * s, v)
    lse = torch.logsumexp(z, dim=-1).double()
    pz = torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).reshape(-1).double()
    kl = plogp.to(z.device).reshape(-1) - pz + lse * p.sum(-1, dtype=torch.float64)
    lse = lse.reshape(b, s)[:, :-1]
    picked = logits[:, :-1].gather(-1, ids[:, 1:, None].to(logits.device)).squeeze(-1).double()
    return kl.sum().item(), (lse - picked).sum().item(), b * s, b * (s - 1)


@torch.no_grad()
def score_layer(parent: ParentModel, calib: Calibration, i: int, variants: list[dict], recipe: Recipe,
                progress=None) -> list[dict]:
    """Fill in kl / lm_loss for the variants of layer i."""
    if not variants:
        return []
    batches = calib.inputs[i]
    stats = collect_stats(parent.layer(i), [b.to(parent.device) for b in batches], *parent.positional(
        calib.ids.shape[1]), want_gram=recipe.ffn_refit)
    tensors = parent.layer_tensors(i)
    modules = [parent.build(v["layer"], layer_tensors(parent.plan, parent.plan.layers[i], v["layer"], tensors,
                                                      stats, recipe)) for v in variants]
    del stats
    kl = [0.0] * len(variants)
    nll = [0.0] * len(variants)
    n_kl = n_nll = 0
    # Layer-outer, batch-inner: each later parent layer is fetched once for all batches and variants, so a
    # model whose layers do not all fit on the device is streamed once per scored layer, not once per batch.
    states = [torch.cat([parent.run(m, batches[b].to(parent.device)) for m in modules])
              for b in range(calib.score_batches)]
    del modules
    last = parent.plan.num_layers
    for d in range(i + 1, last):
        layer = parent.layer(d)
        states = [parent.run(layer, x) for x in states]
        if progress:
            progress(f"layer {i}", d - i, last - i)
    for b, x in enumerate(states):
        ids = calib.batch_ids(b)
        for c, chunk in enumerate(x.split(ids.shape[0])):
            k, n, tk, tn = compare(parent.logits(chunk), calib.probs[b], calib.plogp[b], ids)
            kl[c] += k
            nll[c] += n
        n_kl, n_nll = n_kl + tk, n_nll + tn
    if progress:
        progress(f"layer {i}", last - i, last - i)
    return [{"part": v["part"], "name": v["name"], "attention": _attn_json(v["layer"].attention),
             "ffn": _ffn_json(v["layer"].ffn),
             # KL is non-negative; a value a hair below 0 is float rounding.
             "kl": max(kl[c] / n_kl, 0.0), "lm_loss": nll[c] / n_nll} for c, v in enumerate(variants)]


def score_all(parent: ParentModel, calib: Calibration, recipe: Recipe, ffn_widths=None, max_ffn_widths: int = 8,
              progress=None) -> dict:
    """Scores of every variant of every layer, as written to prune_scores.json."""
    t0 = time.time()
    layers = []
    for i in range(parent.plan.num_layers):
        variants = layer_variants(parent, i, ffn_widths, max_ffn_widths)
        layers.append({"index": i, "variants": score_layer(parent, calib, i, variants, recipe, progress)})
    return {
        "version": SCORES_VERSION,
        "source": str(parent.dir),
        "plan": parent.plan.to_json(),
        "calibration": calib.fingerprint(),
        "parent_lm_loss": calib.parent_lm_loss,
        "recipe": recipe.__dict__,
        "ffn_widths": ffn_widths,
        "max_ffn_widths": max_ffn_widths,
        "seconds": round(time.time() - t0, 1),
        "layers": layers,
    }


def _attn_json(a: Attention) -> dict:
    return {"kind": a.kind, "num_kv_heads": a.num_kv_heads}


def _ffn_json(f: FFN) -> dict:
    return {"kind": f.kind, "width": f.width}


def attention_from_json(d: dict) -> Attention:
    return Attention(d["kind"], d.get("num_kv_heads"))


def ffn_from_json(d: dict) -> FFN:
    return FFN(d["kind"], d.get("width"))


def save_scores(scores: dict, out_dir: Path) -> Path:
    path = Path(out_dir) / SCORES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scores, indent=1) + "\n")
    return path


def load_scores(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / SCORES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {SCORES_FILE} at {path.parent} (run without --reuse-scores first)")
    scores = json.loads(path.read_text())
    if scores.get("version") != SCORES_VERSION:
        raise ValueError(f"{path}: scores version {scores.get('version')} is not {SCORES_VERSION}")
    return scores
