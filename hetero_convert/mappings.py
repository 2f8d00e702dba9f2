"""The declarative tables in mappings/*.toml, bound to a per-layer plan.

Every Megatron tensor is described by a list of row segments: "rows a..b of Megatron come from rows c..d of HF
tensor k" (or are zero padding). That one list serves both directions:
  - HF -> Megatron: a chunk of Megatron rows is filled by slicing exactly the HF rows it needs, lazily, so a
    tensor-parallel chunk reads only its own bytes;
  - Megatron -> HF: each HF tensor is the concatenation, in order, of the segments that name it; padding is
    dropped.
so a round trip is the identity by construction, and that property is tested.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .layout import padded_vocab_size, pipeline_split
from .plan import GQA, ModelPlan
from .resources import shipped_dir


def mappings_dir() -> Path:
    return shipped_dir("mappings", "decilm.toml")


@lru_cache(maxsize=None)
def load_table(name: str = "decilm") -> dict:
    with open(mappings_dir() / f"{name}.toml", "rb") as f:
        return tomllib.load(f)


@dataclass(frozen=True)
class Segment:
    """`rows` Megatron rows taken from HF tensor `source` starting at `start`; source None = zero padding."""

    source: int | None
    start: int
    rows: int


@dataclass(frozen=True)
class Chunk:
    """One tensor-parallel piece of a Megatron tensor, in global coordinates, and the TP rank that owns it."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    tp_rank: int


@dataclass(frozen=True)
class TensorMapping:
    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    shape: tuple[int, ...]  # global Megatron shape
    segments: tuple[Segment, ...]
    tp_rule: str
    layer: int | None  # None for embedding / final norm / output layer
    stage: int  # pipeline stage that owns it at the bound PP
    extra_state: tuple[str, ...] = ()
    vocab_padded: bool = False  # rows beyond the real vocabulary are Megatron's padding

    @property
    def vocab_rows(self) -> int:
        return self.hf_shapes[0][0]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def chunks(self, tp: int) -> list[Chunk]:
        rows, cols = self.shape[0], (self.shape[1] if len(self.shape) > 1 else None)
        rest = tuple(self.shape[1:])
        zeros_rest = (0,) * len(rest)
        if self.tp_rule == "replicated" or tp == 1:
            return [Chunk((0,) * len(self.shape), tuple(self.shape), 0)]
        if self.tp_rule == "rows":
            n = rows // tp
            return [Chunk((r * n,) + zeros_rest, (n,) + rest, r) for r in range(tp)]
        if self.tp_rule == "rows_per_part":
            parts = len(self.hf)
            part = rows // parts
            n = part // tp
            return [Chunk((p * part + r * n,) + zeros_rest, (n,) + rest, r)
                    for p in range(parts) for r in range(tp)]
        if self.tp_rule == "cols":
            n = cols // tp
            return [Chunk((0, r * n), (rows, n), r) for r in range(tp)]
        raise ValueError(f"unknown tp rule {self.tp_rule!r} for {self.megatron}")

    def pieces(self, row_start: int, row_stop: int) -> list[tuple[Segment, int, int]]:
        """The segments overlapping Megatron rows [row_start, row_stop), each as (segment, src_from, src_to)."""
        out, pos = [], 0
        for seg in self.segments:
            lo, hi = max(pos, row_start), min(pos + seg.rows, row_stop)
            if lo < hi:
                out.append((seg, seg.start + lo - pos, seg.start + hi - pos))
            pos += seg.rows
        return out


def _segments(rule: str, plan: ModelPlan, layer, hf_shapes, mega_rows: int) -> tuple[Segment, ...]:
    if rule == "same":
        return (Segment(0, 0, hf_shapes[0][0]),)
    if rule == "stack":
        return tuple(Segment(k, 0, s[0]) for k, s in enumerate(hf_shapes))
    if rule == "vocab_pad":
        real = hf_shapes[0][0]
        pad = (Segment(None, 0, mega_rows - real),) if mega_rows > real else ()
        return (Segment(0, 0, real),) + pad
    if rule == "qkv":
        # Megatron interleaves per KV group: [q heads of group g; k_g; v_g] for g in this layer's groups.
        hd, groups = plan.head_dim, layer.attention.num_kv_heads
        q_per_group = plan.num_attention_heads // groups * hd
        segs = []
        for g in range(groups):
            segs += [Segment(0, g * q_per_group, q_per_group), Segment(1, g * hd, hd), Segment(2, g * hd, hd)]
        return tuple(segs)
    raise ValueError(f"unknown row arrangement {rule!r}")


