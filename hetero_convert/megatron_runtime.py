"""Run the real megatron-core GPTModel of a plan, on CPU (gloo) or GPU (nccl), forward-only.

This is how the project checks a converted Megatron checkpoint: the very `GPTModel` megatron-core builds
from our heterogeneous config loads the torch_dist directory through `dist_checkpointing.load`, at any
(TP, PP), and produces logits (and per-layer hidden states) that are compared against HF. Nothing here
re-implements a megatron layer; the only code of our own is the launch, the masks and the gathering.

Typical use is through torchrun, one process per rank (see `run_under_torchrun` and `_mcore_worker.py`):

    init_parallel(tp, pp, device)
    model = build_model(plan, tp, pp, "fp32", device)
    load_checkpoint(model, ckpt_dir)
    out = forward_logits(model, input_ids, attention_mask, plan=plan, hidden=True)   # rank 0 only
    destroy_parallel()

CPU patches (`apply_cpu_patches`, applied by `init_parallel` only when device == "cpu")
------------------------------------------------------------------------------------------
megatron-core 0.16.1 assumes a GPU in a few places that a CPU-only forward still reaches. Each patch is
the smallest change that makes one of them run, and none changes arithmetic. Each was checked to be
necessary by leaving it out: without 1, 3 the forward fails; without 2, the save; without 4, a PP>1
forward; without 5, building a tied-embedding model at PP>1.

1. `torch.cuda.current_device()` returns `torch.device("cpu")`. megatron allocates with
   `device=torch.cuda.current_device()` all over: the global memory buffer attention uses for its score
   matrix, RoPE's `inv_freq`, pipeline p2p shape tensors, dist-checkpointing's exchange tensors. On a
   CPU-only torch the real call raises "Torch not compiled with CUDA"; returning the CPU device puts all
   of those tensors in host memory, where the gloo backend wants them anyway.
2. `torch.cuda.synchronize()` is a no-op: `dist_checkpointing.save` calls it while staging tensors
   (strategies/filesystem_async.py), as do batched p2p and process-group timeout updates; there is
   nothing to wait for on CPU (the real call raises).
3. `CudaRNGStatesTracker.fork()` is a no-op context manager. Attention dropout is wrapped in
   `get_cuda_rng_tracker().fork()` even with dropout 0, and fork swaps CUDA generator states
   (`torch.cuda.get_rng_state`, which raises). Forward-only inference uses no randomness, so there is
   no RNG stream to keep separate per TP rank. (`model_parallel_cuda_manual_seed` is likewise replaced
   by `_cpu_manual_seed`, because the tracker's `add` reads the CUDA generator too.)
4. The pipeline schedules create their token counter with `torch.zeros([], device="cuda")`, a literal
   device rather than `current_device()`, so patch 1 does not reach it. We give the schedules module
   (and only it) a view of `torch` whose `zeros` maps device "cuda" to "cpu".
5. `LanguageModule.setup_embeddings_and_output_layer` runs with `Tensor.cuda()` returning the tensor
   unchanged. With tied embeddings and PP > 1 the last stage holds a copy of the word embeddings that
   this method moves to the GPU (`weight.data.cuda()`) before all-reducing it with the first stage's.
   Only inside this one method, so no other `.cuda()` call is silently kept on the CPU.
Not patches but configuration, done by `spec.megatron_config(cpu=True)`: all fused kernels off and
`use_cpu_initialization=True`; here we add `batch_p2p_comm=False` for PP on gloo (gloo has no batched
p2p). And not patched but avoided: megatron's default causal mask is created with device="cuda"
(`transformer/utils.py: get_default_causal_mask`), so `forward_logits` always passes an explicit mask.

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
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .plan import ModelPlan
from .spec import DTYPES, build_gpt_model, megatron_config, te_available

# Where the package lives, so that a torchrun child can import it even when it is not pip-installed.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)

_CPU_PATCHED = False


# ---- CPU patches ---------------------------------------------------------------------------------------


class _CpuTorchForSchedules(types.ModuleType):
    """`torch` as seen by megatron's pipeline schedules: identical, except that `zeros(..., device="cuda")`
    allocates on the CPU (patch 4 in the module docstring). A module subclass, so `isinstance` checks and
    attribute access inside the schedules keep working through `__getattr__`."""

    def __init__(self, real):
        super().__init__(real.__name__)
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def zeros(self, *args, **kwargs):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return self._real.zeros(*args, **kwargs)


def apply_cpu_patches() -> None:
    """Make megatron-core 0.16.1 run on a CPU-only host. Idempotent; see the module docstring for why
    each patch is needed. Only call it in processes that run megatron on the CPU: it redirects
    `torch.cuda.current_device()` for the whole process."""
    global _CPU_PATCHED
    if _CPU_PATCHED:
        return
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mcore_random

    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu  # 1
    torch.cuda.synchronize = lambda device=None: None  # 2
    mcore_random.CudaRNGStatesTracker.fork = (  # 3
        lambda self, name=None: contextlib.nullcontext()
    )
    if not isinstance(schedules.torch, _CpuTorchForSchedules):  # 4
        schedules.torch = _CpuTorchForSchedules(torch)
    setup = LanguageModule.setup_embeddings_and_output_layer  # 5
    if not getattr(setup, "_cpu_patched", False):
        def setup_on_cpu(self, *args, **kwargs):
            real_cuda = torch.Tensor.cuda
            torch.Tensor.cuda = lambda t, *a, **k: t
            try:
                return setup(self, *args, **kwargs)
            finally:
                torch.Tensor.cuda = real_cuda

        setup_on_cpu._cpu_patched = True
        LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu
    _CPU_PATCHED = True


def _cpu_manual_seed(seed: int) -> None:
    """The CPU counterpart of `model_parallel_cuda_manual_seed`.

    With `use_cpu_initialization` megatron draws each full weight from the *CPU* generator on every TP rank
    and keeps its own slice, so the ranks must use the same CPU seed to slice the same weight (a random
    init still differs between PP layouts: each stage draws only its own layers). The tracker still gets its named states (as CPU generator states) so that code asking whether
    it is initialised, or for a name, finds one; `fork` itself is patched to do nothing.
    """
    from megatron.core.tensor_parallel import random as mcore_random

    torch.manual_seed(seed)
    mcore_random.initialize_rng_tracker(force_reset=True)
    tracker = mcore_random.get_cuda_rng_tracker()
    names = (mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME,
             mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME)
    tracker.set_states({n: torch.Generator().manual_seed(seed + k).get_state() for k, n in enumerate(names)})


# ---- process groups ------------------------------------------------------------------------------------


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_parallel(tp: int = 1, pp: int = 1, device: str = "cpu", seed: int = 1234,
                  timeout_minutes: float = 10.0) -> None:
    """torch.distributed + megatron's model-parallel groups for (tp, pp).

    Under torchrun the world comes from its environment (a world larger than tp*pp adds data-parallel
    replicas, which compute the same logits). Outside torchrun only tp*pp == 1 is possible: a one-process
    world over an in-memory store, so tests and notebooks need no launcher.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cpu":
        apply_cpu_patches()
    backend = "gloo" if device == "cpu" else "nccl"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        if _under_torchrun():
            if device == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend, timeout=timeout)
        elif tp * pp == 1:
            if device == "cuda":
                torch.cuda.set_device(0)
            # HashStore: rendezvous of one process needs no port, so nothing can collide with another run.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            raise RuntimeError(f"TP={tp} x PP={pp} needs {tp * pp} processes: launch under torchrun "
                               "(see run_under_torchrun)")
    world = dist.get_world_size()
    if world % (tp * pp):
        raise RuntimeError(f"world size {world} is not a multiple of TP*PP = {tp * pp}")

    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # gloo side groups are only for the distributed optimizer; on nccl they would only cost start-up time.
    parallel_state.initialize_model_parallel(tp, pp, create_gloo_process_groups=device == "cpu")
    manual_seed(seed, device)


