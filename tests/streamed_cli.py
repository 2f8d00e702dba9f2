"""Test-only entry point: the CLI with every tensor that can stream streamed, whatever its size, through small
block buffers, so the tiny fixtures exercise the streamed paths under torchrun. Each
process says on stderr how many chunks and HF tensors it streamed ("streamed: N")."""

from __future__ import annotations

import atexit
import os

from hetero_convert.convert import to_hf, to_megatron
from hetero_convert.io import dcp, hf_checkpoint

to_megatron.STREAM_MIN_BYTES = to_hf.STREAM_MIN_BYTES = 0
dcp.BLOCK_BYTES = 96
to_hf.BLOCK_BYTES = 8000  # whole rows of the widest column strips of the fixtures (6656 bytes) fit
count = [0]


def counted(fn):
    def wrapped(*args, **kwargs):
        count[0] += 1
        return fn(*args, **kwargs)

    return wrapped


dcp.save_streamed = counted(dcp.save_streamed)
dcp.save_hole = counted(dcp.save_hole)
hf_checkpoint.ShardedWriter.write_streamed = counted(hf_checkpoint.ShardedWriter.write_streamed)
# one write of the whole line: the processes of a job share stderr, and print's two writes could interleave
atexit.register(lambda: os.write(2, f"streamed: {count[0]} (rank {os.environ.get('RANK')})\n".encode()))

if __name__ == "__main__":
    from hetero_convert.cli import app

    app(prog_name="hetero-convert")
