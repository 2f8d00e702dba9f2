"""A chunk written through a small buffer instead of being held whole.

A DCP data file stores each chunk as one torch.save record. The plain way builds the chunk as a tensor, then
saves it: at TP=1 a chunk is a whole weight, often 100 MB or more, so every chunk is a fresh allocation
whose pages are faulted in as the source is read into them, and which has left the CPU caches again by the
time it is checked and written. On a machine with few cores that kernel work bounds the conversion.

When a chunk's bytes are plain copies of source byte ranges (same dtype, whole rows), it is written instead
as a record whose data is left as a hole (`torch.serialization.skip_data`, torch 2.5+, on an allocation
that is never touched), and the hole is then filled a block at a time: read a block of the source into one
reused buffer, look at it (the NaN/Inf check), write it at its place. The record's bytes are the ones
torch.save of the whole chunk writes. If torch cannot leave the hole, or the record is not the plain layout
`torch_record.tensor_span` recognises, the record is cut off again and the chunk written the plain way.

The TP chunks of a row-parallel weight are column strips of their source, so no block of one is a byte range
of it: each is a `HoleChunk`, whose record is written with its hole left open, and the producer then fills all
of a tensor's strips from one pass over the source's rows.

The other direction has the same cost and takes the same cure: a HF tensor whose bytes are row ranges of DCP
records (`dcp.StoredRows`) is a `StreamedChunk` too, written block by block into its place in a safetensors
file (`StreamingSafetensorsWriter.write_streamed`).
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .torch_record import FileRange, tensor_span

BLOCK_BYTES = 4 << 20  # per writer thread; a few blocks stay in a core's share of the last-level cache
# Smaller tensors are read whole: their allocations come from the heap, already mapped, and streaming them would
# add a pass over a record's header for nothing.
STREAM_MIN_BYTES = 1 << 20

# read(buf, start): fill the memoryview `buf` with the piece's bytes from `start` on; None: zeros
Reader = Callable[[memoryview, int], None] | None


@dataclass
class StreamedChunk:
    """A chunk of `shape` and `dtype` whose bytes are `pieces` in order, each (reader, length).

    `inspect(block)` sees every block (a tensor of `dtype`) before it is written. A reader that fails is
    reported to `failed(error)`, and the rest of the chunk is written as zeros (the record stays complete;
    the caller fails the job before anything is published). `unit`: every block a reader is asked for starts
    and ends on a multiple of it within its piece (whole rows, for a reader that gathers each row from several
    column strips); the buffer must hold at least one unit."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: list[tuple[Reader, int]]
    inspect: Callable[[torch.Tensor], None]
    failed: Callable[[BaseException], None]
    unit: int = 1

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.pieces)

    def blocks(self, buf: torch.Tensor):
        """Each block of the chunk's bytes, in order, read into `buf` (uint8): (byte offset, view of buf)."""
        raw = memoryview(buf.numpy())
        unit = math.lcm(self.unit, self.dtype.itemsize)  # (a block is inspected as elements of `dtype`)
        step = len(raw) // unit * unit
        if step == 0:
            raise ValueError(f"a block buffer of {len(raw)} bytes holds no unit of {unit} bytes")
        at, broken = 0, False
        for read, length in self.pieces:
            for start in range(0, length, step):
                n = min(step, length - start)
                if read is None or broken:
                    buf[:n].zero_()
                else:
                    try:
                        read(raw[:n], start)
                        self.inspect(buf[:n].view(self.dtype))
                    except Exception as e:  # noqa: BLE001 - reported through `failed`, the rest zeros
                        self.failed(e)
                        broken = True
                        buf[:n].zero_()
                yield at, raw[:n]
                at += n

    def materialize(self, buf: torch.Tensor | None = None) -> torch.Tensor:
        """The whole chunk as a tensor (the plain way), read through the same blocks (through `buf` if given)."""
        check_size(self)
        out = torch.empty(self.shape, dtype=self.dtype)
        flat = out.view(-1).view(torch.uint8)
        if buf is None:
            buf = torch.empty(max(math.lcm(self.unit, self.dtype.itemsize), min(BLOCK_BYTES, self.nbytes)),
                              dtype=torch.uint8)
        for at, block in self.blocks(buf):
            flat[at:at + len(block)].copy_(torch.frombuffer(block, dtype=torch.uint8))
        return out


