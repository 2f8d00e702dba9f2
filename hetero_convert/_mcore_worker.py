"""torchrun worker: load Megatron checkpoints into megatron-core's GPTModel and write logits from rank 0.

    python -m torch.distributed.run --standalone --nproc-per-node TP*PP -m hetero_convert._mcore_worker \
        --plan-json PLAN.json --ckpt DIR --tp 2 --pp 2 --dtype fp32 --device cpu \
        --input-ids INPUT.pt --out OUT.pt [--hidden]

Usually started through `megatron_runtime.run_under_torchrun`. Several checkpoints of the same layout can
be evaluated in one launch (`--plan-json A B --ckpt A B --out A B`, paired by position): starting torchrun
and importing megatron costs more than a tiny model's forward, so tests batch their variants this way.

INPUT.pt holds either an int tensor [batch, seq] or a dict {"input_ids": ..., "attention_mask": ...}
(right padding). OUT.pt gets {"logits": fp32 [batch, seq, vocab], "hidden": {layer index: [b, s, h]}
(with --hidden), "tp", "pp", "dtype"}.

`--save-random SEED` first builds the model with a seeded random init and saves it to --ckpt with megatron's
own `dist_checkpointing.save` (then loads it back like any other checkpoint): a way to get reference
Megatron checkpoints without any converter, chunked at --tp/--pp as a run at that layout chunks them.
`--training-args` adds what a Megatron-LM training run keeps in common.pt (its args, with the HF config).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import megatron_runtime as rt
from .plan import ModelPlan, load_plan


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


def _randomise_norms(model, seed: int) -> None:
    """Norm weights start as ones; make them differ per layer so that a norm loaded into the wrong place
    (or not at all) changes the logits. Same draw on every rank: norms are replicated across TP."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "layernorm" in name or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan-json", nargs="+", required=True)
    ap.add_argument("--ckpt", nargs="+", required=True)
    ap.add_argument("--out", nargs="+", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dtype", default="fp32", choices=sorted(rt.DTYPES))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--input-ids", required=True)
    ap.add_argument("--hidden", action="store_true", help="also write per-layer hidden states")
    ap.add_argument("--strict", default="raise_unexpected", help="megatron StrictHandling value for the load")
    ap.add_argument("--save-random", type=int, default=None, metavar="SEED",
                    help="build a seeded random model, save it to --ckpt, then evaluate it from there")
    ap.add_argument("--init-std", type=float, default=None, help="init_method_std for --save-random")
    ap.add_argument("--training-args", action="store_true",
                    help="with --save-random: also store a Megatron-LM training run's args in common.pt")
    args = ap.parse_args(argv)
    if not len(args.plan_json) == len(args.ckpt) == len(args.out):
        ap.error("--plan-json, --ckpt and --out need the same number of values")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    rt.init_parallel(args.tp, args.pp, args.device)
    try:
        input_ids, attention_mask = read_inputs(args.input_ids)
        for plan_path, ckpt, out in zip(args.plan_json, args.ckpt, args.out):
            plan = read_plan(plan_path)
            if args.save_random is not None:
                rt.manual_seed(args.save_random, args.device)
                overrides = {} if args.init_std is None else {"init_method_std": args.init_std}
                model = rt.build_model(plan, args.tp, args.pp, args.dtype, args.device, **overrides)
                _randomise_norms(model, args.save_random)
                rt.save_checkpoint(model, ckpt, rt.training_run_common_state(plan) if args.training_args else None)
                del model
            model = rt.build_model(plan, args.tp, args.pp, args.dtype, args.device)
            rt.load_checkpoint(model, ckpt, strict=args.strict)
            result = rt.forward_logits(model, input_ids, attention_mask, plan=plan, hidden=args.hidden)
            if result is not None:  # global rank 0
                logits, hidden = result if args.hidden else (result, None)
                payload = {"logits": logits, "tp": args.tp, "pp": args.pp, "dtype": args.dtype}
                if hidden is not None:
                    payload["hidden"] = hidden
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                torch.save(payload, out)
            del model
    finally:
        rt.destroy_parallel()


if __name__ == "__main__":
    main()
