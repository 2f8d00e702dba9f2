"""Which tensor/pipeline-parallel layouts a plan can be sharded into, and how layers split into stages.

The rules are megatron-core 0.16.1's own (checked against its source, not assumed):
  - attention heads must divide by TP, and a layer's KV groups must be a multiple *or a divisor* of TP
    (with fewer groups than TP, megatron all-gathers QKV; see megatron/core/transformer/attention.py);
    the interleaved QKV rows must also split evenly into TP chunks;
  - a SwiGLU width must divide by TP (gate and up are split separately);
  - a linear replacement is column-parallel H -> H/TP, so H must divide by TP;
  - the vocabulary is padded up to a multiple of 128*TP (`make_vocab_size_divisible_by` = 128);
  - PP needs at least one layer per stage. Stages are balanced by parameters and expressed in megatron's
    own terms: `num_layers_in_first_pipeline_stage` / `num_layers_in_last_pipeline_stage`, with the layers in
    between split evenly over the middle stages.
Every violation is reported, not only the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import LayoutError
from .plan import ModelPlan

VOCAB_DIVISIBLE_BY = 128
MAX_TP = 8  # the TP sizes suggested and listed (one node's GPUs)


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """Megatron's padding: round vocab up to a multiple of divisible_by * TP."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class Violation:
    layer: int | None  # None for model-level problems
    tensor: str
    reason: str

    def __str__(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else "model"
        return f"{where}: {self.tensor}: {self.reason}"


@dataclass
class PipelineSplit:
    """Layers per stage, and megatron's way of saying it (None = megatron's even split)."""

    layers_per_stage: list[int]
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    params_per_stage: list[int] = field(default_factory=list)

    def stage_ranges(self) -> list[range]:
        out, start = [], 0
        for n in self.layers_per_stage:
            out.append(range(start, start + n))
            start += n
        return out

    def stage_of_layer(self, layer: int) -> int:
        for stage, r in enumerate(self.stage_ranges()):
            if layer in r:
                return stage
        raise IndexError(layer)


def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, start = [], None
    for k, x in enumerate(layers):
        start = x if start is None else start
        if k + 1 == len(layers) or layers[k + 1] != x + 1:
            out.append(f"{start}-{x}" if x != start else f"{x}")
            start = None
    return ", ".join(out)


@dataclass
class LayoutReport:
    tp: int
    pp: int
    padded_vocab_size: int
    violations: list[Violation]
    split: PipelineSplit | None
    feasible_tp: list[int] = field(default_factory=list)  # TP sizes up to MAX_TP this model can be split into
    num_layers: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def grouped(self) -> list[str]:
        """One line per distinct problem, with the layers that have it: 'layers 0-29: tensor: reason'."""
        groups: dict[tuple[str, str], list[int]] = {}
        model_level = []
        for v in self.violations:
            if v.layer is None:
                model_level.append(str(v))
            else:
                groups.setdefault((v.tensor, v.reason), []).append(v.layer)
        lines = list(model_level)
        for (tensor, reason), layers in groups.items():
            where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layer_ranges(layers)}"
            lines.append(f"{where}: {tensor}: {reason}")
        return lines

    def suggestion(self) -> str:
        """What would work instead, from the TP sizes that pass and the layer count."""
        if not self.feasible_tp:
            return "no TP size up to 8 works for this model"
        pp = f"PP up to {self.num_layers}" if self.num_layers else "any PP"
        return (f"TP sizes that work (up to {MAX_TP}): {self.feasible_tp}, each with {pp}; "
                f"`hetero-convert inspect --tp T --pp P` shows a layout's pipeline split")

    def message(self) -> str:
        lines = self.grouped()
        n = len(self.violations)
        head = f"layout TP={self.tp} PP={self.pp} is not possible ({n} problem{'s' if n != 1 else ''}):"
        return "\n".join([head] + [f"  - {line}" for line in lines] + [self.suggestion()])


def tp_violations(plan: ModelPlan, tp: int) -> list[Violation]:
    if tp < 1:
        return [Violation(None, "tensor_parallel", f"TP must be >= 1, got {tp}")]
    out: list[Violation] = []
    if plan.num_attention_heads % tp:
        out.append(Violation(None, "num_attention_heads",
                             f"{plan.num_attention_heads} heads are not divisible by TP={tp}"))
    for layer in plan.layers:
        for sub in layer.parts:
            out += [Violation(layer.index, tensor, reason) for tensor, reason in sub.spec.tp_violations(plan, sub, tp)]
    return out


class _StageCost:
    """Parameters per stage from prefix sums, so trying every split stays cheap for 162-layer models."""

    def __init__(self, plan: ModelPlan):
        self.prefix = [0]
        for layer in plan.layers:
            self.prefix.append(self.prefix[-1] + plan.layer_parameters(layer)["total"])
        self.emb = plan.vocab_size * plan.hidden_size
        self.tail = plan.hidden_size + (0 if plan.tie_word_embeddings else self.emb)

    def __call__(self, counts: list[int]) -> list[int]:
        out, start = [], 0
        for n in counts:
            out.append(self.prefix[start + n] - self.prefix[start])
            start += n
        out[0] += self.emb
        out[-1] += self.tail
        return out