def manual_seed(seed: int, device: str = "cpu") -> None:
    """Seed what megatron's weight init draws from: the CPU generator on CPU (same on every rank),
    megatron's per-TP-rank CUDA streams on GPU. Call before `build_model` for a reproducible random init."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if device == "cpu":
        _cpu_manual_seed(seed)
    else:
        model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Undo `init_parallel` (megatron's groups, then the default process group)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- model ---------------------------------------------------------------------------------------------


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]


def build_model(plan: ModelPlan, tp: int, pp: int, dtype: str | torch.dtype = "fp32", device: str = "cpu",
                **config_overrides):
    """This rank's GPTModel stage (eval mode, on `device`). `init_parallel(tp, pp, device)` must have run.

    The local (non-TE) spec is used unless the device is CUDA and transformer-engine imports; both write
    and read the same dist-checkpoint keys (MEGATRON_MAPPING.md §3). `config_overrides` go to
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


def training_run_common_state(plan: ModelPlan, iteration: int = 100) -> dict:
    """The non-sharded entries a Megatron-LM training run of this heterogeneous model saves (its argparse
    namespace as `args`, with the HF config it was given by --heterogeneous-layers-config-path kept as
    `heterogeneous_layers_config_encoded_json`), so tests can make checkpoints that look like a run's."""
    import argparse

    args = argparse.Namespace(
        heterogeneous_layers_config_encoded_json=json.dumps(plan.hf_config()),
        hidden_size=plan.hidden_size, num_attention_heads=plan.num_attention_heads, num_layers=plan.num_layers,
        vocab_size=plan.vocab_size, untie_embeddings_and_output_weights=not plan.tie_word_embeddings,
        normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
    )
    return {"args": args, "iteration": iteration, "checkpoint_version": 3.0}


