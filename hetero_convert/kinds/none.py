"""A removed sub-block ("no_op"): no norm, no weights, no residual add; the layer passes its input on.
A layer whose two halves are both removed is a dummy layer (Ultra-253B has 81 of them)."""

from __future__ import annotations

from .base import ATTENTION, FFN_PART, Attention, FFN, SubBlockKind


class Removed(SubBlockKind):
    name = "none"
    block_keys = frozenset({"no_op"})

    def __init__(self, part: str):
        self.part = part

    def describe(self, sub) -> str:
        return "-"

    def claims(self, d: dict) -> bool:
        return bool(d.get("no_op"))

    def parse(self, layer, d, hidden, heads):
        return (Attention(self.name) if self.part == ATTENTION else FFN(self.name)), False

    def released_fields(self, sub, plan) -> dict:
        return {"no_op": True}

    def megatron_fields(self, sub) -> dict:
        return {"no_op": True}


NO_ATTENTION = Removed(ATTENTION)
NO_FFN = Removed(FFN_PART)
