"""Costs of a layer variant, and the exact multiple-choice knapsack that picks one variant per layer.

The search minimises the summed per-layer score (KL of the parent's output to the model with that one
variant swapped in) subject to one budget: parameters, KV-cache bytes per token, or FLOPs per token.

Exactness: every cost here is an integer, and all of them are multiples of their greatest common divisor
(for parameters and FLOPs that is at least the hidden size, because every tensor has the hidden size as one
side). The dynamic programme runs over the budget divided by that divisor, which is exact. Only when that
is still more than `max_bins` cells (a 70B model counted in parameters) are costs rounded *up* to a coarser
unit: the answer is then always within budget, and at most one unit per layer away in cost from the exact
optimum; the result says `exact: False`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np

from ..plan import GQA, LINEAR, SWIGLU, LayerPlan, ModelPlan

TARGETS = ("params", "kv_cache", "flops")
KV_BYTES_PER_VALUE = 2  # the KV cache is counted in bf16, as `inspect` does


# ---- costs ---------------------------------------------------------------------------------------------------


def layer_cost(plan: ModelPlan, layer: LayerPlan, target: str, flops_context: int = 4096) -> int:
    """Cost of one layer variant under `target`.

    params:   parameters of the layer (norms included), as `ModelPlan.layer_parameters` counts them.
    kv_cache: bytes per token of its KV cache in bf16: 2 (K and V) x kv_heads x head_dim x 2 bytes.
    flops:    forward FLOPs per token: 2 per weight of every matrix (norms are negligible and left out) plus,
              for softmax attention, 2 x num_heads x head_dim x flops_context (QK^T and PV each cost
              2 x heads x head_dim per attended position; a causal sequence of length L attends to L/2
              positions on average, so L = flops_context gives that term). KV heads do not change it.
    """
    if target == "params":
        return plan.layer_parameters(layer)["total"]
    if target == "kv_cache":
        if layer.attention.kind != GQA:
            return 0
        return 2 * layer.attention.num_kv_heads * plan.head_dim * KV_BYTES_PER_VALUE
    if target == "flops":
        h, nh, hd = plan.hidden_size, plan.num_attention_heads, plan.head_dim
        flops = 0
        if layer.attention.kind == GQA:
            flops += 2 * plan.qkv_rows(layer) * h + 2 * nh * hd * h + 2 * nh * hd * flops_context
        elif layer.attention.kind == LINEAR:
            flops += 2 * h * h
        if layer.ffn.kind == SWIGLU:
            flops += 2 * 3 * h * layer.ffn.width
        elif layer.ffn.kind == LINEAR:
            flops += 2 * h * h
        return flops
    raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")


def fixed_cost(plan: ModelPlan, target: str) -> int:
    """The part of the model's cost that no layer choice changes (counted in the parent total too)."""
    if target == "params":
        return plan.hidden_size  # the final norm (embeddings are excluded from the parameter target)
    if target == "flops":
        return 2 * plan.vocab_size * plan.hidden_size  # the output projection
    return 0


def model_cost(plan: ModelPlan, target: str, flops_context: int = 4096) -> int:
    return fixed_cost(plan, target) + sum(layer_cost(plan, l, target, flops_context) for l in plan.layers)


# ---- multiple-choice knapsack --------------------------------------------------------------------------------


@dataclass
class Solution:
    choice: list[int]  # index of the chosen option in each group
    score: float
    cost: int  # true (unrounded) total cost
    exact: bool  # False when costs had to be rounded up to a coarser unit (see module docstring)
    unit: int  # the cost unit the programme ran in


class InfeasibleBudget(ValueError):
    pass


