"""Score every layer variant by swapping it alone into the parent, in one layer-by-layer sweep.

The calibration windows are split into fit windows (the statistics every variant is fitted from) and
held-back scoring windows, spread evenly over the windows so that every calibration domain is in both. The
sweep visits each parent layer once, in order, and at layer d:

  1. carries every pending variant state (variants of layers < d, on the scoring tokens) through layer d;
  2. runs layer d over the fit tokens with forward hooks that accumulate its statistics (and over the scoring
     tokens, whose statistics cross-validate the ridges), giving the parent's input of layer d + 1;
  3. fits every variant of layer d, writes their records to the fit store, and runs them on layer d's input
     on the scoring tokens: their outputs become the pending states of layer d's group.

At the end the parent's and every variant's final states go through the head, and each variant is scored by

    kl       = mean over scoring tokens of KL(parent || model with the variant), in nats
    lm_loss  = the variant model's next-token cross-entropy on the scoring tokens

Every parent layer is built once (streamed from the checkpoint), the parent's layer outputs are computed
once, and the variants are fitted on tokens they are then *not* scored on: a fit that is good on the
calibration tokens but poor elsewhere is scored as poor. The statistics pass runs in float32 whatever the
scoring dtype; with a lower scoring dtype (bf16) each group also carries the parent's own state through the
same lower-precision layers, and its variants are compared with that, so rounding does not count as damage.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..plan import FFN, NONE, Attention, LayerPlan
from .candidates import (
    Recipe,
    StatsRecorder,
    attention_name,
    attention_options,
    ffn_name,
    ffn_options,
    narrow_ffn_records,
    part_record,
    part_tensors,
)
from .fits import FitStore, cast_record
from .parent import ParentModel

SCORES_FILE = "prune_scores.json"
SCORES_VERSION = 2
STATS_DTYPE = torch.float32


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


def split_windows(n: int, score_tokens: int, seq_len: int, domains: list | None = None) -> tuple[list[int], list[int]]:
    """(fit, score) window indices: ceil(score_tokens / seq_len) scoring windows, shared among the domains
    in proportion to their windows (at least one each while there are enough) and evenly spaced within each;
    the rest for fitting. With a single window both use it (nothing can be held back)."""
    if n <= 1:
        return [0], [0]
    k = max(1, min(n - 1, -(-score_tokens // seq_len)))
    domains = list(domains) if domains is not None else [0] * n
    groups: dict = {}
    for j, dom in enumerate(domains):
        groups.setdefault(dom, []).append(j)
    share = {dom: len(js) * k / n for dom, js in groups.items()}
    count = {dom: max(1 if k >= len(groups) else 0, math.floor(share[dom])) for dom in groups}
    for dom in sorted(groups, key=lambda d: share[d] - math.floor(share[d]), reverse=True):
        if sum(count.values()) >= k:
            break
        count[dom] += 1
    score = []
    for dom, js in groups.items():
        c = min(count[dom], len(js) - 1) if len(js) > 1 else min(count[dom], 1)
        if c > 0:
            score += [js[i] for i in torch.linspace(0, len(js) - 1, c).round().long().tolist()]
    score = sorted(set(score))
    fit = [j for j in range(n) if j not in score] or score
    return fit, score


@torch.no_grad()
def compare(logits: torch.Tensor, probs: torch.Tensor, plogp: torch.Tensor, ids: torch.Tensor):
    """(summed KL, summed NLL, KL tokens, NLL tokens) of a batch of logits [B, S, V] against the parent.

    KL(p || q) = sum p log p - sum p z + logsumexp(z) * sum p, with z the logits: the parent's part is
    computed once per batch, and the rest is one dot product and one logsumexp per token.
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


def reference(logits: torch.Tensor):
    """The parent's side of `compare`: probabilities and sum p log p per token (0 log 0 = 0)."""
    lp = torch.log_softmax(logits, dim=-1)
    p = lp.exp()
    return p, torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1, dtype=torch.float64)


