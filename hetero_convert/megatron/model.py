"""megatron-core's GPTModel of a plan: built for this rank's stage, loaded from / saved to a torch_dist
checkpoint, run forward-only. Nothing here re-implements a megatron layer; the only code of our own is the masks
and the gathering of logits and per-layer outputs to rank 0.

Other pitfalls handled here:
- The model must be called with `runtime_gather_output=True`: GPTModel's default `parallel_output=True`
  returns each TP rank's vocab slice.
- The vocabulary is padded to a multiple of 128*TP; the padded rows load as zeros (or anything) and are
  stripped from the returned logits.
- `dist_checkpointing.save` starts a multiprocessing *spawn* Manager that only shuts down at normal
  interpreter exit; so `run_under_torchrun` writes output to a file, never a pipe, and workers exit
  normally.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..dtypes import SHORT as DTYPES
from ..plan import ModelPlan
from ..spec import build_gpt_model, megatron_config, te_available


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]


def build_model(plan: ModelPlan, tp: int, pp: int, dtype: str | torch.dtype = "fp32", device: str = "cpu",
                **config_overrides):
    """This rank's GPTModel stage (eval mode, on `device`). `init_parallel(tp, pp, device)` must have run.

    The local (non-TE) spec is used unless the device is CUDA and transformer-engine imports; both write
    and read the same dist-checkpoint keys (the local spec maps its module names onto TE's through
    `sharded_state_dict_keys_map`). `config_overrides` go to
    `spec.megatron_config` (e.g. `init_method_std` for random-init fixtures).
    """
    from megatron.core import parallel_state

    cpu = device == "cpu"
    if cpu:
        # gloo has no batched isend/irecv; megatron's p2p falls back to single isend/irecv with this off.
        config_overrides.setdefault("batch_p2p_comm", False)
    config = megatron_config(plan, tp, pp, params_dtype=_dtype(dtype), cpu=cpu, **config_overrides)
    model = build_gpt_model(
        plan, config,
        use_te=(not cpu) and te_available(),
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
    )
    if not cpu:
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    model.eval()
    return model


def load_checkpoint(model, ckpt_dir: str | Path, strict: str = "raise_unexpected") -> None:
    """Load a torch_dist directory into `model` (any TP/PP), failing on any key the model needs.

    megatron's words are the reverse of the usual ones: an "unexpected" key is one the *model* requests
    that the checkpoint lacks. "raise_unexpected" therefore fails, naming them, when a weight or an
    `_extra_state` object is missing. Checkpoint entries the model does not request are ignored by
    megatron (use "raise_all" to fail on those too; note the TE superset `core_attention._extra_state`
    is such an entry for the local spec). The word-embedding and output-layer rows beyond the true vocab
    (padding to 128*TP) are allowed to be absent: megatron loads them with a shape mismatch allowed.
    """
    from megatron.core import dist_checkpointing

    requested = model.sharded_state_dict()
    state = dist_checkpointing.load(requested, str(ckpt_dir), strict=strict)
    # megatron merges common.pt into the result; a Megatron-LM checkpoint (or ours) keeps `iteration`,
    # `checkpoint_version`, `args` there. Only what the model asked for is model state.
    state = {k: v for k, v in state.items() if k in requested}
    # strict=True: a parameter megatron's load did not fill must fail, not keep its random init. (The
    # sharded dict does not request `output_layer._extra_state`; megatron's linear layers default-fill
    # absent `_extra_state` entries in a load pre-hook, so strict mode does not trip over it.)
    model.load_state_dict(state, strict=True)


def save_checkpoint(model, ckpt_dir: str | Path, common: dict | None = None) -> None:
    """megatron's own save (torch_dist): used to make reference checkpoints from a random init.

    `common` entries (not sharded) go to common.pt beside the model's state, as Megatron-LM's training loop
    stores its `args`, `iteration` and `checkpoint_version` there. Must run inside `if __name__ == "__main__":`
    of a torchrun worker that exits normally: the async writer leaves a spawn Manager that is shut down at
    interpreter exit.
    """
    from megatron.core import dist_checkpointing

    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    state = model.sharded_state_dict()
    state.update(common or {})
    dist_checkpointing.save(state, str(ckpt_dir))



def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _masks(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, device: torch.device):
    """(input_ids, position_ids, mask) for megatron: mask is bool [b, 1, s, s], True = masked.

    Padding is on the right only (so position ids are plain 0..s-1, as in HF). Padded keys are masked for
    every query; a padded query still sees the real tokens before it, so no row of the softmax is fully
    masked (which would give NaNs or a uniform average). Padded token ids are replaced by 0, so that a pad
    id outside the vocabulary (e.g. -100) cannot fail the embedding lookup. Logits at padded positions are
    meaningless: compare only where attention_mask is 1.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    b, s = input_ids.shape
    ids = input_ids.to(torch.long)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).expand(b, 1, s, s)
    if attention_mask is not None:
        valid = attention_mask.to(torch.bool)
        if valid.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(valid.shape)} != input_ids shape {tuple(ids.shape)}")
        lengths = valid.sum(dim=1)
        if not torch.equal(valid, torch.arange(s)[None, :] < lengths[:, None]):
            raise ValueError("attention_mask must be right-padded (ones, then zeros) in every row")
        if (lengths == 0).any():
            raise ValueError("attention_mask has a row with no tokens")
        ids = torch.where(valid, ids, torch.zeros_like(ids))
        mask = mask | ~valid[:, None, None, :]
    position_ids = torch.arange(s, dtype=torch.long).expand(b, s)
    return ids.to(device), position_ids.to(device), mask.contiguous().to(device)