def solve_mckp(costs: list[list[int]], scores: list[list[float]], budget: int, max_bins: int = 2_000_000) -> Solution:
    """Pick one option per group minimising the summed score with summed cost <= budget.

    Ties are broken towards the lower option index (so a "keep" listed first wins ties).
    """
    if len(costs) != len(scores) or any(len(c) != len(s) or not c for c, s in zip(costs, scores)):
        raise ValueError("costs and scores must have the same non-empty shape per group")
    if any(c < 0 for group in costs for c in group):
        raise ValueError("costs must be non-negative")
    minimum = sum(min(group) for group in costs)
    if minimum > budget:
        raise InfeasibleBudget(f"the budget {budget:,} is below the smallest reachable cost {minimum:,}")

    divisor = 0
    for c in itertools.chain.from_iterable(costs):
        divisor = math.gcd(divisor, int(c))
    divisor = max(divisor, 1)
    exact = budget // divisor <= max_bins
    unit = divisor if exact else divisor * math.ceil(budget / divisor / max_bins)
    cap = budget // unit
    units = [[-(-int(c) // unit) for c in group] for group in costs]  # ceil: rounding up keeps it feasible

    # best[c]: lowest score of the groups so far with summed (unit) cost exactly c.
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    picks = []
    for group_units, group_scores in zip(units, scores):
        new = np.full(cap + 1, np.inf)
        pick = np.full(cap + 1, -1, dtype=np.int32)
        for j, (w, s) in enumerate(zip(group_units, group_scores)):
            if w > cap:
                continue
            cand = best[: cap + 1 - w] + float(s)
            better = cand < new[w:]  # strict: an earlier option keeps the tie
            new[w:][better] = cand[better]
            pick[w:][better] = j
        best = new
        picks.append(pick)
    if not np.isfinite(best).any():
        raise InfeasibleBudget(f"no combination fits the budget {budget:,} at cost unit {unit}")
    # Lowest score; among equal scores the highest cost, i.e. prune nothing that does not buy a better score.
    end = int(np.flatnonzero(best == best.min())[-1])
    choice = []
    for group_units, pick in zip(reversed(units), reversed(picks)):
        j = int(pick[end])
        choice.append(j)
        end -= group_units[j]
    choice.reverse()
    total = sum(costs[g][j] for g, j in enumerate(choice))
    score = float(sum(scores[g][j] for g, j in enumerate(choice)))
    return Solution(choice, score, total, exact, unit)


def brute_force(costs: list[list[int]], scores: list[list[float]], budget: int) -> tuple[float, list[int]] | None:
    """Reference answer for tests: every combination. None when nothing fits."""
    best = None
    for combo in itertools.product(*(range(len(g)) for g in costs)):
        if sum(costs[g][j] for g, j in enumerate(combo)) > budget:
            continue
        s = sum(scores[g][j] for g, j in enumerate(combo))
        if best is None or s < best[0]:
            best = (s, list(combo))
    return best


# ---- from scores to a model ------------------------------------------------------------------------------------


def layer_choices(plan: ModelPlan, entry: dict, score_key: str = "kl", parent_lm_loss: float = 0.0) -> list[dict]:
    """Every (attention, FFN) combination of one layer with its additive score.

    A combination changes at most both parts; its score is the sum of the two single-swap scores, except
    when both end up removed, which was measured directly (the "layer removed" variant).
    """
    from ..plan import FFN, Attention

    base = plan.layers[entry["index"]]

    def score_of(v):
        return v["kl"] if score_key == "kl" else v["lm_loss"] - parent_lm_loss

    attn = [("keep", base.attention, 0.0)]
    ffn = [("keep", base.ffn, 0.0)]
    removed = 0.0 if base.is_dummy else None
    for v in entry["variants"]:
        if v["part"] == "attention":
            attn.append((v["name"], Attention(v["attention"]["kind"], v["attention"]["num_kv_heads"]), score_of(v)))
        elif v["part"] == "ffn":
            ffn.append((v["name"], FFN(v["ffn"]["kind"], v["ffn"]["width"]), score_of(v)))
        else:
            removed = score_of(v)
    out = []
    for an, a, sa in attn:
        for fn, f, sf in ffn:
            layer = LayerPlan(base.index, a, f)
            if layer.is_dummy:
                if removed is None:
                    continue
                score, names = removed, ("removed", "removed")
            else:
                score, names = sa + sf, (an, fn)
            out.append({"layer": layer, "attention": names[0], "ffn": names[1], "score": score})
    # Keep-keep first so that it wins ties; then dedupe (a parent part that is already "none" appears once).
    seen, unique = set(), []
    for c in out:
        key = (c["layer"].attention, c["layer"].ffn.kind, c["layer"].ffn.width)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def select(plan: ModelPlan, scores: dict, target: str, fraction: float, flops_context: int = 4096,
           score_key: str = "kl", max_bins: int = 2_000_000) -> dict:
    """Solve the budgeted choice: one variant per layer, minimum summed score, total cost <= fraction x parent."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    if not 0 < fraction:
        raise ValueError("the target fraction must be positive")
    parent_total = model_cost(plan, target, flops_context)
    budget_total = int(fraction * parent_total)
    budget = budget_total - fixed_cost(plan, target)
    groups = [layer_choices(plan, e, score_key, scores.get("parent_lm_loss", 0.0)) for e in scores["layers"]]
    if len(groups) != plan.num_layers:
        raise ValueError(f"scores cover {len(groups)} layers, the model has {plan.num_layers}")
    costs = [[layer_cost(plan, c["layer"], target, flops_context) for c in g] for g in groups]
    try:
        sol = solve_mckp(costs, [[c["score"] for c in g] for g in groups], max(budget, -1), max_bins)
    except InfeasibleBudget:
        smallest = fixed_cost(plan, target) + sum(min(c) for c in costs)
        raise InfeasibleBudget(
            f"--target-{target.replace('_', '-')} {fraction} asks for {budget_total:,} but the smallest model "
            f"reachable costs {smallest:,} ({smallest / parent_total:.3f} of the parent)") from None
    chosen = [g[j] for g, j in zip(groups, sol.choice)]
    layers = tuple(c["layer"] for c in chosen)
    pruned = dataclasses.replace(plan, layers=layers, source_format="decilm")
    return {
        "plan": pruned,
        "target": target,
        "fraction": fraction,
        "parent_cost": parent_total,
        "budget": budget_total,
        "cost": model_cost(pruned, target, flops_context),
        "score": sol.score,
        "exact": sol.exact,
        "cost_unit": sol.unit,
        "layers": [{"index": c["layer"].index, "attention": c["attention"], "ffn": c["ffn"], "score": c["score"],
                    "cost": costs[g][sol.choice[g]], "describe": c["layer"].describe()}
                   for g, c in enumerate(chosen)],
    }
