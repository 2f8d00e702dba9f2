"""HF safetensors <-> Megatron torch_dist, streaming, one tensor chunk at a time, over any number of processes.

    to_megatron.py  the HF -> Megatron job: checks, Megatron write items, chunks read on demand
    to_hf.py        the Megatron -> HF job: checks, planned shards, tensors cut into their HF tensors
    reshard.py      the Megatron -> Megatron job: another TP/PP (or dtype), one source tensor read at a time
    assign.py       who does what over P processes (byte-balanced), and `plan_conversion` from a config alone
    driver.py       the one driver: a job over a torch.distributed world (a single process is a world of one)
    common.py       the summary, errors from writer threads, the NaN/Inf check, sizes

Nothing is ever half-written in place: output goes to a hidden sibling directory that is renamed into place
only when everything succeeded, and is deleted on any failure (io/staging.py).
"""

from ..errors import ConversionError, JobFailed
from .assign import plan_conversion
from .common import Summary, parse_size
from .driver import hf_to_megatron, megatron_to_hf, megatron_to_megatron

__all__ = ["ConversionError", "JobFailed", "Summary", "hf_to_megatron", "megatron_to_hf", "megatron_to_megatron", "parse_size",
           "plan_conversion"]
