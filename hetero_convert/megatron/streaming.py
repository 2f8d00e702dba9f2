"""Weights between a live megatron-core GPTModel and HF tensors, in memory, with no checkpoint written.

RL and online-distillation loops train in Megatron and generate with an inference engine (vLLM, SGLang) that
wants HF tensors: after each step they stream the policy's weights across, one tensor at a time. The other way,
a training run starts from HF weights without writing a Megatron checkpoint first.

Both functions work at any TP/PP, on GPU or CPU, from every rank of the model's process groups, and use the same
mapping objects as the file converters (mappings.py), so they are bit-exact with them (tested at TP2 x PP2):

    for name, tensor in export_hf_weights(model, plan):      # every rank of the job, model order
        engine.load_weights([(name, tensor)])                  # one tensor resident at a time
    load_hf_weights(model, plan, "/path/to/hf_checkpoint")     # each rank reads only its own chunks

The model must be megatron-core's GPTModel of `plan` (e.g. `megatron.model.build_model`, or a training run's own
built from the same heterogeneous config). Which stage holds which layer is read from the model itself, so a
pipeline split other than ours works too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from ..mappings import DictSource, TensorMapping, TensorSource, bind
from ..plan import ModelPlan


def _local_tensors(model) -> dict[str, torch.Tensor]:
    """{checkpoint key: this rank's tensor} for every weight the model holds on this rank (the keys are the
    torch_dist checkpoint's, whichever spec built the model; a swiglu fc1 is the rank's [gate; up])."""
    out = {}
    for key, obj in model.sharded_state_dict().items():
        data = getattr(obj, "data", None)
        if isinstance(data, torch.Tensor) and not key.endswith("_extra_state"):
            out[getattr(obj, "key", key)] = data
    return out


def _groups():
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_group(),
            ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank())


def _mappings(plan: ModelPlan, tp: int) -> list[TensorMapping]:
    return bind(plan, tp=tp)


def load_hf_weights(model, plan: ModelPlan, source: str | Path | dict | TensorSource) -> list[str]:
    """Fill this rank's parameters of a live model from HF weights: a checkpoint directory (read lazily, only
    this rank's rows and columns), a {name: tensor} dict, or any `TensorSource`. Returns the checkpoint keys
    filled. Every weight the model holds on this rank must be covered, or nothing is changed and it raises."""
    from ..io.quantized import open_checkpoint

    if isinstance(source, (str, Path)):
        source = open_checkpoint(source)  # a ModelOpt FP8/NVFP4 checkpoint: dequantized on read
    elif isinstance(source, dict):
        source = DictSource(source)
    _, tp, tp_rank, _, _, _ = _groups()
    local = _local_tensors(model)
    by_key = {m.megatron: m for m in _mappings(plan, tp)}
    missing = sorted(k for k in local if k not in by_key)
    if missing:
        raise ValueError(f"the model holds weights the plan has no mapping for: {missing[:5]}")
    staged = {}
    for key, target in local.items():
        m = by_key[key]
        t = _vocab_slice(m, source, tp_rank, target) if m.vocab_padded else m.read_local(source, tp, tp_rank, target.dtype)
        if t.shape != target.shape:
            raise ValueError(f"{key}: the plan gives this rank {tuple(t.shape)}, the model holds {tuple(target.shape)}")
        staged[key] = t
    with torch.no_grad():
        for key, t in staged.items():
            local[key].copy_(t)
    return sorted(staged)


def _vocab_slice(m: TensorMapping, source, tp_rank: int, target: torch.Tensor) -> torch.Tensor:
    """A vocab-parallel rank's rows: the real vocabulary rows it holds, then zeros for the padding (however the
    model padded its vocabulary)."""
    rows = target.shape[0]
    out = torch.zeros(target.shape, dtype=source.dtype_of(m.hf[0]))
    start = tp_rank * rows
    real = max(0, min(rows, m.vocab_rows - start))
    if real:
        source.read_into(out[:real], m.hf[0], start)
    return out.to(target.dtype)


def export_hf_weights(model, plan: ModelPlan, all_ranks: bool = True,
                      dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every weight of a live model, in model order, gathered over tensor parallelism
    one Megatron tensor at a time. With `all_ranks`, every rank yields every tensor (each pipeline stage's
    tensors are broadcast to the others); otherwise each rank yields its own stage's. Every rank of the
    model's groups must iterate to the end (the gathers are collective). The tensors are on the model's device,
    in `dtype` (default: each weight's own; megatron keeps norms in fp32 beside bf16 matrices on some
    backends); vocab padding is stripped."""
    tp_group, tp, _, pp_group, pp, pp_rank = _groups()
    local = _local_tensors(model)
    maps = _mappings(plan, tp)
    # Which stage holds each key, from the model itself (a tied output layer on the last stage is a copy of the
    # embedding: the first stage's is the one exported).
    mine = {key: str(t.dtype).removeprefix("torch.") for key, t in local.items()}
    held = [None] * pp
    if pp > 1:
        dist.all_gather_object(held, mine, group=pp_group)
    else:
        held = [mine]
    owner, dtype_of = {}, {}
    for stage in reversed(range(pp)):
        for key, dtype_name in held[stage].items():
            owner[key], dtype_of[key] = stage, getattr(torch, dtype_name)
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp > 1 else None
    device = next(iter(local.values())).device if local else torch.device("cpu")
    for m in maps:
        stage = owner.get(m.megatron)
        if stage is None:
            raise ValueError(f"no pipeline stage of the model holds {m.megatron}")
        tensors: list[torch.Tensor] | None = None
        if stage == pp_rank:
            part = local[m.megatron].detach()
            if tp > 1 and m.tp_rule != "replicated":
                pieces = [torch.empty_like(part) for _ in range(tp)]
                dist.all_gather(pieces, part.contiguous(), group=tp_group)
            else:
                pieces = [part]
            full = m.assemble(pieces)
            tensors = [t.contiguous() for t in ([full[:m.vocab_rows]] if m.vocab_padded else m.to_hf(full))]
        if all_ranks and pp > 1:
            if tensors is None:
                tensors = [torch.empty(s, dtype=dtype_of[m.megatron], device=device) for s in m.hf_shapes]
            for t in tensors:
                dist.broadcast(t, src=pp_ranks[stage], group=pp_group)
        if tensors is not None:
            yield from ((k, t if dtype is None else t.to(dtype)) for k, t in zip(m.hf, tensors))
