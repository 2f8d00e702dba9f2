"""Per-layer plan -> megatron-core's heterogeneous config, layer specs and GPTModel.

Everything here goes through megatron-core's own heterogeneous support
(`HeterogeneousTransformerConfig`, `get_gpt_heterogeneous_layer_spec`); we only add what it lacks:
  - we feed it block configs in its *native* keys (num_query_groups / ffn_hidden_size), generated from our
    plan, so its parser never sees a partial dict or has to pop `n_heads_in_group`;
  - we pass the llama3 rope factor explicitly (megatron's builders default it to 8, wrong for Ultra-253B and
    Super-v1.5, whose factor is 16);
  - the pipeline split that balances parameters (layout.py), in megatron's first/last-stage terms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layout import PipelineSplit, padded_vocab_size, require_layout
from .errors import PlanError
from .megatron.compat import describe as describe_module, te_available
from .plan import GQA, SWIGLU, ModelPlan

GQA_QK_NORM = "gqa_qk_norm"


def megatron_config(
    plan: ModelPlan,
    tp: int = 1,
    pp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    cpu: bool = False,
    split: PipelineSplit | None = None,
    **overrides,
):
    """The HeterogeneousTransformerConfig that describes `plan` at (tp, pp)."""
    from megatron.core.transformer.heterogeneous.heterogeneous_config import HeterogeneousTransformerConfig

    # A caller that passes `split` has already checked the layout (spec_table); otherwise check it here.
    split = split or require_layout(plan, tp, pp).split
    # Global defaults for fields megatron requires; every layer overrides them from its own block config.
    first_gqa = next((l.attention.num_kv_heads for l in plan.layers if l.attention.num_kv_heads),
                     plan.num_attention_heads)
    first_width = next((l.ffn.width for l in plan.layers if l.ffn.kind == SWIGLU), 4 * plan.hidden_size)
    kwargs = dict(
        num_layers=plan.num_layers,
        hidden_size=plan.hidden_size,
        num_attention_heads=plan.num_attention_heads,
        num_query_groups=first_gqa,
        kv_channels=plan.head_dim,
        ffn_hidden_size=first_width,
        normalization="RMSNorm",
        layernorm_epsilon=plan.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        num_layers_in_first_pipeline_stage=split.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=split.num_layers_in_last_pipeline_stage,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        heterogeneous_layers_config_encoded_json=json.dumps({"block_configs": plan.megatron_block_configs()}),
        qk_layernorm=qk_layernorm(plan),
    )
    if cpu:
        # No fused CUDA kernels on CPU, and weights must be created in host memory.
        kwargs.update(
            use_cpu_initialization=True,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
        )
    kwargs.update(overrides)
    return HeterogeneousTransformerConfig(**kwargs)


def qk_layernorm(plan: ModelPlan) -> bool:
    """megatron-core's `qk_layernorm`, which holds for every softmax-attention layer or none: per-head q/k
    RMSNorm (Qwen3) in all of them, or in none."""
    has = {l.attention.kind == GQA_QK_NORM for l in plan.layers if l.attention.kind in (GQA, GQA_QK_NORM)}
    if len(has) > 1:
        raise PlanError("some attention layers have per-head q/k RMSNorm and others do not: megatron-core's "
                        "qk_layernorm is one setting for every layer")
    return has == {True}


def layer_specs(config, use_te: bool | None = None, pp_rank: int | None = None):
    """megatron-core's per-layer specs (the TE spec when megatron-core finds Transformer Engine usable, else the
    local one). Their form depends on the version: read them through megatron/compat.py's `describe`."""
    from megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs import get_gpt_heterogeneous_layer_spec

    if use_te is None:
        use_te = te_available()
    return get_gpt_heterogeneous_layer_spec(config, use_te=use_te, pp_rank=pp_rank)


@dataclass
class GPTArgs:
    """The GPTModel constructor arguments that come from the plan rather than the config."""

    vocab_size: int
    max_sequence_length: int
    rotary_base: float
    rope_scaling: bool
    rope_scaling_factor: float
    share_embeddings_and_output_weights: bool


def gpt_args(plan: ModelPlan, tp: int) -> GPTArgs:
    return GPTArgs(
        vocab_size=padded_vocab_size(plan.vocab_size, tp),
        max_sequence_length=plan.max_position_embeddings,
        rotary_base=plan.rope_theta,
        rope_scaling=plan.rope_scaling is not None,
        rope_scaling_factor=plan.rope_factor or 8.0,
        share_embeddings_and_output_weights=plan.tie_word_embeddings,
    )


def build_gpt_model(plan: ModelPlan, config, use_te: bool | None = None, pre_process: bool = True,
                    post_process: bool = True):
    """megatron-core's GPTModel for this rank's pipeline stage (parallel state must be initialised)."""
    from megatron.core.models.gpt import GPTModel

    a = gpt_args(plan, config.tensor_model_parallel_size)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_specs(config, use_te),
        vocab_size=a.vocab_size,
        max_sequence_length=a.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=a.share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=a.rotary_base,
        rope_scaling=a.rope_scaling,
        rope_scaling_factor=a.rope_scaling_factor,
    )


def spec_table(plan: ModelPlan, tp: int = 1, pp: int = 1, use_te: bool = False) -> list[dict]:
    """Per-layer megatron module classes, built by megatron-core from the full config, no weights allocated."""
    split = require_layout(plan, tp, pp).split
    config = megatron_config(plan, tp, pp, cpu=True, split=split)
    # Build the whole list (pp_rank=0 with PP=1 semantics would slice it): ask per stage and concatenate.
    rows = []
    for stage, rng in enumerate(split.stage_ranges()):
        block = layer_specs(config, use_te, pp_rank=stage)
        assert len(block.layer_specs) == len(rng), (len(block.layer_specs), rng)
        for i, ls in zip(rng, block.layer_specs):
            s = ls.submodules
            rows.append({
                "layer": i,
                "stage": stage,
                "input_layernorm": describe_module(s.input_layernorm),
                "self_attention": describe_module(s.self_attention),
                "pre_mlp_layernorm": describe_module(s.pre_mlp_layernorm),
                "mlp": describe_module(s.mlp),
                "num_query_groups": config.per_block_parameters[i].attention.num_query_groups,
                "ffn_hidden_size": config.per_block_parameters[i].mlp.ffn_hidden_size,
            })
    return rows
