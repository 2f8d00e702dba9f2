"""The declarative tables in mappings/*.toml, bound to a per-layer plan: one `TensorMapping` per Megatron tensor,
which knows both directions.

Every Megatron tensor is described by a list of row segments: "rows a..b of Megatron come from rows c..d of HF
tensor k" (or are zero padding). That one list serves both directions:
  - HF -> Megatron (`read_chunk`): a chunk of Megatron rows is filled by reading exactly the HF rows it needs,
    lazily, so a tensor-parallel chunk reads only its own bytes;
  - Megatron -> HF (`to_hf`): each HF tensor is the concatenation, in order, of the segments that name it;
    padding is dropped;
so a round trip is the identity by construction, and that property is tested. The tensor-parallel rule does the
same for TP: `chunks` cuts the global tensor as a run at TP ranks holds it, `assemble` puts the ranks' local
tensors back together.

The HF shapes come from each layer's sub-block kinds (kinds/); `bind` checks that the table and the kinds agree
on every tensor, so a kind and its table rows cannot drift apart unnoticed.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import torch

from .layout import padded_vocab_size, pipeline_split
from .plan import ModelPlan
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


class TensorSource(Protocol):
    """Where HF tensors are read from (a checkpoint on disk, or tensors in memory)."""

    def dtype_of(self, name: str) -> torch.dtype: ...

    def read_into(self, out: torch.Tensor, name: str, row_start: int, cols: slice | None = None) -> None: ...


class DictSource:
    """A `TensorSource` over HF tensors in memory ({name: tensor})."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def dtype_of(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def read_into(self, out: torch.Tensor, name: str, row_start: int, cols: slice | None = None) -> None:
        t = self.tensors[name][row_start:row_start + out.shape[0]]
        out.copy_(t[:, cols] if cols is not None else t)


# ---- row arrangements: how Megatron's rows are made of the HF rows -------------------------------------------


def _same(plan, layer, shapes, rows):
    return (Segment(0, 0, shapes[0][0]),)


def _stack(plan, layer, shapes, rows):
    return tuple(Segment(k, 0, s[0]) for k, s in enumerate(shapes))


def _vocab_pad(plan, layer, shapes, rows):
    real = shapes[0][0]
    return (Segment(0, 0, real),) + ((Segment(None, 0, rows - real),) if rows > real else ())


def _qkv(plan, layer, shapes, rows):
    # Megatron interleaves per KV group: [q heads of group g; k_g; v_g] for g in this layer's groups.
    hd, groups = plan.head_dim, layer.attention.num_kv_heads
    q_per_group = plan.num_attention_heads // groups * hd
    segs = []
    for g in range(groups):
        segs += [Segment(0, g * q_per_group, q_per_group), Segment(1, g * hd, hd), Segment(2, g * hd, hd)]
    return tuple(segs)


