"""The errors the library raises on purpose. Every one of them is a refusal with a message meant for a person
(naming the file, layer or tensor involved), never a bug: the CLI prints the message alone, and anything that
is not a `HeteroConvertError` is a bug that deserves its traceback.

This module imports nothing heavy: `inspect` and the CLI's early checks use it before torch is loaded.
"""

from __future__ import annotations


class HeteroConvertError(ValueError):
    """Base class: an input, option or environment this tool refuses, with the reason."""


class PlanError(HeteroConvertError):
    """A config that cannot be planned. The message names the layer (0-based) where one is involved."""


class LayoutError(HeteroConvertError):
    """A TP/PP layout the plan cannot be sharded into; `report` lists every violation."""

    def __init__(self, report):
        super().__init__(report.message())
        self.report = report


class CheckpointError(HeteroConvertError):
    """A checkpoint that cannot be read as it claims to be."""


class ConversionError(HeteroConvertError):
    """The input cannot be converted; the message lists what is missing, left over or wrong."""


class JobFailed(ConversionError):
    """Some process of a distributed job failed; every process raises this same error."""


class VerifyError(HeteroConvertError):
    """verify cannot run on these inputs (different models, bad options, a failed Megatron job)."""


class PruneError(HeteroConvertError):
    """prune cannot run on these inputs or options."""


OUT_OF_MEMORY_ADVICE = "fewer --workers, or a machine with more memory"


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is a failed allocation rather than a bad input or a full disk: Python's MemoryError, torch's
    CPU allocator (a RuntimeError that names it), CUDA's OutOfMemoryError, or an OSError with ENOMEM."""
    import errno

    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    if isinstance(e, OSError):
        return e.errno == errno.ENOMEM
    return isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e)
