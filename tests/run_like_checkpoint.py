"""Test-only torchrun worker: a training run's checkpoint, as Megatron-LM's `save_checkpoint` lays it out, made by
megatron-core alone (0.16.1 ships no megatron.training; this runs under 0.16.1 and 0.19.x alike).

The model (bf16) is wrapped as a run wraps it (Float16Module, DistributedDataParallel with the distributed
optimizer), takes one real optimizer step (forward, backward, grad sync, Adam, scheduler), and the state dict is
assembled as Megatron-LM's `generate_state_dict` assembles it: `args`, `checkpoint_version`, `iteration`, the
unwrapped model's sharded state, the DistributedOptimizer's own `sharded_state_dict`, the scheduler, the rerun
state machine, an `rng_state` ShardedObject, the FLOP counter; saved with `dist_checkpointing.save` into
`iter_0000100/` beside the tracker file. Where the save writes the common state (common.pt, or 0.19's
common_state object) is megatron-core's own choice.

    --kind heterogeneous   our plan's HeterogeneousTransformerConfig model: per-layer keys; args carry the HF
                           config (heterogeneous_layers_config_encoded_json) and vocab_size
    --kind llama           megatron's standard local-spec GPTModel of a Llama plan: stacked layers
                           (decoder.layers.X [L, ...]); args as a Llama run stores them, padded_vocab_size only
    --integrity            also megatron's integrity.json (save(..., verify_integrity=True)), where it exists
    --model-only           the model and args alone, as a run with --no-save-optim --no-save-rng saves them
                           (benchmarks/training_run_export.py compares the two)

Then, with --out, the checkpoint is loaded by megatron itself into a fresh fp32 model of the same kind, and
rank 0 saves its logits for `--input-ids` to `--out`. usage (under torchrun, gloo):
    python -m run_like_checkpoint ROOT PLAN.json --kind K --tp N [--input-ids IDS.pt --out LOGITS.pt] [--integrity]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hetero_convert.megatron.model import build_model, forward_logits, load_checkpoint
from hetero_convert.megatron.parallel import session
from hetero_convert.megatron.worker import read_inputs, read_plan
from hetero_convert.plan import ModelPlan
from hetero_convert.spec import gpt_args


class CudaToCpu(TorchFunctionMode):
    """The optimizer path allocates with a literal device="cuda" and checks `Tensor.type()` against
    'torch.cuda.FloatTensor' (optimizer.py, distrib_optimizer.py, clip_grads.py, utils.py): here, the CPU
    answers. A test harness for the training step only; product code never trains."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cuda":
            kwargs["device"] = "cpu"
        if getattr(func, "__name__", "") == "type" and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


class _NoStream:
    def wait_event(self, *a):
        pass

    def wait_stream(self, *a):
        pass


