"""Who does what in a conversion over P processes: bytes read and written per unit of work, and a byte-balanced
assignment that every process computes identically (so no plan has to be sent around).

  hf-to-megatron and megatron-to-megatron: whole Megatron tensors (all their TP chunks, made from one read of
    their source) go to processes; each chunk is appended to a file of its Megatron rank, `__{rank}_{k}.distcp`
    (k per writer thread), or `__{rank}_p{p}_{k}.distcp` when several processes write (DCP finds data through
    `.metadata`, never by file name; a rank's files hold only that rank's chunks).
  megatron-to-hf: whole Megatron tensors go to processes; each writes its tensors' HF tensors at their planned
    offsets into the shard files the first process created (so many processes can share one 5 GB shard).
`plan_conversion` answers the same question from a config alone, for `hetero-convert plan-convert`.
"""

from __future__ import annotations

import math

from .. import dtypes
from ..errors import ConversionError
from ..layout import require_layout
from ..mappings import bind
from ..packing import balance
from .common import parse_size
from .to_hf import plan_hf_shards
from .to_megatron import TensorGroups, megatron_write_items



def tensor_costs(job) -> list[int]:
    """Bytes read and written per Megatron tensor (one group of write items each): the unit of work of
    hf-to-megatron and megatron-to-megatron over several processes."""
    maps = {m.megatron: m for m in job.maps}
    out = []
    for group in job.grouped.groups:
        chunked = [it for it in group if it.type.name != "BYTE_IO"]
        if not chunked:  # an object of its own (the common_state object): a few hundred bytes
            out.append(0)
            continue
        m = maps[chunked[0].index.fqn]
        out.append(job.read_bytes(m) + job.grouped.write_bytes(group))
    return out


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
        items, _ = megatron_write_items(maps, tp, pp, lambda m: out)
        groups = TensorGroups(maps, items).groups
        read = [sum(math.prod(s) for s in m.hf_shapes) * src.itemsize for m in maps]
        write = [TensorGroups.write_bytes(g) for g in groups]
        report["granularity"] = "tensor"
        report["megatron_ranks"] = len(items)
        for p, picked in enumerate(balance([r + w for r, w in zip(read, write)], processes)):
            per.append({"rank": p, "tensors": len(picked), "read_bytes": sum(read[k] for k in picked),
                        "write_bytes": sum(write[k] for k in picked)})
    elif direction == "megatron-to-hf":
        stored = {m.megatron: m for m in bind(plan, tp, 1)}  # stored shapes: vocab padded for this TP
        maps = bind(plan)
        shards = plan_hf_shards(maps, lambda m: out, parse_size(max_shard_size))
        read = [math.prod(stored[m.megatron].shape) * src.itemsize for m in maps]
        write = [sum(math.prod(s) for s in m.hf_shapes) * out.itemsize for m in maps]
        report["granularity"] = "tensor"
        report["shards"] = len(shards)
        for p, picked in enumerate(balance([r + w for r, w in zip(read, write)], processes)):
            per.append({"rank": p, "tensors": len(picked), "read_bytes": sum(read[k] for k in picked),
                        "write_bytes": sum(write[k] for k in picked)})
    else:
        raise ConversionError(f"direction must be hf-to-megatron or megatron-to-hf, got {direction!r}")
    report["per_rank"] = per
    report["total_read_bytes"] = sum(r["read_bytes"] for r in per)
    report["total_write_bytes"] = sum(r["write_bytes"] for r in per)
    loads = [r["read_bytes"] + r["write_bytes"] for r in per]
    report["max_over_mean"] = max(loads) / (sum(loads) / len(loads)) if sum(loads) else 1.0
    return report
