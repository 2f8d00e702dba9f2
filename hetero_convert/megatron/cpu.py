"""megatron-core on a CPU-only host: the patches, applied only inside `cpu_patches()` and undone on exit.

megatron-core (every supported version, 0.16.1 .. 0.19.x) assumes a GPU in a few places that a CPU-only
forward still reaches. Each patch is the smallest change that makes one of them run, and none changes
arithmetic. Each was checked to be necessary by leaving it out, under 0.16.1 and under 0.19.2: without 1, 3
the forward fails; without 2, the save; without 4, a PP>1 forward; without 5, building a tied-embedding model
at PP>1. The same five apply, unchanged, to every supported version: `compat.CPU_PATCHES` names them (the one
place a version that needs another set would say so), and `_apply` applies exactly those.

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
   by `cpu_manual_seed`, because the tracker's `add` reads the CUDA generator too.)
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

The patches replace process-wide things (`torch.cuda.current_device`, a method of megatron's RNG tracker), so
they are a context manager: the Megatron worker applies them around its work, and everything they replaced is
restored when the block ends; nested blocks are no-ops.
"""

from __future__ import annotations

import contextlib
import threading
import types

import torch

from .compat import CPU_PATCHES

_LOCK = threading.Lock()
_DEPTH = 0
_SAVED: dict = {}  # patch name -> (owner, attribute, original value)


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


def _setup_on_cpu(setup):
    def setup_on_cpu(self, *args, **kwargs):
        real_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t
        try:
            return setup(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = real_cuda

    return setup_on_cpu


def _patches() -> dict:
    """name -> (owner, attribute, replacement): the patches of the module docstring, numbered as there."""
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mcore_random

    cpu = torch.device("cpu")
    return {
        "current_device": (torch.cuda, "current_device", lambda: cpu),  # 1
        "synchronize": (torch.cuda, "synchronize", lambda device=None: None),  # 2
        "rng_fork": (mcore_random.CudaRNGStatesTracker, "fork",
                     lambda self, name=None: contextlib.nullcontext()),  # 3
        "schedules_cuda_zeros": (schedules, "torch", _CpuTorchForSchedules(schedules.torch)),  # 4
        "embedding_setup_cuda": (LanguageModule, "setup_embeddings_and_output_layer",
                                 _setup_on_cpu(LanguageModule.setup_embeddings_and_output_layer)),  # 5
    }


def _apply() -> None:
    patches = _patches()
    for name in CPU_PATCHES:
        owner, attr, replacement = patches[name]
        _SAVED[name] = (owner, attr, getattr(owner, attr))
        setattr(owner, attr, replacement)


def _restore() -> None:
    for owner, attr, original in _SAVED.values():
        setattr(owner, attr, original)
    _SAVED.clear()


def patches_active() -> bool:
    return _DEPTH > 0


@contextlib.contextmanager
def cpu_patches():
    """Run megatron-core on the CPU inside this block (see the module docstring for each patch)."""
    global _DEPTH
    with _LOCK:
        if _DEPTH == 0:
            _apply()
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _restore()


def cpu_manual_seed(seed: int) -> None:
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
