"""Who does what in a conversion over P processes: bytes read and written per unit of work, and a byte-balanced
assignment that every process computes identically (so no plan has to be sent around).

  hf-to-megatron: the simulated Megatron ranks go whole to processes, so the files are named as a Megatron run
    would name them (`__{rank}_{k}.distcp`). With fewer Megatron ranks than processes, or when whole ranks would
    leave one process more than 5% above the mean, single chunks are spread instead, and process p writes its
    part of rank r into `__{r}_p{p}_{k}.distcp` (DCP finds data through `.metadata`, never by file name).
  megatron-to-hf: whole safetensors shards go to processes.
`plan_conversion` answers the same question from a config alone, for `hetero-convert plan-convert`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .. import dtypes
from ..errors import ConversionError
from ..io.dcp import extra_state_payload
from ..layout import require_layout
from ..mappings import bind
from ..packing import balance
from .common import parse_size
from .to_hf import plan_hf_shards
from .to_megatron import megatron_write_items

EXTRA_STATE_BYTES = len(extra_state_payload().getbuffer())
# Whole Megatron ranks per process (Megatron's own file names) while the busiest process stays within 5% of
# the mean; beyond that, chunk by chunk.
WHOLE_RANK_SLACK = 1.05


@dataclass
class MegatronShare:
    """What one process writes in hf-to-megatron: whole Megatron ranks, or items of ranks."""

    ranks: list[int] = field(default_factory=list)
    subset: dict[int, list[int]] = field(default_factory=dict)
    read_bytes: int = 0
    write_bytes: int = 0


def item_costs(items_per_rank, lookup, src_itemsize) -> tuple[list[list[int]], list[list[int]]]:
    """Bytes read and written per write item, per Megatron rank."""
    read, write = [], []
    for items in items_per_rank:
        r, w = [], []
        for it in items:
            if it.type.name == "BYTE_IO":
                r.append(0)
                w.append(EXTRA_STATE_BYTES)
                continue
            m, c = lookup[(it.index.fqn, tuple(it.index.offset))]
            r.append(m.chunk_read_bytes(c, src_itemsize(m)))
            w.append(math.prod(c.sizes) * it.tensor_data.properties.dtype.itemsize)
        read.append(r)
        write.append(w)
    return read, write


def assign_megatron(read: list[list[int]], write: list[list[int]], processes: int) -> list[MegatronShare]:
    """Megatron ranks to processes by bytes read + written; chunk by chunk when ranks are fewer, or when whole
    ranks cannot be spread evenly (8 equal ranks over 3 processes: 3/3/2, the busiest 12% above the mean)."""
    if len(read) >= processes:
        costs = [sum(r) + sum(w) for r, w in zip(read, write)]
        bins = balance(costs, processes)
        loads = [sum(costs[r] for r in b) for b in bins]
        if max(loads) <= WHOLE_RANK_SLACK * sum(loads) / processes:
            return [MegatronShare(ranks=b, read_bytes=sum(sum(read[r]) for r in b),
                                  write_bytes=sum(sum(write[r]) for r in b)) for b in bins]
    shares = [MegatronShare() for _ in range(processes)]
    flat = [(r, i) for r in range(len(read)) for i in range(len(read[r]))]
    for p, picked in enumerate(balance([read[r][i] + write[r][i] for r, i in flat], processes)):
        for k in picked:
            r, i = flat[k]
            shares[p].subset.setdefault(r, []).append(i)
            shares[p].read_bytes += read[r][i]
            shares[p].write_bytes += write[r][i]
    return shares


def hf_shard_costs(shards, megatron_bytes, out_itemsize) -> tuple[list[int], list[int]]:
    """Bytes read (the stored Megatron tensors) and written (the HF tensors) per safetensors shard."""
    read = [sum(megatron_bytes(m) for m in shard) for shard in shards]
    write = [sum(math.prod(s) * out_itemsize(m) for m in shard for s in m.hf_shapes) for shard in shards]
    return read, write


def plan_conversion(path, processes: int, tp: int = 1, pp: int = 1, direction: str = "hf-to-megatron",
                    dtype="keep", max_shard_size="5GB") -> dict:
    """Per-process assignment and bytes read/written, from a config alone (full-size models, no weights).

    The source dtype is the config's torch_dtype (bf16 if absent); the Megatron side is taken at TP/PP
    (for megatron-to-hf, TP only changes the stored vocabulary padding)."""
    if processes < 1:
        raise ConversionError("the number of processes must be at least 1")
    from ..describe import load_model_plan

    want = dtypes.parse(dtype, keep=True)
    plan = load_model_plan(path)
    require_layout(plan, tp, pp)
    try:
        src = dtypes.from_config(plan.torch_dtype)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    out = want or src
    report = {"source": str(path), "direction": direction, "processes": processes, "tp": tp, "pp": pp,
              "source_dtype": dtypes.config_name(src), "output_dtype": dtypes.config_name(out)}
    per = []
    if direction == "hf-to-megatron":
        maps = bind(plan, tp, pp)
        items, lookup = megatron_write_items(maps, tp, pp, lambda m: out)
        read, write = item_costs(items, lookup, lambda m: src.itemsize)
        shares = assign_megatron(read, write, processes)
        report["granularity"] = "chunk" if any(s.subset for s in shares) else "megatron-rank"
        report["megatron_ranks"] = len(items)
        for p, s in enumerate(shares):
            row = {"rank": p, "read_bytes": s.read_bytes, "write_bytes": s.write_bytes}
            if s.subset:
                row["chunks_of_megatron_ranks"] = {str(r): len(v) for r, v in sorted(s.subset.items())}
            else:
                row["megatron_ranks"] = s.ranks
            per.append(row)
    elif direction == "megatron-to-hf":
        stored = {m.megatron: m for m in bind(plan, tp, 1)}  # stored shapes: vocab padded for this TP
        maps = bind(plan)
        _, shards = plan_hf_shards(maps, lambda m: out, parse_size(max_shard_size))
        read, write = hf_shard_costs(shards, lambda m: math.prod(stored[m.megatron].shape) * src.itemsize,
                                     lambda m: out.itemsize)
        report["granularity"] = "safetensors-shard"
        report["shards"] = len(shards)
        for p, picked in enumerate(balance([r + w for r, w in zip(read, write)], processes)):
            per.append({"rank": p, "shards": [k + 1 for k in picked], "read_bytes": sum(read[k] for k in picked),
                        "write_bytes": sum(write[k] for k in picked)})
    else:
        raise ConversionError(f"direction must be hf-to-megatron or megatron-to-hf, got {direction!r}")
    report["per_rank"] = per
    report["total_read_bytes"] = sum(r["read_bytes"] for r in per)
    report["total_write_bytes"] = sum(r["write_bytes"] for r in per)
    loads = [r["read_bytes"] + r["write_bytes"] for r in per]
    report["max_over_mean"] = max(loads) / (sum(loads) / len(loads)) if sum(loads) else 1.0
    return report