def pipeline_split(plan: ModelPlan, pp: int, first: int | None = None, last: int | None = None) -> PipelineSplit:
    """Balance stages by parameters (embedding on the first stage, output layer on the last).

    Megatron can only make the first and last stage different; so try every (first, last) for which the
    middle divides evenly and keep the one with the smallest largest stage. Explicit first/last are honoured.
    """
    n, cost = plan.num_layers, _StageCost(plan)
    if pp == 1:
        return PipelineSplit([n], params_per_stage=cost([n]))
    if n < pp:
        raise ValueError(f"{n} layers cannot fill {pp} pipeline stages")
    even = [n // pp] * pp if n % pp == 0 else None
    best, best_key = None, None
    for f in ([first] if first is not None else range(1, n - pp + 2)):
        rest = n - f
        if last is not None:
            lasts = [last]
        elif pp == 2:
            lasts = [rest] if rest >= 1 else []
        else:  # only the lasts that leave the middle stages a whole number of layers each, in increasing order
            lasts = range(rest % (pp - 2) or pp - 2, rest - (pp - 2) + 1, pp - 2)
        for l in lasts:
            middle = rest - l
            if pp == 2:
                if middle != 0:
                    continue
                counts = [f, l]
            else:
                if middle < pp - 2 or middle % (pp - 2):
                    continue
                counts = [f] + [middle // (pp - 2)] * (pp - 2) + [l]
            key = (max(cost(counts)), counts != even)
            if best_key is None or key < best_key:  # the first of equals, as min() over the list kept
                best, best_key = counts, key
    if best is None:
        raise ValueError(f"no pipeline split of {n} layers into {pp} stages with first={first} last={last}")
    if best == even:  # megatron's default split already is the best one; say nothing special
        return PipelineSplit(best, params_per_stage=cost(best))
    return PipelineSplit(best, best[0], best[-1], cost(best))


def check_layout(plan: ModelPlan, tp: int = 1, pp: int = 1) -> LayoutReport:
    violations = tp_violations(plan, tp)
    split = None
    if pp < 1:
        violations.append(Violation(None, "pipeline_parallel", f"PP must be >= 1, got {pp}"))
    elif plan.num_layers < pp:
        violations.append(Violation(None, "pipeline_parallel",
                                    f"{plan.num_layers} layers cannot fill PP={pp} stages"))
    else:
        split = pipeline_split(plan, pp)
    violations += rope_violations(plan)
    report = LayoutReport(tp, pp, padded_vocab_size(plan.vocab_size, tp), violations, split,
                          num_layers=plan.num_layers)
    if violations:
        report.feasible_tp = feasible_tp(plan) if not rope_violations(plan) else []
    return report


def rope_violations(plan: ModelPlan) -> list[Violation]:
    """megatron-core hard-codes three llama3 constants; a config with others cannot be represented."""
    if plan.rope_scaling is None:
        return []
    rs = plan.rope_scaling
    fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return [Violation(None, f"rope_scaling.{key}", f"{rs[key]} differs from megatron-core's fixed {want}")
            for key, want in fixed.items() if float(rs[key]) != want]


def feasible_tp(plan: ModelPlan, max_tp: int = MAX_TP) -> list[int]:
    """Every TP size from 1 to max_tp the model can be split into (not only powers of two)."""
    return [tp for tp in range(1, max_tp + 1) if not tp_violations(plan, tp)]


def require_layout(plan: ModelPlan, tp: int = 1, pp: int = 1) -> LayoutReport:
    report = check_layout(plan, tp, pp)
    if not report.ok:
        raise LayoutError(report)
    return report


def feasible_layouts(plan: ModelPlan, max_gpus: int = 64) -> list[tuple[int, int]]:
    """All (TP, PP) with TP up to MAX_TP and TP*PP <= max_gpus that pass check_layout."""
    if rope_violations(plan):
        return []
    return [(tp, pp) for tp in feasible_tp(plan) for pp in range(1, min(plan.num_layers, max_gpus // tp) + 1)]


def pipeline_options(plan: ModelPlan, pps: tuple[int, ...] = (2, 4, 8)) -> list[dict]:
    """The balanced split at a few PP sizes: layers per stage and how far the heaviest stage is above the mean."""
    out = []
    for pp in pps:
        if pp > plan.num_layers:
            break
        split = pipeline_split(plan, pp)
        params = split.params_per_stage
        out.append({"pp": pp, "layers_per_stage": split.layers_per_stage,
                    "max_over_mean": max(params) * len(params) / sum(params)})
    return out
