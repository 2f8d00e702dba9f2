"""Test-only entry point: the CLI, with one process of a torchrun job failing after it wrote its share of a
conversion (FAIL_RANK=k), to show the whole job fails cleanly and leaves nothing behind."""

from __future__ import annotations

import os

from hetero_convert.convert import driver
from hetero_convert.convert.to_hf import ToHFJob


def fail_after(fn):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        rank = os.environ.get("RANK")
        if rank == os.environ.get("FAIL_RANK"):
            raise RuntimeError(f"injected failure on rank {rank}")
        return out

    return wrapped


driver.write_groups = fail_after(driver.write_groups)  # hf-to-megatron: after this process's data files
ToHFJob.write_tensors = fail_after(ToHFJob.write_tensors)  # megatron-to-hf: after this rank's tensors

if __name__ == "__main__":
    from hetero_convert.cli import app

    app(prog_name="hetero-convert")