# ---- forward -------------------------------------------------------------------------------------------


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


# ---- launching -----------------------------------------------------------------------------------------


def _log_excerpt(path: Path, chars: int = 6000) -> str:
    """The first worker traceback (the root cause; torchrun's own traceback that follows only says that a
    child failed), then the end of the log."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    tail = "\n".join(lines[-25:])
    start = next((i for i, l in enumerate(lines) if "Traceback (most recent call last)" in l), None)
    if start is None:
        return tail[-chars:]
    # torchrun prefixes a worker's lines with "[rankN]: "; the traceback ends where that prefix stops, or
    # (unprefixed) at its first unindented line, the exception message.
    prefix = lines[start][: lines[start].index("Traceback")]
    block = [lines[start]]
    for line in lines[start + 1:]:
        body = line[len(prefix):]
        if not line.startswith(prefix):
            break
        block.append(line)
        if not prefix and body and not body[0].isspace():
            break
    cause = "\n".join(block[-40:])
    return f"{cause}\n[...]\n{tail}"[-chars:]


def run_under_torchrun(args: Sequence[str], nproc: int, timeout: float = 600.0,
                       log_file: str | Path | None = None, env: dict | None = None,
                       module: str = "hetero_convert._mcore_worker") -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m <module> *args`.

    Output goes to a file, not a pipe: megatron's dist-checkpoint save leaves a spawned Manager process
    that holds inherited pipe ends open, so reading a pipe to EOF can wait forever. The run gets its own
    process group, so a timeout kills torchrun *and* its workers. Raises RuntimeError with the log's tail
    on failure or timeout; the CompletedProcess carries the log text as `stdout`.
    """
    if log_file is None:
        fd, name = tempfile.mkstemp(prefix="mcore_torchrun_", suffix=".log")
        os.close(fd)
        log_file = name
    log_path = Path(log_file)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *map(str, args)]
    run_env = dict(os.environ if env is None else env)
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, run_env.get("PYTHONPATH")) if p)
    # One thread per rank: the ranks already share the cores (torchrun sets this too, but only with a
    # warning, and not for a single process).
    run_env.setdefault("OMP_NUM_THREADS", "1" if nproc > 1 else str(os.cpu_count() or 1))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=run_env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # The group id is torchrun's own pid (new session): this reaches exactly the processes we started.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"torchrun timed out after {timeout:.0f}s: {' '.join(cmd)}\n"
                               f"--- log tail ({log_path}) ---\n{_log_excerpt(log_path)}") from None
    if rc != 0:
        raise RuntimeError(f"torchrun failed with exit code {rc}: {' '.join(cmd)}\n"
                           f"--- log tail ({log_path}) ---\n{_log_excerpt(log_path)}")
    return subprocess.CompletedProcess(cmd, rc, stdout=log_path.read_text(errors="replace"), stderr=None)
