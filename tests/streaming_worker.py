"""Test-only torchrun worker for the in-memory streaming API: for each (plan, Megatron checkpoint, HF dir),
model A is loaded from the Megatron checkpoint with megatron's own `dist_checkpointing.load`, model B from the
HF directory with `load_hf_weights`; every rank records whether its B parameters equal A's bit for bit, and
rank 0 saves what `export_hf_weights` yields from A (every rank iterates, as the API requires)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hetero_convert.megatron.model import build_model, load_checkpoint
from hetero_convert.megatron.parallel import session
from hetero_convert.megatron.streaming import export_hf_weights, load_hf_weights
from hetero_convert.megatron.worker import read_plan


def main() -> None:
    tp, pp, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    cases = json.loads(sys.argv[4])
    with session(tp, pp, "cpu"):
        rank = dist.get_rank()
        for name, case in cases.items():
            plan = read_plan(case["plan"])
            a = build_model(plan, tp, pp, "bf16", "cpu")
            load_checkpoint(a, case["megatron"])
            b = build_model(plan, tp, pp, "bf16", "cpu")
            filled = load_hf_weights(b, plan, case["hf"])
            sa, sb = a.state_dict(), b.state_dict()
            differ = [k for k, v in sa.items() if isinstance(v, torch.Tensor) and k in sb
                      and v.is_floating_point() and not torch.equal(v, sb[k])]
            exported = dict(export_hf_weights(a, plan, dtype=torch.bfloat16))
            mine = dict(export_hf_weights(a, plan, all_ranks=False))
            torch.save({"filled": filled, "differ": differ, "params": len(list(b.parameters())),
                        "mine": sorted(mine), "all": sorted(exported)}, out / f"{name}_rank{rank}.pt")
            if rank == 0:
                torch.save(exported, out / f"{name}_exported.pt")
            del a, b


if __name__ == "__main__":
    main()
