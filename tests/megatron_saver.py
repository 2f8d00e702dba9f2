"""Test-only torchrun worker: megatron-core itself builds a seeded random model of each plan and saves it with
`dist_checkpointing.save` (chunked at --tp/--pp as a run at that layout chunks it), optionally with what a
Megatron-LM training run keeps beside the model (its args); then the product worker evaluates it from there.
No converter is involved, so these checkpoints are independent references.

    run_under_torchrun([... worker args ..., "--save-random", SEED, "--init-std", 0.08, "--training-args"],
                       nproc, module="megatron_saver", extra_path=[tests_dir])
"""

from __future__ import annotations

import argparse
import json

import torch

from hetero_convert.megatron import model as mcore
from hetero_convert.megatron import worker
from hetero_convert.megatron.parallel import manual_seed
from hetero_convert.plan import ModelPlan


def training_run_common_state(plan: ModelPlan, iteration: int = 100) -> dict:
    """The non-sharded entries a Megatron-LM training run of this heterogeneous model saves (its argparse
    namespace as `args`, with the HF config it was given by --heterogeneous-layers-config-path kept as
    `heterogeneous_layers_config_encoded_json`)."""
    args = argparse.Namespace(
        heterogeneous_layers_config_encoded_json=json.dumps(plan.hf_config()),
        hidden_size=plan.hidden_size, num_attention_heads=plan.num_attention_heads, num_layers=plan.num_layers,
        vocab_size=plan.vocab_size, untie_embeddings_and_output_weights=not plan.tie_word_embeddings,
        normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
    )
    return {"args": args, "iteration": iteration, "checkpoint_version": 3.0}


def randomise_norms(model, seed: int) -> None:
    """Norm weights start as ones; make them differ per layer so that a norm loaded into the wrong place
    (or not at all) changes the logits. Same draw on every rank: norms are replicated across TP."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "layernorm" in name or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p))


def save_random(plan: ModelPlan, ckpt: str, args) -> None:
    manual_seed(args.save_random, args.device)
    overrides = {} if args.init_std is None else {"init_method_std": args.init_std}
    model = mcore.build_model(plan, args.tp, args.pp, args.dtype, args.device, **overrides)
    randomise_norms(model, args.save_random)
    mcore.save_checkpoint(model, ckpt, training_run_common_state(plan) if args.training_args else None)


def main(argv=None) -> None:
    ap = worker.parser()
    ap.add_argument("--save-random", type=int, required=True, metavar="SEED")
    ap.add_argument("--init-std", type=float, default=None, help="init_method_std of the random model")
    ap.add_argument("--training-args", action="store_true", help="also store a training run's args")
    worker.run(worker.parse_args(argv, ap), prepare=save_random)


if __name__ == "__main__":
    main()