ROW_ARRANGEMENTS = {"same": _same, "stack": _stack, "vocab_pad": _vocab_pad, "qkv": _qkv}
TP_RULES = ("replicated", "rows", "rows_per_part", "cols")


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
        return math.prod(self.shape)

    @property
    def where(self) -> str:
        """'layer 3' or 'model', for messages."""
        return f"layer {self.layer}" if self.layer is not None else "model"

    # ---- tensor parallelism -------------------------------------------------------------------------------
    def chunks(self, tp: int) -> list[Chunk]:
        """The pieces a run at `tp` ranks holds, in DCP's (global) coordinates."""
        rows, cols = self.shape[0], (self.shape[1] if len(self.shape) > 1 else None)
        rest = tuple(self.shape[1:])
        zeros_rest = (0,) * len(rest)
        if self.tp_rule == "replicated" or tp == 1:
            return [Chunk((0,) * len(self.shape), tuple(self.shape), 0)]
        if self.tp_rule == "rows":
            n = rows // tp
            return [Chunk((r * n,) + zeros_rest, (n,) + rest, r) for r in range(tp)]
        if self.tp_rule == "rows_per_part":
            # Each stacked part (gate, up) in TP chunks of its own, as megatron's swiglu sharded factory cuts.
            parts = len(self.hf)
            part = rows // parts
            n = part // tp
            return [Chunk((p * part + r * n,) + zeros_rest, (n,) + rest, r)
                    for p in range(parts) for r in range(tp)]
        if self.tp_rule == "cols":
            n = cols // tp
            return [Chunk((0, r * n), (rows, n), r) for r in range(tp)]
        raise ValueError(f"unknown tp rule {self.tp_rule!r} for {self.megatron}")

    def _tp_dim(self) -> int:
        return 1 if self.tp_rule == "cols" else 0

    def local_chunks(self, tp: int, tp_rank: int) -> list[Chunk]:
        """The chunks rank `tp_rank` holds, in the order its local tensor stacks them."""
        if self.tp_rule == "replicated":
            return self.chunks(1)
        return [c for c in self.chunks(tp) if c.tp_rank == tp_rank]

    def assemble(self, local: list[torch.Tensor]) -> torch.Tensor:
        """The global tensor from every TP rank's local tensor (rank order): the inverse of `local_chunks`."""
        tp = len(local)
        if self.tp_rule == "replicated" or tp == 1:
            return local[0]
        if self.tp_rule == "rows_per_part":
            parts = len(self.hf)
            split = [t.chunk(parts, 0) for t in local]
            return torch.cat([split[r][p] for p in range(parts) for r in range(tp)], 0)
        return torch.cat(local, self._tp_dim())

    # ---- HF -> Megatron -----------------------------------------------------------------------------------
    def pieces(self, row_start: int, row_stop: int) -> list[tuple[Segment, int, int]]:
        """The segments overlapping Megatron rows [row_start, row_stop), each as (segment, src_from, src_to)."""
        out, pos = [], 0
        for seg in self.segments:
            lo, hi = max(pos, row_start), min(pos + seg.rows, row_stop)
            if lo < hi:
                out.append((seg, seg.start + lo - pos, seg.start + hi - pos))
            pos += seg.rows
        return out

    def read_chunk(self, source: TensorSource, chunk: Chunk, dtype: torch.dtype) -> torch.Tensor:
        """The Megatron chunk, assembled from exactly the HF rows (and columns) it needs.

        Each piece is read straight into its rows of one preallocated chunk (no per-piece tensors to
        concatenate), so a chunk costs its own size, plus one piece when the dtype changes."""
        offsets, sizes = chunk.offsets, chunk.sizes
        r0, nrows = offsets[0], sizes[0]
        out = torch.empty(tuple(sizes), dtype=dtype)
        pos = 0
        for seg, a, b in self.pieces(r0, r0 + nrows):
            target = out[pos:pos + b - a]
            if seg.source is None:
                target.zero_()
            else:
                name = self.hf[seg.source]
                # A column chunk as wide as its source (TP=1) is a plain row range: one read, not one per row.
                narrower = self.tp_rule == "cols" and (offsets[1], sizes[1]) != (0, self.hf_shapes[seg.source][1])
                cols = slice(offsets[1], offsets[1] + sizes[1]) if narrower else None
                src_dtype = source.dtype_of(name)
                if src_dtype == dtype:
                    source.read_into(target, name, a, cols)
                else:
                    staged = torch.empty(target.shape, dtype=src_dtype)
                    source.read_into(staged, name, a, cols)
                    target.copy_(staged)
            pos += b - a
        return out

    def read_chunks(self, source: TensorSource, chunks: list[Chunk], dtype: torch.dtype,
                    block_bytes: int = 32 << 20) -> list[torch.Tensor]:
        """Several chunks of this tensor at once. Column chunks (row-parallel weights at TP > 1) are cut from
        blocks of whole rows read once, sequentially: reading each chunk's columns row by row would mean one
        small read per row per chunk. Other chunks are contiguous row ranges, read straight into place."""
        if self.tp_rule != "cols" or len(chunks) < 2:
            return [self.read_chunk(source, c, dtype) for c in chunks]
        outs = [torch.empty(tuple(c.sizes), dtype=dtype) for c in chunks]
        cols = self.shape[1]
        pos = 0
        for seg, a, b in self.pieces(0, self.shape[0]):
            if seg.source is None:
                for out in outs:
                    out[pos:pos + b - a].zero_()
            else:
                name = self.hf[seg.source]
                src_dtype = source.dtype_of(name)
                step = max(1, block_bytes // (cols * src_dtype.itemsize))
                buf = torch.empty((min(step, b - a), cols), dtype=src_dtype)
                for r0 in range(a, b, step):
                    n = min(step, b - r0)
                    block = buf[:n]
                    source.read_into(block, name, r0)
                    at = pos + r0 - a
                    for out, c in zip(outs, chunks):
                        out[at:at + n].copy_(block[:, c.offsets[1]:c.offsets[1] + c.sizes[1]])
            pos += b - a
        return outs

    def byte_pieces(self, chunk: Chunk, itemsize: int) -> list[tuple[str | None, int, int]] | None:
        """The chunk's bytes in order, as (HF tensor, byte offset in it, length), None for zero padding, when
        its rows are whole HF rows (so each piece is one contiguous range of its source); None for a column
        chunk narrower than its source (a row-parallel weight at TP > 1), whose rows are strided."""
        r0, nrows = chunk.offsets[0], chunk.sizes[0]
        row_bytes = math.prod(chunk.sizes[1:]) * itemsize
        out = []
        for seg, a, b in self.pieces(r0, r0 + nrows):
            if seg.source is None:
                out.append((None, 0, (b - a) * row_bytes))
                continue
            if tuple(chunk.sizes[1:]) != tuple(self.hf_shapes[seg.source][1:]):
                return None
            out.append((self.hf[seg.source], a * row_bytes, (b - a) * row_bytes))
        return out

    def read_local(self, source: TensorSource, tp: int, tp_rank: int, dtype: torch.dtype) -> torch.Tensor:
        """What rank `tp_rank` of a run at `tp` holds of this tensor, read from HF tensors."""
        parts = [self.read_chunk(source, c, dtype) for c in self.local_chunks(tp, tp_rank)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, self._tp_dim())

    def chunk_read_bytes(self, chunk: Chunk, itemsize: int) -> int:
        """Source bytes a chunk needs: its real HF rows (padding reads nothing) times its columns."""
        row_bytes = math.prod(chunk.sizes[1:]) * itemsize
        return sum((b - a) * row_bytes for seg, a, b in self.pieces(chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0])
                   if seg.source is not None)

    # ---- Megatron -> HF -----------------------------------------------------------------------------------
    def hf_rows(self) -> list[list[tuple[int, int]]]:
        """For each HF tensor, the rows of the global Megatron tensor it is made of, as (first row, count) in
        the HF tensor's own order; padding belongs to none."""
        ranges: list[list[tuple[int, int, int]]] = [[] for _ in self.hf]
        pos = 0
        for seg in self.segments:
            if seg.source is not None:
                ranges[seg.source].append((seg.start, pos, seg.rows))
            pos += seg.rows
        return [[(at, n) for _, at, n in sorted(r)] for r in ranges]

    def to_hf(self, full: torch.Tensor) -> list[torch.Tensor]:
        """The HF tensors of the global Megatron tensor: each is its segments in source order; padding dropped."""
        out = []
        for k, rows in enumerate(self.hf_rows()):
            parts = [full[a:a + n] for a, n in rows]
            t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
            assert tuple(t.shape) == self.hf_shapes[k], (self.hf[k], t.shape, self.hf_shapes[k])
            out.append(t)
        return out