def _decoder_layers(model):
    return list(model.decoder.layers)


@contextlib.contextmanager
def _capture_layer_outputs(model, store: dict[int, torch.Tensor]):
    """Forward hooks on each TransformerLayer of this stage: store[global 0-based index] = [b, s, h] fp32.

    `layer_number` is megatron's 1-based *global* number (offset by the pipeline stage), so the keys line
    up with the plan's layer indices and HF's `model.layers[i]` whatever the layout.
    """
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        store[module.layer_number - 1] = hidden.detach().transpose(0, 1).float().cpu()

    handles = [layer.register_forward_hook(hook) for layer in _decoder_layers(model)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _is_contributor() -> bool:
    """One copy per pipeline stage: TP ranks hold identical (gathered) logits and hidden states, and
    data-parallel replicas identical everything."""
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


def _gather_to_rank0(obj: Any) -> list | None:
    """Every rank's `obj` (None from non-contributors) as a list on global rank 0; None elsewhere.

    Object collectives work on both gloo and nccl (nccl stages them through the current CUDA device).
    """
    if dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   config=None, *, plan: ModelPlan | None = None, vocab_size: int | None = None,
                   hidden: bool = False):
    """Forward-only logits of the whole (TP/PP-sharded) model, on global rank 0.

    Every rank must call it with the same `input_ids` [b, s] (and right-padded `attention_mask`).
    Returns, on global rank 0, float32 CPU logits [b, s, vocab] with the vocab padding stripped to
    `vocab_size` (or `plan.vocab_size`); with `hidden=True`, a tuple (logits, {global layer index (0-based):
    layer output [b, s, h] fp32}). Other ranks return None.
    """
    from megatron.core import parallel_state

    config = config or model.config
    if vocab_size is None and plan is not None:
        vocab_size = plan.vocab_size
    device = _model_device(model)
    ids, pos, mask = _masks(input_ids, attention_mask, device)
    layers: dict[int, torch.Tensor] = {}
    capture = _capture_layer_outputs(model, layers) if hidden else contextlib.nullcontext()

    with torch.no_grad(), capture:
        if config.pipeline_model_parallel_size == 1:
            logits = model(ids, pos, mask, runtime_gather_output=True)
        else:
            logits = _pipeline_forward(model, ids, pos, mask, config)

    mine = None
    if _is_contributor():
        mine = {"layers": layers}
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            logits = logits.float().cpu()
            mine["logits"] = logits[..., :vocab_size] if vocab_size else logits
    gathered = _gather_to_rank0(mine)
    if gathered is None:
        return None
    parts = [g for g in gathered if g is not None]
    out_logits = next(p["logits"] for p in parts if "logits" in p)
    if not hidden:
        return out_logits
    all_layers: dict[int, torch.Tensor] = {}
    for p in parts:
        all_layers.update(p["layers"])
    return out_logits, dict(sorted(all_layers.items()))


def _pipeline_forward(model, ids, pos, mask, config):
    """One micro-batch through megatron's own pipeline schedule; returns the logits on the last stage
    (None elsewhere). The schedule sends activations of shape [s, b, h] in `config.pipeline_dtype`."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, stage_model):
        batch = next(data_iterator)
        # Every stage gets the mask and positions (RoPE runs per layer); only the first uses the ids.
        out = stage_model(batch["ids"], batch["pos"], batch["mask"], runtime_gather_output=True)
        # collect_non_loss_data: the schedule stores whatever this returns, on the last stage.
        return out, lambda output, non_loss_data=False: output

    b, s = ids.shape
    store = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([{"ids": ids, "pos": pos, "mask": mask}]),
        model=[model],
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=b,
        forward_only=True,
        collect_non_loss_data=True,
    )
    return store[0] if store else None
