"""Write a safetensors file one tensor at a time.

safetensors' own `save_file` needs every tensor of a shard in memory at once; a 5 GB shard would break our
memory bound. The format is small and exactly specified (8-byte little-endian header length, a JSON header
with dtype/shape/data_offsets per tensor, padded with spaces to a multiple of 8, then the raw little-endian
bytes in offset order), so when every name, dtype and shape is known in advance the header can be written
first and the tensors streamed after it. Files are read back with safetensors' own `safe_open` in the tests.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import torch

from ..dtypes import SAFETENSORS_NAMES as DTYPE_NAMES
from .hf_index import WRITER_METADATA
from .streamed import StreamedChunk, check_size, pwrite_all
from .writeback import WRITEBACK


def _read_head(path: Path, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, 0)
    finally:
        os.close(fd)


class StreamingSafetensorsWriter:
    """A safetensors file whose header is written first and whose tensors are then written, each once, at
    their planned offsets, in any order and from any number of threads or processes (positional writes, no
    shared file position). `close()` fails unless every tensor this writer was to write was written, so a
    file with a hole never passes for complete."""

    def __init__(self, path: str | Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, create: bool = True, expect: set[str] | None = None):
        """`create`: make the file and write its header; False: open the file another process created from
        the same layout (its header is checked). `expect`: the tensors this writer must write (default all):
        the processes of one job may share a file, each writing its own tensors."""
        self.path = Path(path)
        self.layout: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        header: dict = {"__metadata__": metadata or WRITER_METADATA}
        offset = 0
        for name, dtype, shape in layout:
            n = dtype.itemsize
            for s in shape:
                n *= s
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.layout[name] = (dtype, tuple(shape), offset)
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.data_bytes = offset
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC if create else os.O_WRONLY
        self.fd = os.open(self.path, flags, 0o644)
        try:
            head = struct.pack("<Q", len(raw)) + raw
            if create:
                self._pwrite(head, 0)
            elif _read_head(self.path, len(head)) != head:  # made by another process: from the same plan?
                raise ValueError(f"{self.path.name}: its header is not the one this layout gives")
        except BaseException:
            os.close(self.fd)
            raise
        unknown = set(expect or ()) - set(self.layout)
        if unknown:
            os.close(self.fd)
            raise ValueError(f"{self.path.name}: tensor '{min(unknown)}' is not planned for this file")
        self.expect = None if expect is None else set(expect)
        self.pending = set(self.layout) if expect is None else set(expect)  # not yet written completely
        self.claimed: set[str] = set()  # being written or written: a second write is refused
        self.lock = threading.Lock()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset = self._claim(name, tensor.dtype, tuple(tensor.shape))
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            # A byte view of the tensor's memory: no copy for bf16 (numpy has no bf16, so view as uint8).
            self._pwrite(memoryview(data.view(-1).view(torch.uint8).numpy()), self.data_start + offset)
            WRITEBACK.submit(self.path, self.data_start + offset, data.numel() * data.element_size())
        with self.lock:  # only now complete: a write that raised above leaves the tensor pending
            self.pending.discard(name)

    def write_streamed(self, name: str, chunk: StreamedChunk, buf: torch.Tensor) -> None:
        """Write the tensor `chunk` describes a block at a time through `buf` (uint8), never whole in memory."""
        try:
            check_size(chunk)
        except ValueError as e:
            raise ValueError(f"{self.path.name}: tensor '{name}': {e}") from None
        nbytes = chunk.nbytes
        offset = self._claim(name, chunk.dtype, chunk.shape)
        base = self.data_start + offset
        for at, block in chunk.blocks(buf):
            self._pwrite(block, base + at)
        WRITEBACK.submit(self.path, base, nbytes)
        with self.lock:
            self.pending.discard(name)

    def _claim(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> int:
        """Check that `name` is this writer's to write, as planned, and not yet claimed; its data offset."""
        if name not in self.layout:
            raise ValueError(f"{self.path.name}: tensor '{name}' is not planned for this file")
        if self.expect is not None and name not in self.expect:
            raise ValueError(f"{self.path.name}: tensor '{name}' is another process's to write")
        planned_dtype, planned_shape, offset = self.layout[name]
        if dtype != planned_dtype or tuple(shape) != planned_shape:
            raise ValueError(f"{self.path.name}: tensor '{name}' is {dtype} {tuple(shape)}, "
                             f"planned {planned_dtype} {planned_shape}")
        with self.lock:
            if name in self.claimed:
                raise ValueError(f"{self.path.name}: tensor '{name}' written twice")
            self.claimed.add(name)
        return offset

    def _pwrite(self, buf, at: int) -> None:
        pwrite_all(self.fd, buf, at)

    def close(self) -> None:
        os.close(self.fd)
        if self.pending:
            first = min(self.pending, key=lambda k: self.layout[k][2])
            raise ValueError(f"{self.path.name}: {len(self.pending)} tensors were never written (first: '{first}')")

    def abort(self) -> None:
        os.close(self.fd)
