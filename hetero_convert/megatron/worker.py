"""torchrun worker: load Megatron checkpoints into megatron-core's GPTModel and write logits from rank 0.

    python -m torch.distributed.run --standalone --nproc-per-node TP*PP -m hetero_convert.megatron.worker \
        --plan-json PLAN.json --ckpt DIR --tp 2 --pp 2 --dtype fp32 --device cpu \
        --input-ids INPUT.pt --out OUT.pt [--hidden]

Usually started through `launch.run_under_torchrun`. Several checkpoints of the same layout can be evaluated
in one launch (`--plan-json A B --ckpt A B --out A B`, paired by position): starting torchrun and importing
megatron costs more than a tiny model's forward, so tests batch their variants this way.

INPUT.pt holds either an int tensor [batch, seq] or a dict {"input_ids": ..., "attention_mask": ...}
(right padding). OUT.pt gets {"logits": fp32 [batch, seq, vocab], "hidden": {layer index: [b, s, h]}
(with --hidden), "tp", "pp", "dtype"}.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..dtypes import SHORT as DTYPES
from ..plan import ModelPlan, load_plan
from .model import build_model, forward_logits, load_checkpoint
from .parallel import session


def read_plan(path: str | Path) -> ModelPlan:
    """A plan from either `ModelPlan.to_json()` output or any config.json form `load_plan` accepts."""
    data = json.loads(Path(path).read_text())
    if isinstance(data.get("layers"), list) and data["layers"] and isinstance(data["layers"][0], dict):
        return ModelPlan.from_json(data)
    return load_plan(data)


def read_inputs(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    data = torch.load(path, weights_only=True)
    if isinstance(data, dict):
        return data["input_ids"], data.get("attention_mask")
    return data, None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan-json", nargs="+", required=True)
    ap.add_argument("--ckpt", nargs="+", required=True)
    ap.add_argument("--out", nargs="+", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--input-ids", required=True)
    ap.add_argument("--hidden", action="store_true", help="also write per-layer hidden states")
    ap.add_argument("--strict", default="raise_unexpected", help="megatron StrictHandling value for the load")
    return ap


def parse_args(argv=None, ap: argparse.ArgumentParser | None = None):
    ap = ap or parser()
    args = ap.parse_args(argv)
    if not len(args.plan_json) == len(args.ckpt) == len(args.out):
        ap.error("--plan-json, --ckpt and --out need the same number of values")
    return args


def run(args, prepare: Callable[[ModelPlan, str, argparse.Namespace], None] | None = None) -> None:
    """Evaluate every (plan, checkpoint) pair; `prepare(plan, ckpt, args)` runs first for each, inside the
    megatron session (tests use it to save a reference checkpoint with megatron's own save)."""
    with session(args.tp, args.pp, args.device):
        input_ids, attention_mask = read_inputs(args.input_ids)
        for plan_path, ckpt, out in zip(args.plan_json, args.ckpt, args.out):
            plan = read_plan(plan_path)
            if prepare is not None:
                prepare(plan, ckpt, args)
            model = build_model(plan, args.tp, args.pp, args.dtype, args.device)
            load_checkpoint(model, ckpt, strict=args.strict)
            result = forward_logits(model, input_ids, attention_mask, plan=plan, hidden=args.hidden)
            if result is not None:  # global rank 0
                logits, hidden = result if args.hidden else (result, None)
                payload = {"logits": logits, "tp": args.tp, "pp": args.pp, "dtype": args.dtype}
                if hidden is not None:
                    payload["hidden"] = hidden
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                torch.save(payload, out)
            del model


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
