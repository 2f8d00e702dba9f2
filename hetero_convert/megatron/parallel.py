"""torch.distributed and megatron-core's model-parallel groups for a (TP, PP) layout, on GPU (nccl) or CPU
(gloo, inside `cpu_patches()`); `session` does both and undoes them."""

from __future__ import annotations

import contextlib
import datetime

import torch
import torch.distributed as dist

from ..launch import world
from .cpu import cpu_manual_seed, cpu_patches, patches_active


def init_parallel(tp: int = 1, pp: int = 1, device: str = "cpu", seed: int = 1234,
                  timeout_minutes: float = 10.0) -> None:
    """torch.distributed + megatron's model-parallel groups for (tp, pp).

    Under torchrun the world comes from its environment (a world larger than tp*pp adds data-parallel
    replicas, which compute the same logits). Outside torchrun only tp*pp == 1 is possible: a one-process
    world over an in-memory store, so tests and notebooks need no launcher.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cpu" and not patches_active():
        raise RuntimeError("megatron-core on the CPU runs inside `with cpu_patches():` (or `session(...)`)")
    backend = "gloo" if device == "cpu" else "nccl"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        env = world()
        if env.launched:
            if device == "cuda":
                torch.cuda.set_device(env.local_rank)
            dist.init_process_group(backend, timeout=timeout)
        elif tp * pp == 1:
            if device == "cuda":
                torch.cuda.set_device(0)
            # HashStore: rendezvous of one process needs no port, so nothing can collide with another run.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            raise RuntimeError(f"TP={tp} x PP={pp} needs {tp * pp} processes: launch under torchrun "
                               "(see launch.run_under_torchrun)")
    size = dist.get_world_size()
    if size % (tp * pp):
        raise RuntimeError(f"world size {size} is not a multiple of TP*PP = {tp * pp}")

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
        cpu_manual_seed(seed)
    else:
        model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Undo `init_parallel` (megatron's groups, then the default process group)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(tp: int = 1, pp: int = 1, device: str = "cpu", seed: int = 1234):
    """megatron-core ready to build models at (tp, pp) for this block: on CPU the patches too; on exit the
    process groups are destroyed and the patches undone."""
    with cpu_patches() if device == "cpu" else contextlib.nullcontext():
        init_parallel(tp, pp, device, seed)
        try:
            yield
        finally:
            destroy_parallel()