def hf_shape(plan: ModelPlan, key_template: str, layer) -> tuple[int, ...]:
    """The HF shape a tensor must have under the plan (checked before anything is written)."""
    h, hd, nh = plan.hidden_size, plan.head_dim, plan.num_attention_heads
    name = key_template.rsplit(".", 2)[-2] if key_template.endswith(".weight") else key_template
    if name in ("embed_tokens", "lm_head"):
        return (plan.vocab_size, h)
    if name in ("norm", "input_layernorm", "post_attention_layernorm"):
        return (h,)
    if name == "q_proj":
        return (nh * hd, h)
    if name in ("k_proj", "v_proj"):
        return (layer.attention.num_kv_heads * hd, h)
    if name == "o_proj":
        return (h, nh * hd)
    if name in ("gate_proj", "up_proj"):
        return (layer.ffn.width, h)
    if name == "down_proj":
        return (h, layer.ffn.width)
    if name in ("linear_attn", "linear_mlp"):
        return (h, h)
    raise KeyError(f"no shape rule for {key_template}")


def _applies(when: dict, plan: ModelPlan, layer) -> bool:
    for key, want in when.items():
        if key == "tied":
            if plan.tie_word_embeddings != want:
                return False
        elif key == "attention":
            if layer.attention.kind != want:
                return False
        elif key == "ffn":
            if layer.ffn.kind != want:
                return False
        else:
            raise ValueError(f"unknown condition {key!r} in mappings table")
    return True


def bind(plan: ModelPlan, tp: int = 1, pp: int = 1, table: str = "decilm") -> list[TensorMapping]:
    """Every Megatron tensor of `plan`, in model order (embedding, layers 0..N-1, final norm, output)."""
    spec = load_table(table)
    split = pipeline_split(plan, pp)
    vocab_rows = padded_vocab_size(plan.vocab_size, tp)
    globals_, per_layer = [], []
    for entry in spec["tensor"]:
        (globals_ if entry.get("scope") == "global" else per_layer).append(entry)

    def make(entry, layer, stage) -> TensorMapping:
        fmt = {"i": layer.index} if layer is not None else {}
        hf_keys = tuple(k.format(**fmt) for k in entry["hf"])
        shapes = tuple(hf_shape(plan, k, layer) for k in entry["hf"])
        rest = shapes[0][1:]
        if entry["rows"] == "vocab_pad":
            rows = vocab_rows
        else:
            rows = sum(s[0] for s in shapes)
        segs = _segments(entry["rows"], plan, layer, shapes, rows)
        assert sum(s.rows for s in segs) == rows, (entry["megatron"], segs)
        return TensorMapping(
            megatron=entry["megatron"].format(**fmt),
            hf=hf_keys,
            hf_shapes=shapes,
            shape=(rows,) + tuple(rest),
            segments=segs,
            tp_rule=entry["tp"],
            layer=None if layer is None else layer.index,
            stage=stage,
            extra_state=tuple(k.format(**fmt) for k in entry.get("extra_state", [])),
            vocab_padded=entry["rows"] == "vocab_pad",
        )

    first = [e for e in globals_ if e.get("stage") == "first"]
    last = [e for e in globals_ if e.get("stage") == "last"]
    out = [make(e, None, 0) for e in first if _applies(e.get("when", {}), plan, None)]
    for layer in plan.layers:
        stage = split.stage_of_layer(layer.index)
        out += [make(e, layer, stage) for e in per_layer if _applies(e.get("when", {}), plan, layer)]
    out += [make(e, None, pp - 1) for e in last if _applies(e.get("when", {}), plan, None)]
    return out


def ignored_hf_key(key: str) -> bool:
    """HF keys that carry no weights (e.g. old rotary_emb.inv_freq buffers)."""
    import re

    for template in load_table()["ignore"]["hf"]:
        pattern = re.escape(template).replace(re.escape("{i}"), r"\d+")
        if re.fullmatch(pattern, key):
            return True
    return False


def expected_hf_keys(plan: ModelPlan) -> dict[str, tuple[int, ...]]:
    """Every HF key the plan implies, with its shape."""
    return {k: s for m in bind(plan) for k, s in zip(m.hf, m.hf_shapes)}


__all__ = ["TensorMapping", "Segment", "Chunk", "bind", "expected_hf_keys", "ignored_hf_key", "GQA"]
