"""What a sub-block kind is: the one place that knows everything about one way a layer's attention or FFN
half can look. `Attention` and `FFN` are the values a plan holds per layer; a `SubBlockKind` is the knowledge
about one kind of value, consulted by every stage of the flow:

  plan.py      parse it from a `block_configs` entry and write it back (released and Megatron forms)
  mappings.py  its HF tensors and their shapes (the Megatron side of each is a row of mappings/*.toml)
  layout.py    which tensor-parallel sizes it can be split into
  counting     parameters (from the shapes), FLOPs and KV-cache values per token (inspect, prune's budgets)
  prune        the cheaper variants a layer of this kind may be replaced by
Kinds are looked up by (part, name) in the registry (kinds/__init__.py); names are what checkpoints store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: kinds never import the plan module
    from ..plan import ModelPlan

ATTENTION, FFN_PART = "attention", "ffn"


@dataclass(frozen=True)
class Attention:
    """A layer's attention half: its kind's name and, for softmax attention, this layer's own KV-head count."""

    kind: str
    num_kv_heads: int | None = None

    def __post_init__(self):
        from . import get

        get(ATTENTION, self.kind).check(self)

    @property
    def spec(self) -> "SubBlockKind":
        from . import get

        return get(ATTENTION, self.kind)


@dataclass(frozen=True)
class FFN:
    """A layer's FFN half: its kind's name and, for SwiGLU, its width (and the ffn_mult that states it)."""

    kind: str
    width: int | None = None
    # As stated by the source config (rounded to 6 decimals), else derived from the width when expressible.
    ffn_mult: float | None = None

    def __post_init__(self):
        from . import get

        get(FFN_PART, self.kind).check(self)

    @property
    def spec(self) -> "SubBlockKind":
        from . import get

        return get(FFN_PART, self.kind)


class SubBlockKind:
    """Base class; one instance per kind. Methods get the sub-block value (`Attention` or `FFN`) they describe
    and, where sizes matter, the whole plan (hidden size, heads)."""

    part: str = ""  # ATTENTION or FFN_PART
    name: str = ""  # as stored in plans, descriptions and the mapping tables' `when`
    fields: tuple[str, ...] = ()  # the sub-block value's fields this kind uses (the others must stay None)
    block_keys: frozenset[str] = frozenset()  # the block_configs keys it reads
    in_decilm: bool = True  # whether a DeciLM config (and our DeciLM model) can state it

    # ---- the value -------------------------------------------------------------------------------------------
    def check(self, sub) -> None:
        for f in ("num_kv_heads", "width", "ffn_mult"):
            present = getattr(sub, f, None) is not None
            if f in self.fields and f != "ffn_mult" and not present:
                raise ValueError(f"{self.part} kind {self.name!r} needs {f}: {sub}")
            if f not in self.fields and present:
                raise ValueError(f"{self.part} kind {self.name!r} has no {f}: {sub}")

    def describe(self, sub) -> str:
        return self.name

    # ---- block_configs -------------------------------------------------------------------------------------
    def claims(self, d: dict) -> bool:
        """Whether a block_configs sub-block dict describes this kind (asked in registry order)."""
        raise NotImplementedError

    def parse(self, layer: int, d: dict, hidden: int, heads: int) -> tuple[Any, bool]:
        """(the sub-block value, whether it used the newer schema's keys); PlanError on a bad value."""
        raise NotImplementedError

    def released_fields(self, sub, plan: "ModelPlan") -> dict:
        """The released-form keys this kind sets, on top of the schema's defaults."""
        return {}

    def megatron_fields(self, sub) -> dict:
        """megatron-core's block-config keys this kind sets, on top of its part's defaults."""
        return {}

    # ---- tensors -------------------------------------------------------------------------------------------
    def hf_tensors(self, plan: "ModelPlan", sub) -> dict[str, tuple[int, ...]]:
        """{HF key template ({i} = layer index): shape} of the tensors this sub-block owns."""
        return {}

    def tp_violations(self, plan: "ModelPlan", sub, tp: int) -> list[tuple[str, str]]:
        """[(Megatron tensor, reason)] for every way this sub-block cannot be split into TP chunks."""
        return []

    # ---- counting ------------------------------------------------------------------------------------------
    def parameters(self, plan: "ModelPlan", sub) -> int:
        return sum(math.prod(s) for s in self.hf_tensors(plan, sub).values())

    def flops_per_token(self, plan: "ModelPlan", sub, context: int) -> int:
        """Forward FLOPs per token: 2 per weight of every matrix (norms are negligible and left out), plus what
        the kind adds per attended position (`context` = sequence length assumed)."""
        return 2 * sum(math.prod(s) for s in self.hf_tensors(plan, sub).values() if len(s) == 2)

    def kv_cache_values_per_token(self, plan: "ModelPlan", sub) -> int:
        return 0

    # ---- pruning -------------------------------------------------------------------------------------------
    def cheaper_variants(self, plan: "ModelPlan", sub, widths: list[int] | None = None,
                         max_widths: int = 8) -> list:
        """Values of this part that prune may put in place of `sub` (the parent's own value excluded)."""
        return []

    def __repr__(self) -> str:
        return f"<{self.part} kind {self.name!r}>"
