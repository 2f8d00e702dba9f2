"""What `inspect` reports about a model, as data: per-layer kinds and counts, totals, and whether a TP/PP
layout is possible. Needs only a config or a Megatron checkpoint's description (no weights, no torch), so it
answers in well under a second for full-size models."""

from __future__ import annotations

from pathlib import Path

from .layout import check_layout, feasible_tp, pipeline_options, rope_violations
from .plan import ModelPlan, load_plan


def describe_model(plan: ModelPlan, tp: int = 1, pp: int = 1, source: str = "") -> dict:
    report = check_layout(plan, tp, pp)
    split = report.split
    layers = []
    for layer in plan.layers:
        layers.append({
            "layer": layer.index,
            "attention": layer.attention.kind,
            "kv_heads": layer.attention.num_kv_heads,
            "ffn": layer.ffn.kind,
            "ffn_width": layer.ffn.width,
            "parameters": plan.layer_parameters(layer)["total"],
            "stage": split.stage_of_layer(layer.index) if split else None,
        })
    kinds = plan.kind_counts()
    return {
        "source": source,
        "source_format": plan.source_format,
        "num_layers": plan.num_layers,
        "hidden_size": plan.hidden_size,
        "num_attention_heads": plan.num_attention_heads,
        "head_dim": plan.head_dim,
        "vocab_size": plan.vocab_size,
        "tie_word_embeddings": plan.tie_word_embeddings,
        "rope_theta": plan.rope_theta,
        "rope_scaling": plan.rope_scaling,
        "parameters": plan.num_parameters(),
        "non_embedding_parameters": plan.num_parameters(include_embeddings=False),
        "kv_cache_bytes_per_token_bf16": plan.kv_cache_bytes_per_token(2),
        "counts": {
            "gqa_attention": kinds["attention gqa"] + kinds.get("attention gqa_qk_norm", 0),
            "linear_attention": kinds["attention linear"],
            "no_attention": kinds["attention none"],
            "swiglu_ffn": kinds["ffn swiglu"],
            "linear_ffn": kinds["ffn linear"],
            "no_ffn": kinds["ffn none"],
            "dummy_layers": kinds["dummy"],
        },
        "layers": layers,
        "layout": {
            "tp": tp, "pp": pp, "ok": report.ok,
            "padded_vocab_size": report.padded_vocab_size,
            "violations": [{"layer": v.layer, "tensor": v.tensor, "reason": v.reason} for v in report.violations],
            "problems": report.grouped(),
            "layers_per_stage": split.layers_per_stage if split else None,
            "params_per_stage": split.params_per_stage if split else None,
            "num_layers_in_first_pipeline_stage": split.num_layers_in_first_pipeline_stage if split else None,
            "num_layers_in_last_pipeline_stage": split.num_layers_in_last_pipeline_stage if split else None,
        },
        "feasible_tp": [] if rope_violations(plan) else feasible_tp(plan),
        "pipeline_options": pipeline_options(plan),
    }


def load_model_plan(path: str | Path) -> ModelPlan:
    """The plan of whatever names a model: a config.json, a HF checkpoint directory, or a Megatron checkpoint
    (its root or iteration folder; ours, or a training run's)."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file():
        from .io.megatron_checkpoint import is_megatron_checkpoint, iteration_dir, read_plan

        if is_megatron_checkpoint(p):
            return read_plan(iteration_dir(p))
    return load_plan(p)


def describe_path(path: str | Path, tp: int = 1, pp: int = 1) -> dict:
    plan = load_model_plan(path)
    d = describe_model(plan, tp, pp, str(path))
    scheme = quantization_of(path)
    if scheme is not None:  # a ModelOpt FP8/NVFP4 checkpoint: its format per layer, stored and dequantized sizes
        from .quantization import describe_quantization

        d["quantization"] = q = describe_quantization(plan, scheme)
        for row, layer in zip(d["layers"], q["layers"]):
            row["weights"] = layer["weights"]
    return d


def quantization_of(path: str | Path):
    """The ModelOpt quantization a HF checkpoint directory (or its config.json) declares, else None."""
    from .plan import config_path, load_config
    from .quantization import read_quantization

    p = Path(path)
    cfg = config_path(p)
    if not cfg.is_file():
        return None  # a Megatron checkpoint: always unquantized
    return read_quantization(load_config(cfg), cfg.parent)
