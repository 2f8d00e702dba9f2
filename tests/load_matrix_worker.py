"""Test-only torchrun worker (one process): megatron-core's own `dist_checkpointing.load` of several checkpoints
of one plan into its GPTModel, each attempt recorded, failures included (a folder a version cannot load must
fail there, not end the launch), and the logits of each one that loads.

    python -m load_matrix_worker SPEC.json
SPEC: {"plan": CONFIG_OR_PLAN.json, "inputs": IDS.pt, "result": RESULT.json, "cases": {name: [ckpt, logits.pt]}}
RESULT: {"version": [major, minor, patch], "cases": {name: "ok" or "Type: first line <- its context's ..."}}
"""

from __future__ import annotations

import json
import sys

import torch

from hetero_convert.megatron.compat import installed_version
from hetero_convert.megatron.model import build_model, forward_logits, load_checkpoint
from hetero_convert.megatron.parallel import session
from hetero_convert.megatron.worker import read_inputs, read_plan


def _chain(e: BaseException | None):
    """The exception and those it was raised while handling (megatron 0.16 fails on a missing common.pt, then
    again in its error path)."""
    while e is not None:
        yield f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        e = e.__cause__ or e.__context__


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    plan = read_plan(spec["plan"])
    ids, mask = read_inputs(spec["inputs"])
    results = {}
    with session(1, 1, "cpu"):
        for name, (ckpt, out) in spec["cases"].items():
            try:
                model = build_model(plan, 1, 1, "fp32", "cpu")
                load_checkpoint(model, ckpt)
                torch.save({"logits": forward_logits(model, ids, mask, plan=plan)}, out)
                results[name] = "ok"
            except Exception as e:  # noqa: BLE001 - recorded: the test says which failures it expects
                results[name] = " <- ".join(_chain(e))
    with open(spec["result"], "w") as f:
        json.dump({"version": installed_version(), "cases": results}, f)


if __name__ == "__main__":
    main()