def check_size(chunk: StreamedChunk) -> None:
    """The pieces are the chunk's bytes, exactly: fewer would leave bytes unwritten, more would spill."""
    if chunk.nbytes != math.prod(chunk.shape) * chunk.dtype.itemsize:
        raise ValueError(f"streamed chunk {list(chunk.shape)} {chunk.dtype}: its pieces hold {chunk.nbytes} bytes, "
                         f"not {math.prod(chunk.shape) * chunk.dtype.itemsize}")


@functools.cache
def can_stream() -> bool:
    """Whether this torch can leave the hole, can be told not to compute the record's CRC32 (which the writers
    turn off: a CRC computed over the hole would be the only byte that differs), and writes a record whose
    hole `tensor_span` finds. Decided once, up front: a streamed chunk is not counted in the writers' memory
    budget, so falling back to the whole chunk for every record would lift that cap unnoticed."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        return False
    if not (hasattr(torch.serialization, "skip_data") and hasattr(getattr(config, "save", None), "compute_crc32")):
        return False
    record = io.BytesIO()
    with torch.serialization.skip_data():
        torch.save(torch.empty((3, 5), dtype=torch.bfloat16), record)
    span = tensor_span(record, torch.bfloat16, (3, 5))
    return span is not None and span.nbytes == 30


def save_streamed(f, chunk: StreamedChunk, buf: torch.Tensor) -> None:
    """Append `chunk` to the open file `f` (opened for reading too, "w+b") as torch.save(tensor, f) would, with
    its CRC32 turned off (the caller's `dcp._without_crc32`)."""
    check_size(chunk)
    base = _record_with_hole(f, chunk.dtype, chunk.shape)
    if base is None:
        torch.save(chunk.materialize(), f)
        return
    for at, block in chunk.blocks(buf):
        pwrite_all(f.fileno(), block, base + at)


@dataclass
class HoleChunk:
    """A chunk whose record is written now with a hole for its data, which its producer fills later: the TP
    chunks of a row-parallel weight, filled together from one pass over the source's rows (a chunk's rows are
    strided in the source, so filling each on its own would read the source once per chunk). `save_hole` sets
    `hole` to (file descriptor, path, offset of the data); it stays None where torch's record is not the plain
    layout, and the chunk is then saved whole from `fallback()`."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    fallback: Callable[[], torch.Tensor]
    hole: tuple[int, str, int] | None = None


def save_hole(f, chunk: HoleChunk) -> None:
    """Append `chunk`'s record to `f` as `save_streamed` does, leaving its data to be filled."""
    base = _record_with_hole(f, chunk.dtype, chunk.shape)
    if base is None:
        torch.save(chunk.fallback(), f)
    else:
        chunk.hole = (f.fileno(), f.name, base)


def _record_with_hole(f, dtype: torch.dtype, shape: tuple[int, ...]) -> int | None:
    """torch.save's record of a tensor of `dtype` and `shape`, appended to `f` with its data left as a hole:
    where the data goes, or None (the record cut off again) when `tensor_span` does not find it."""
    start = f.tell()
    placeholder = torch.empty(shape, dtype=dtype)  # never touched: costs address space only
    with torch.serialization.skip_data():
        torch.save(placeholder, f)
    del placeholder
    f.flush()
    end = f.tell()
    span = tensor_span(FileRange(f, start, end - start), dtype, shape)
    if span is None:  # (a span found is the chunk's size: tensor_span checks it against dtype and shape)
        f.seek(start)
        f.truncate()
        return None
    return start + span.offset


def pwrite_all(fd: int, data, at: int) -> None:
    """Write all of `data` (any buffer) at offset `at` of `fd` (a positional write may write less than asked)."""
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], at + done)