@dataclass
class Group:
    """The variants of one layer, travelling together along the batch through the later layers."""

    layer: int
    variants: list
    states: list  # per scoring batch: [(ref + len(variants)) * B, S, H]
    has_ref: bool
    info: list = field(default_factory=list)


def work_plan(parent: ParentModel, n_fit: int, n_score: int, variants: list[list], recipe: Recipe,
              score: bool = True) -> list:
    """Per layer and for the head: the work units (about FLOPs / 2) the sweep will spend, for progress.
    Includes the fits (fp64 factorisations, counted twice for fp64), which dominate small models' layers."""
    plan = parent.plan
    units, pending = [], 0
    n_ridges = len(recipe.refit_ridges) if recipe.cv and score else 1
    for d, layer in enumerate(plan.layers):
        p = max(plan.layer_parameters(layer)["total"], plan.hidden_size)
        tokens = n_fit + n_score + ((pending + len(variants[d])) * n_score if score else 0)
        widths = [v["layer"].ffn.width for v in variants[d] if v["layer"].ffn.kind == "swiglu"
                  and layer.ffn.kind == "swiglu" and v["layer"].ffn.width < layer.ffn.width]
        fits = 0
        if widths and recipe.ffn_refit:
            h = plan.hidden_size
            fits = 2 * n_ridges * (max(widths) ** 3 / 3 + sum(2 * w * w * h + n_score * w * h for w in widths))
            fits += n_fit * layer.ffn.width ** 2  # the activation Gram matrix
        units.append(tokens * p + fits)
        pending += len(variants[d]) + (1 if score else 0)
    head = pending * n_score * plan.vocab_size * plan.hidden_size if score else 0
    return units + [head]


