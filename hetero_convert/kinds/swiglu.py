"""SwiGLU FFN (gate, up, down) with this layer's own width.

Released configs state the width as `ffn_mult`: width = int(2·m·H/3) rounded up to a multiple of 256 (m first
rounded to 6 decimals); the newer schema states `intermediate_size` directly. Widths that no ffn_mult can
express (not a multiple of 256) are written in the newer form."""

from __future__ import annotations

from ..errors import PlanError
from .base import FFN_PART, FFN, SubBlockKind


def ffn_mult_to_width(ffn_mult: float, hidden_size: int) -> int:
    """The DeciLM rule: int(2*m*H/3) rounded up to a multiple of 256 (ffn_mult first rounded to 6 decimals)."""
    width = int(2 * round(ffn_mult, 6) * hidden_size / 3)
    return width if width % 256 == 0 else width + 256 - width % 256


def width_to_ffn_mult(width: int, hidden_size: int) -> float | None:
    """The shortest 6-decimal ffn_mult that reproduces `width` exactly, or None if none can."""
    if width % 256:
        return None  # the rule always yields a multiple of 256
    exact = 3 * width / (2 * hidden_size)
    for digits in range(0, 7):
        for candidate in (round(exact, digits), round(exact + 10**-digits, digits)):
            if candidate > 0 and ffn_mult_to_width(candidate, hidden_size) == width:
                return candidate
    return None


def default_widths(parent_width: int, hidden: int, max_widths: int = 8) -> list[int]:
    """Narrower widths the format can express: every multiple of 256 below the parent width when there are at
    most `max_widths` of them, else the multiples of 256 nearest to k/(max_widths+1) of the parent width."""
    every = [w for w in range(256, parent_width, 256) if width_to_ffn_mult(w, hidden) is not None]
    if len(every) <= max_widths:
        return every
    picked = {min(every, key=lambda w: abs(w - parent_width * k / (max_widths + 1))) for k in range(1, max_widths + 1)}
    return sorted(picked)


class SwiGLU(SubBlockKind):
    part, name = FFN_PART, "swiglu"
    block_keys = frozenset({"ffn_mult", "intermediate_size"})
    fields = ("width", "ffn_mult")

    def check(self, sub) -> None:
        super().check(sub)
        if sub.width <= 0:
            raise ValueError(f"SwiGLU needs a positive width: {sub}")

    def describe(self, sub) -> str:
        return f"SwiGLU {sub.width}"

    def claims(self, d: dict) -> bool:
        return True

    def parse(self, layer, d, hidden, heads):
        if d.get("intermediate_size") is not None:
            width = int(d["intermediate_size"])
            if width <= 0:
                raise PlanError(f"layer {layer}: ffn.intermediate_size must be positive, got {width}")
            return FFN(self.name, width, width_to_ffn_mult(width, hidden)), True
        if d.get("ffn_mult") is None:
            raise PlanError(f"layer {layer}: normal FFN needs ffn_mult (or intermediate_size)")
        mult = round(float(d["ffn_mult"]), 6)
        if mult <= 0:
            raise PlanError(f"layer {layer}: ffn_mult must be positive, got {mult}")
        return FFN(self.name, ffn_mult_to_width(mult, hidden), mult), False

    def released_fields(self, sub, plan) -> dict:
        mult = sub.ffn_mult or width_to_ffn_mult(sub.width, plan.hidden_size)
        if mult is not None and ffn_mult_to_width(mult, plan.hidden_size) == sub.width:
            return {"ffn_mult": mult}
        # Not expressible as ffn_mult: the newer schema, which our HF model and megatron-core both read.
        return {"intermediate_size": sub.width}

    def megatron_fields(self, sub) -> dict:
        return {"ffn_hidden_size": sub.width}

    def hf_tensors(self, plan, sub):
        h, w = plan.hidden_size, sub.width
        return {"model.layers.{i}.post_attention_layernorm.weight": (h,),
                "model.layers.{i}.mlp.gate_proj.weight": (w, h),
                "model.layers.{i}.mlp.up_proj.weight": (w, h),
                "model.layers.{i}.mlp.down_proj.weight": (h, w)}

    def tp_violations(self, plan, sub, tp):
        if sub.width % tp:  # gate and up are split separately into TP chunks each
            return [("mlp.linear_fc1", f"FFN width {sub.width} is not divisible by TP={tp}")]
        return []

    def cheaper_variants(self, plan, sub, widths=None, max_widths=8):
        """Narrower widths (widest first; only widths ffn_mult can state), then linear, then removed."""
        from . import LINEAR_FFN, NO_FFN

        pool = default_widths(sub.width, plan.hidden_size, max_widths) if widths is None else widths
        out = []
        for w in sorted({w for w in pool if w < sub.width}, reverse=True):
            mult = width_to_ffn_mult(w, plan.hidden_size)
            if mult is None:
                raise ValueError(f"FFN width {w} cannot be expressed as ffn_mult for hidden size {plan.hidden_size}")
            out.append(FFN(self.name, w, mult))
        return out + [FFN(LINEAR_FFN.name), FFN(NO_FFN.name)]


SWIGLU_FFN = SwiGLU()