def llama_model(plan: ModelPlan, tp: int, dtype: torch.dtype):
    """megatron's standard GPTModel (local spec) of a Llama plan: what a Megatron-LM Llama run trains."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    layer = plan.layers[0]
    config = TransformerConfig(
        num_layers=plan.num_layers, hidden_size=plan.hidden_size, num_attention_heads=plan.num_attention_heads,
        num_query_groups=layer.attention.num_kv_heads, kv_channels=plan.head_dim, ffn_hidden_size=layer.ffn.width,
        normalization="RMSNorm", layernorm_epsilon=plan.rms_norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, batch_p2p_comm=False)
    a = gpt_args(plan, tp)
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=a.vocab_size, max_sequence_length=a.max_sequence_length,
                    share_embeddings_and_output_weights=a.share_embeddings_and_output_weights,
                    position_embedding_type="rope", rotary_base=a.rotary_base, rope_scaling=a.rope_scaling,
                    rope_scaling_factor=a.rope_scaling_factor)


def run_args(plan: ModelPlan, kind: str, tp: int, padded_vocab: int) -> argparse.Namespace:
    """The args a run of this model stores, by the names Megatron-LM 0.16 .. 0.19 give them (a real run has
    ~800; these are the model's, and a few others of the kinds it holds: a megatron enum, a dtype)."""
    from megatron.core.transformer.enums import AttnBackend

    layer = plan.layers[0]
    common = dict(
        num_layers=plan.num_layers, hidden_size=plan.hidden_size, num_attention_heads=plan.num_attention_heads,
        padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=128,
        untie_embeddings_and_output_weights=not plan.tie_word_embeddings, normalization="RMSNorm", swiglu=True,
        position_embedding_type="rope", add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        rotary_percent=1.0, rotary_interleaved=False, num_experts=None, multi_latent_attention=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, use_distributed_optimizer=True,
        ckpt_format="torch_dist", params_dtype=torch.bfloat16, bf16=True, fp16=False,
        attention_backend=AttnBackend.auto, seq_length=64, iteration=100)
    if kind == "heterogeneous":
        return argparse.Namespace(**common, heterogeneous_layers_config_encoded_json=json.dumps(plan.hf_config()),
                                  vocab_size=plan.vocab_size)
    # a run with a real tokenizer records only the padded vocabulary (vocab_size stays None)
    return argparse.Namespace(
        **common, vocab_size=None, heterogeneous_layers_config_encoded_json=None,
        group_query_attention=True, num_query_groups=layer.attention.num_kv_heads, kv_channels=plan.head_dim,
        ffn_hidden_size=layer.ffn.width, layernorm_epsilon=plan.rms_norm_eps, rotary_base=int(plan.rope_theta),
        use_rope_scaling=plan.rope_scaling is not None, rope_scaling_factor=plan.rope_factor or 8.0,
        max_position_embeddings=plan.max_position_embeddings)


def train_and_save(plan: ModelPlan, kind: str, tp: int, it_dir: str, integrity: bool, model_only: bool) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.rerun_state_machine import RerunMode, get_rerun_state_machine, initialize_rerun_state_machine
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.transformer.module import Float16Module

    model = build_model(plan, tp, 1, "bf16", "cpu") if kind == "heterogeneous" else llama_model(plan, tp, torch.bfloat16)
    model.train()
    config = model.config
    ddp = DistributedDataParallel(config=config, module=Float16Module(config, model),
                                  ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                                           use_distributed_optimizer=True))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True, params_dtype=torch.bfloat16,
                                                       use_distributed_optimizer=True), [ddp])
    sched = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=2,
                                    lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
                                    wd_incr_steps=10, wd_incr_style="constant")
    ids = torch.randint(0, plan.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    mask = torch.triu(torch.ones(16, 16, dtype=torch.bool), 1)[None, None]
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    ddp(ids, torch.arange(16)[None], mask, labels=ids).float().mean().backward()
    ddp.finish_grad_sync()
    optimizer.step()
    sched.step(increment=1)

    initialize_rerun_state_machine(mode=RerunMode.VALIDATE_RESULTS)
    meta = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}
    sd_meta = dict(meta, dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True))
    state = {"args": run_args(plan, kind, tp, model.vocab_size), "checkpoint_version": 3.0, "iteration": 100}
    state["model"] = model.sharded_state_dict(metadata=sd_meta)  # the unwrapped model, as a run saves it
    if model_only:
        _save(state, it_dir, meta, integrity)
        return
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=sd_meta)
    state["opt_param_scheduler"] = sched.state_dict()
    rerun = get_rerun_state_machine().state_dict(data_iterator=None, ckpt_format="torch_dist")
    if rerun:
        state["rerun_state_machine"] = rerun
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
           "rng_tracker_states": get_cuda_rng_tracker().get_states()}
    state["rng_state"] = ShardedObject("rng_state", [rng], (1, tp), (0, ps.get_tensor_model_parallel_rank()),
                                       replica_id=ps.get_data_parallel_rank(with_context_parallel=True))
    state["num_floating_point_operations_so_far"] = 123
    _save(state, it_dir, meta, integrity)


def _save(state: dict, it_dir: str, meta: dict, integrity: bool) -> None:
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(it_dir, exist_ok=True)
    torch.distributed.barrier()
    extra = {"verify_integrity": True} if integrity and "verify_integrity" in inspect.signature(
        dist_checkpointing.save).parameters else {}
    dist_checkpointing.save(state, it_dir, content_metadata=meta, **extra)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("plan")
    ap.add_argument("--kind", choices=["heterogeneous", "llama"], required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--input-ids")
    ap.add_argument("--out")
    ap.add_argument("--integrity", action="store_true")
    ap.add_argument("--model-only", action="store_true")
    args = ap.parse_args()
    plan = read_plan(args.plan)
    it_dir = os.path.join(args.root, "iter_0000100")
    with session(args.tp, 1, "cpu"):
        real_stream = torch.cuda.current_stream
        torch.cuda.current_stream = lambda *a, **k: _NoStream()  # param_and_grad_buffer's grad sync
        try:
            with CudaToCpu():
                train_and_save(plan, args.kind, args.tp, it_dir, args.integrity, args.model_only)
        finally:
            torch.cuda.current_stream = real_stream
        if torch.distributed.get_rank() == 0:
            with open(os.path.join(args.root, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write("100")
        torch.distributed.barrier()
        if args.out is None:
            return
        # What megatron itself loads from that checkpoint, computed in fp32.
        model = build_model(plan, args.tp, 1, "fp32", "cpu") if args.kind == "heterogeneous" \
            else llama_model(plan, args.tp, torch.float32).eval()
        load_checkpoint(model, it_dir)
        ids, mask = read_inputs(args.input_ids)
        logits = forward_logits(model, ids, mask, vocab_size=None)
        if logits is not None:
            torch.save({"logits": logits}, args.out)


if __name__ == "__main__":
    main()