@torch.no_grad()
def sweep(parent: ParentModel, ids: torch.Tensor, recipe: Recipe, store: FitStore, *, score_tokens: int,
          batch_size: int, ffn_widths=None, max_ffn_widths: int = 8, score: bool = True, wanted: dict | None = None,
          domains: list | None = None, progress=None) -> dict:
    """Fit (and, with score=True, score) the variants of every layer; see the module docstring.

    wanted: {layer: [LayerPlan, ...]} fits only those variants and stops after the last layer named: how
    export rebuilds fits that no store holds, and how baselines with another recipe are fitted. With
    score=False nothing is scored, but the held-back windows still cross-validate the ridges.
    """
    t0 = time.time()
    plan, n_layers, seq_len = parent.plan, parent.plan.num_layers, ids.shape[1]
    # Fit-only sweeps split the windows the same way, so they reproduce the scored fits exactly.
    fit_idx, score_idx = split_windows(ids.shape[0], score_tokens, seq_len, domains)
    fit_ids, score_ids = ids[fit_idx], ids[score_idx]
    chunk = lambda t: [t[k:k + batch_size] for k in range(0, t.shape[0], batch_size)]
    fit_b, score_b = chunk(fit_ids), chunk(score_ids)
    cdt = parent.dtype
    has_ref = score and cdt != STATS_DTYPE
    h_fit = [parent.embed_ids(b, STATS_DTYPE) for b in fit_b]
    h_score = [parent.embed_ids(b, STATS_DTYPE) for b in score_b]
    pos32, pos_c = parent.positional(seq_len, STATS_DTYPE), parent.positional(seq_len, cdt)

    if wanted is not None:
        last = max(wanted) if wanted else -1
        per_layer = [[{"part": "layer", "name": "wanted", "layer": c} for c in wanted.get(d, [])]
                     for d in range(n_layers)]
    else:
        last = n_layers - 1
        per_layer = [layer_variants(parent, d, ffn_widths, max_ffn_widths) for d in range(n_layers)]
    units = work_plan(parent, fit_ids.numel(), score_ids.numel(), per_layer, recipe, score)
    if progress is not None and not progress.total:
        progress.plan(sum(units[:last + 1]) + units[-1])

    groups: list[Group] = []
    influence = []
    for d in range(last + 1):
        base = plan.layers[d]
        # On the device once: every module and fit of this layer is made from these.
        tensors = {k: v.to(parent.device) for k, v in parent.layer_tensors(d).items()}
        mod32 = parent.build(base, tensors, STATS_DTYPE)
        mod_c = mod32 if cdt == STATS_DTYPE else parent.build(base, tensors, cdt)
        # 1. pending variant states through parent layer d
        for g in groups:
            g.states = [mod_c(x, *pos_c, None) for x in g.states]
        # 2. the parent's own pass over fit (statistics) and scoring tokens (held-out statistics)
        rec = StatsRecorder(mod32, want_gram=recipe.ffn_refit)
        out_fit = [mod32(x, *pos32, None) for x in h_fit]
        stats = rec.finish()
        cos = sum(F.cosine_similarity(x.double(), y.double(), dim=-1).sum().item() for x, y in zip(h_fit, out_fit))
        influence.append(1.0 - cos / max(fit_ids.numel(), 1))
        heldout = None
        if score_b:
            rec_ho = StatsRecorder(mod32, samples=True)
            out_score = [mod32(x, *pos32, None) for x in h_score]
            heldout = rec_ho.finish()
        else:
            out_score = []
        # 3. fit this layer's variants, store their records, and run them on the scoring tokens
        variants = per_layer[d]
        records, infos, outs = {}, [], []
        widths = sorted({v["layer"].ffn.width for v in variants if v["layer"].ffn.kind == "swiglu"
                         and base.ffn.kind == "swiglu" and v["layer"].ffn.width < base.ffn.width})
        if widths:  # all narrower FFNs at once: one factorisation per ridge serves every width
            for w, (rec_, inf_) in narrow_ffn_records(tensors, widths, stats, recipe, heldout).items():
                key = ("ffn", f"w{w}")
                records[key] = cast_record(rec_, parent.checkpoint_dtype)
                records[key + ("info",)] = inf_
        for v in variants:
            layer_v, recs = v["layer"], {}
            info = {}
            for part, option in (("attention", layer_v.attention), ("ffn", layer_v.ffn)):
                name = (attention_name if part == "attention" else ffn_name)(
                    option, base.attention if part == "attention" else base.ffn)
                key = (part, name)
                if key not in records:
                    rec_, inf_ = part_record(plan, base, part, option, tensors, stats, recipe, heldout)
                    records[key] = cast_record(rec_, parent.checkpoint_dtype)
                    records[key + ("info",)] = inf_
                recs[part] = records[key]
                info.update(records[key + ("info",)])
            infos.append(info)
            if score and score_b:
                lt = part_tensors(base, "attention", layer_v.attention, tensors, recs["attention"])
                lt.update(part_tensors(base, "ffn", layer_v.ffn, tensors, recs["ffn"]))
                module = parent.build(layer_v, lt, cdt)
                outs.append([module(x.to(cdt), *pos_c, None) for x in h_score])
                del module
        store.write_layer(d, {k: r for k, r in records.items() if len(k) == 2 and r})
        if score and score_b:
            states = []
            for b in range(len(score_b)):
                members = ([out_score[b].to(cdt)] if has_ref else []) + [o[b] for o in outs]
                states.append(torch.cat(members))
            groups.append(Group(d, variants, states, has_ref, infos))
        del stats, heldout, mod32, mod_c, outs
        h_fit, h_score = out_fit, out_score
        if progress is not None:
            progress.step(units[d], f"layer {d + 1}/{last + 1}: {len(variants)} variants fitted"
                          + (" and scored" if score else ""))

    result = {"fit_windows": fit_idx, "score_windows": score_idx, "block_influence": influence}
    if not score:
        result["seconds"] = round(time.time() - t0, 1)
        return result

    # 4. the head: every group against the parent, batch by batch
    kl = {g.layer: [0.0] * len(g.variants) for g in groups}
    nll = {g.layer: [0.0] * len(g.variants) for g in groups}
    n_kl = n_nll = 0
    parent_nll = 0.0
    for b, ids_b in enumerate(score_b):
        bsz = ids_b.shape[0]
        ref_p = None
        if not has_ref:
            ref_p = reference(parent.logits(h_score[b].to(cdt)))
        lp = torch.log_softmax(parent.logits(h_score[b].to(cdt)), dim=-1)
        parent_nll += -lp[:, :-1].gather(-1, ids_b[:, 1:, None].to(lp.device)).sum().item()
        del lp
        tk = tn = 0
        for g in groups:
            members = g.states[b].split(bsz)
            p, plogp = reference(parent.logits(members[0])) if g.has_ref else ref_p
            for c, x in enumerate(members[1:] if g.has_ref else members):
                k, n, tk, tn = compare(parent.logits(x), p, plogp, ids_b)
                kl[g.layer][c] += k
                nll[g.layer][c] += n
            g.states[b] = None
        n_kl, n_nll = n_kl + tk, n_nll + tn
        if progress is not None:
            progress.step(units[-1] / len(score_b), f"head: scoring batch {b + 1}/{len(score_b)}")
    layers = []
    for d in range(n_layers):
        g = next((g for g in groups if g.layer == d), None)
        entries = []
        for c, v in enumerate(g.variants if g else []):
            entries.append({"part": v["part"], "name": v["name"], "attention": _attn_json(v["layer"].attention),
                            "ffn": _ffn_json(v["layer"].ffn),
                            # KL is non-negative; a value a hair below 0 is float rounding.
                            "kl": max(kl[d][c] / n_kl, 0.0), "lm_loss": nll[d][c] / n_nll, "fit": g.info[c]})
        layers.append({"index": d, "block_influence": influence[d], "variants": entries})
    result.update({"layers": layers, "parent_lm_loss": parent_nll / max(n_nll, 1),
                   "seconds": round(time.time() - t0, 1)})
    return result