def _applies(when: dict, plan: ModelPlan, layer) -> bool:
    for key, want in when.items():
        if key == "tied":
            if plan.tie_word_embeddings != want:
                return False
        elif key in ("attention", "ffn"):
            if getattr(layer, key).kind != want:
                return False
        else:
            raise ValueError(f"unknown condition {key!r} in mappings table")
    return True


def bind(plan: ModelPlan, tp: int = 1, pp: int = 1) -> list[TensorMapping]:
    """Every Megatron tensor of `plan`, in model order (embedding, layers 0..N-1, final norm, output)."""
    spec = load_table()
    split = pipeline_split(plan, pp)
    vocab_rows = padded_vocab_size(plan.vocab_size, tp)
    globals_, per_layer = [], []
    for entry in spec["tensor"]:
        (globals_ if entry.get("scope") == "global" else per_layer).append(entry)

    def make(entry, layer, stage, owned) -> TensorMapping:
        fmt = {"i": layer.index} if layer is not None else {}
        missing = [k for k in entry["hf"] if k not in owned]
        if missing:
            raise ValueError(f"mappings table row {entry['megatron']} names {missing}, which "
                             f"{'the model' if layer is None else f'layer {layer.index} kinds'} do not own")
        hf_keys = tuple(k.format(**fmt) for k in entry["hf"])
        shapes = tuple(owned[k] for k in entry["hf"])
        rows = vocab_rows if entry["rows"] == "vocab_pad" else sum(s[0] for s in shapes)
        if entry["rows"] not in ROW_ARRANGEMENTS or entry["tp"] not in TP_RULES:
            raise ValueError(f"mappings table row {entry['megatron']}: unknown rows/tp rule")
        segs = ROW_ARRANGEMENTS[entry["rows"]](plan, layer, shapes, rows)
        assert sum(s.rows for s in segs) == rows, (entry["megatron"], segs)
        return TensorMapping(
            megatron=entry["megatron"].format(**fmt),
            hf=hf_keys,
            hf_shapes=shapes,
            shape=(rows,) + tuple(shapes[0][1:]),
            segments=segs,
            tp_rule=entry["tp"],
            layer=None if layer is None else layer.index,
            stage=stage,
            extra_state=tuple(k.format(**fmt) for k in entry.get("extra_state", [])),
            vocab_padded=entry["rows"] == "vocab_pad",
        )

    def bound(entries, layer, stage, owned) -> list[TensorMapping]:
        out = [make(e, layer, stage, owned) for e in entries if _applies(e.get("when", {}), plan, layer)]
        covered = [k for m in out for k in m.hf]
        expected = sorted(k.format(**({"i": layer.index} if layer else {})) for k in owned)
        if sorted(covered) != expected:  # a kind's tensor no row maps, or one mapped twice
            raise ValueError(f"{'model' if layer is None else f'layer {layer.index}'}: the mappings table covers "
                             f"{sorted(covered)}, the plan's kinds own {expected}")
        return out

    glob = plan.global_hf_tensors()
    first = [e for e in globals_ if e.get("stage") == "first"]
    last = [e for e in globals_ if e.get("stage") == "last"]
    firsts = [e for e in first if _applies(e.get("when", {}), plan, None)]
    lasts = [e for e in last if _applies(e.get("when", {}), plan, None)]
    head = [make(e, None, 0, glob) for e in firsts]
    tail = [make(e, None, pp - 1, glob) for e in lasts]
    if sorted(k for m in head + tail for k in m.hf) != sorted(glob):
        raise ValueError(f"model: the mappings table's global rows do not cover {sorted(glob)}")
    out = head
    for layer in plan.layers:
        owned = {t: s for sub in layer.parts for t, s in sub.spec.hf_tensors(plan, sub).items()}
        out += bound(per_layer, layer, split.stage_of_layer(layer.index), owned)
    return out + tail


@lru_cache(maxsize=None)
def _ignore_patterns() -> tuple[re.Pattern, ...]:
    return tuple(re.compile(re.escape(t).replace(re.escape("{i}"), r"\d+")) for t in load_table()["ignore"]["hf"])


def ignored_hf_key(key: str) -> bool:
    """HF keys that carry no weights (e.g. old rotary_emb.inv_freq buffers)."""
    return any(p.fullmatch(key) for p in _ignore_patterns())


def expected_hf_keys(plan: ModelPlan) -> dict[str, tuple[int, ...]]:
    """Every HF key the plan implies, with its shape, in model order."""
    return {k: s for m in bind(plan) for k, s in zip(m.hf, m.hf_shapes)}


__all__ = ["Chunk", "DictSource", "Segment", "TensorMapping", "TensorSource", "bind", "expected_hf_keys", "ignored_hf_key"]
