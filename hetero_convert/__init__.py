"""hetero-convert: heterogeneous (Nemotron-NAS / DeciLM) checkpoints between HuggingFace and Megatron-Core.

The public API (docs/api.md has runnable examples):

    load_plan, check_layout                 config.json -> per-layer plan; which TP/PP layouts it allows
    hf_to_megatron, megatron_to_hf          streaming conversions (any TP/PP; under torchrun, split over ranks)
    megatron_to_megatron                    a Megatron checkpoint re-chunked for another TP/PP, not through HF
    plan_conversion                         who does what in a conversion over N processes, from a config alone
    verify                                  HF model vs megatron-core's GPTModel on the same tokens
    prune                                   a smaller heterogeneous model chosen by measurement
    export_hf_weights, load_hf_weights      a live megatron-core model <-> HF tensors, in memory (RL refits)
    HeteroConvertError and its subclasses   every refusal; ProgressCallback: what `progress=` receives

The flow, module by module: plan (config.json -> per-layer plan, with kinds/ for what each sub-block kind
means) -> layout (TP/PP feasibility) -> spec (megatron-core config and layer specs) -> mappings (declarative
HF<->Megatron tables) -> io (safetensors and DCP readers and writers, checkpoint formats) -> convert ->
verify / prune. Importing this package is cheap: torch, megatron-core and transformers load on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol

from .errors import (CheckpointError, ConversionError, HeteroConvertError, JobFailed, LayoutError, PlanError,
                     PruneError, VerifyError)

if TYPE_CHECKING:
    import torch

    from .convert import Summary
    from .layout import LayoutReport
    from .plan import ModelPlan
    from .parity import ParityReport

__version__ = "0.1.0"


class ProgressCallback(Protocol):
    """What the conversions' `progress=` receives: called with the bytes of every chunk written (from writer
    threads). An object may also have `set_total(nbytes)`, called once the total is known."""

    def __call__(self, nbytes: int) -> None: ...


def load_plan(source: str | Path | dict) -> "ModelPlan":
    """The per-layer plan of a config.json path, a checkpoint directory or a config dict; PlanError if the
    config cannot be represented."""
    from .plan import load_plan as _load_plan

    return _load_plan(source)


def check_layout(plan: "ModelPlan", tp: int = 1, pp: int = 1) -> "LayoutReport":
    """Whether `plan` can be sharded at (tp, pp): every violation by layer and tensor, the padded vocabulary and
    the parameter-balanced pipeline split. Never raises for an infeasible layout (`report.ok` says)."""
    from .layout import check_layout as _check_layout

    return _check_layout(plan, tp, pp)


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1,
                   dtype: "torch.dtype | None" = None, workers: int = 1, overwrite: bool = False,
                   strict: bool = False, checksums: bool = True, progress: ProgressCallback | None = None,
                   distributed: bool | None = None, megatron_core: str = "any") -> "Summary":
    """A HF checkpoint -> a Megatron torch_dist checkpoint laid out as a run at (tp, pp) writes it.

    `dtype`: None keeps the source's. `strict`: refuse NaN/Inf weights (else a warning in the summary).
    `checksums`: record the source files' sha256 in the checkpoint's description. `distributed`: None = split
    the work over the processes when torchrun started several, True/False to force. `megatron_core`: the
    megatron-core that will load it, "any" (default: loads in 0.16 .. 0.19), "0.16", "0.17", "0.18" (common.pt
    only) or "0.19" (0.19's common_state object only). Raises a `HeteroConvertError` subclass, having written
    nothing, when the input is refused."""
    from .convert import hf_to_megatron as _run

    return _run(hf_dir, out_dir, tp=tp, pp=pp, dtype=dtype, workers=workers, overwrite=overwrite, strict=strict,
                checksums=checksums, progress=progress, distributed=distributed, megatron_core=megatron_core)


def megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path, *, max_shard_size: str | int = "5GB",
                   dtype: "torch.dtype | None" = None, tokenizer_from: str | Path | None = None, workers: int = 1,
                   overwrite: bool = False, strict: bool = False, progress: ProgressCallback | None = None,
                   distributed: bool | None = None, schema: str = "auto",
                   verify_integrity: bool = True) -> "Summary":
    """A Megatron torch_dist checkpoint (ours, or a training run's, saved at any TP/PP by megatron-core 0.16 ..
    0.19) -> a HF checkpoint: sharded safetensors, config.json (DeciLM with regenerated block_configs and remote
    code, Llama for a Llama, a Puzzletron child in its own schema; `schema` picks another), and the tokenizer
    from `tokenizer_from`. A training run's optimizer, RNG and scheduler state is never read.
    `verify_integrity`: check megatron's integrity.json when the folder has one (this reads every file it
    lists, optimizer state included). Other options as for `hf_to_megatron`."""
    from .convert import megatron_to_hf as _run

    return _run(megatron_dir, out_dir, max_shard_size=max_shard_size, dtype=dtype, tokenizer_from=tokenizer_from,
                workers=workers, overwrite=overwrite, strict=strict, progress=progress, distributed=distributed,
                schema=schema, verify_integrity=verify_integrity)


def megatron_to_megatron(megatron_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1,
                         dtype: "torch.dtype | None" = None, workers: int = 1, overwrite: bool = False,
                         strict: bool = False, progress: ProgressCallback | None = None,
                         distributed: bool | None = None, megatron_core: str = "any") -> "Summary":
    """A Megatron torch_dist checkpoint (ours, or a training run's, at any TP/PP) re-chunked for (tp, pp) without
    going through HF: the same files `hf_to_megatron` at that layout writes from the same weights. A homogeneous
    run's stacked layers come out per layer. Options as for `hf_to_megatron`."""
    from .convert import megatron_to_megatron as _run

    return _run(megatron_dir, out_dir, tp=tp, pp=pp, dtype=dtype, workers=workers, overwrite=overwrite,
                strict=strict, progress=progress, distributed=distributed, megatron_core=megatron_core)


def plan_conversion(path: str | Path, processes: int, *, tp: int = 1, pp: int = 1,
                    direction: str = "hf-to-megatron", dtype: "torch.dtype | None" = None,
                    max_shard_size: str | int = "5GB") -> dict:
    """Which process of a conversion over `processes` does what, and the bytes each reads and writes."""
    from .convert import plan_conversion as _plan

    return _plan(path, processes, tp=tp, pp=pp, direction=direction, dtype=dtype, max_shard_size=max_shard_size)


def verify(hf_dir: str | Path, megatron_dir: str | Path, *, tp: int = 1, pp: int = 1, device: str = "cpu",
           dtype: str = "fp32", prompts: str | Path | None = None, batch: int = 2, seq_len: int = 32,
           seed: int = 0, thresholds: dict | None = None, workdir: str | Path | None = None) -> "ParityReport":
    """Run the HF model and megatron-core's GPTModel (at tp x pp, launched with torchrun unless this process
    is already one of tp*pp ranks) on the same tokens and judge its logits against the fp64 HF model; on
    failure the report names the first layer that differs. `report.ok` is the verdict; under your own torchrun
    every rank returns the same report."""
    from .parity import verify as _verify

    return _verify(Path(hf_dir), Path(megatron_dir), tp=tp, pp=pp, device=device, dtype=dtype,
                   prompts=Path(prompts) if prompts else None, batch=batch, seq_len=seq_len, seed=seed,
                   thresholds=thresholds, workdir=Path(workdir) if workdir else None)


def prune(src: str | Path, out: str | Path, calib_text: str, *, target: str, fraction: float, **options) -> dict:
    """Prune a Llama or DeciLM parent into a smaller DeciLM model whose `target` ("params", "kv_cache" or
    "flops") is at most `fraction` of the parent's; returns the report (also written to OUT). `options` are
    those of `hetero_convert.pruning.prune`."""
    from .pruning import prune as _prune

    return _prune(src, out, calib_text, target=target, fraction=fraction, **options)


def export_hf_weights(model, plan: "ModelPlan", *, all_ranks: bool = True,
                      dtype: "torch.dtype | None" = None) -> Iterator[tuple[str, "torch.Tensor"]]:
    """(HF name, tensor) for every weight of a live megatron-core GPTModel of `plan`, gathered over TP one
    tensor at a time (see megatron/streaming.py); every rank of the model's groups must iterate."""
    from .megatron.streaming import export_hf_weights as _export

    return _export(model, plan, all_ranks=all_ranks, dtype=dtype)


def load_hf_weights(model, plan: "ModelPlan", source) -> list[str]:
    """Fill this rank's parameters of a live megatron-core GPTModel from a HF checkpoint directory (or a
    {name: tensor} dict), reading only this rank's chunks; returns the checkpoint keys filled."""
    from .megatron.streaming import load_hf_weights as _load

    return _load(model, plan, source)


__all__ = ["CheckpointError", "ConversionError", "HeteroConvertError", "JobFailed", "LayoutError", "PlanError",
           "ProgressCallback", "PruneError", "VerifyError", "check_layout", "export_hf_weights", "hf_to_megatron",
           "load_hf_weights", "load_plan", "megatron_to_hf", "megatron_to_megatron", "plan_conversion", "prune", "verify", "__version__"]