def score_all(parent: ParentModel, ids: torch.Tensor, recipe: Recipe, store: FitStore, *, score_tokens: int,
              batch_size: int, ffn_widths=None, max_ffn_widths: int = 8, domains: list | None = None,
              progress=None) -> dict:
    """Scores of every variant of every layer, as written to prune_scores.json; fits go to `store`.
    domains: the calibration domain of each window (the held-back windows are shared among them)."""
    r = sweep(parent, ids, recipe, store, score_tokens=score_tokens, batch_size=batch_size, ffn_widths=ffn_widths,
              max_ffn_widths=max_ffn_widths, domains=domains, progress=progress)
    return {
        "version": SCORES_VERSION,
        "source": str(parent.dir),
        "plan": parent.plan.to_json(),
        "calibration": fingerprint(ids, r["score_windows"]),
        "parent_lm_loss": r["parent_lm_loss"],
        "recipe": recipe_json(recipe),
        "ffn_widths": ffn_widths,
        "max_ffn_widths": max_ffn_widths,
        "seconds": r["seconds"],
        "layers": r["layers"],
    }


def fingerprint(ids: torch.Tensor, score_windows: list[int]) -> dict:
    import hashlib

    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    return {"calibration_sha256_16": digest, "sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
            "score_sequences": len(score_windows), "fit_sequences": int(ids.shape[0]) - len(score_windows)
            if ids.shape[0] > 1 else 1}


def recipe_json(recipe: Recipe) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.__dict__.items()}


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
        raise ValueError(f"{path}: scores version {scores.get('version')} is not {SCORES_VERSION} "
                         "(scores of an earlier hetero-convert: score again)")
    return scores


__all__ = ["SCORES_FILE", "compare", "layer_variants", "load_scores", "save_scores", "score_all", "split_windows",
           "sweep"]
