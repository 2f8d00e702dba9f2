"""Write a safetensors file one tensor at a time.

safetensors' own `save_file` needs every tensor of a shard in memory at once; a 5 GB shard would break our
memory bound. The format is small and exactly specified (8-byte little-endian header length, a JSON header
with dtype/shape/data_offsets per tensor, padded with spaces to a multiple of 8, then the raw little-endian
bytes in offset order), so when every name, dtype and shape is known in advance the header can be written
first and the tensors streamed after it. Files are read back with safetensors' own `safe_open` in the tests.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .hf_reader import DTYPE_NAMES


class StreamingSafetensorsWriter:
    def __init__(self, path: str | Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.expected = [name for name, _, _ in layout]
        self.layout = {name: (dtype, tuple(shape)) for name, dtype, shape in layout}
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, dtype, shape in layout:
            n = dtype.itemsize
            for s in shape:
                n *= s
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_bytes = offset
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)
        self.written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.written >= len(self.expected) or self.expected[self.written] != name:
            want = self.expected[self.written] if self.written < len(self.expected) else "nothing"
            raise ValueError(f"{self.path.name}: expected tensor '{want}' next, got '{name}'")
        dtype, shape = self.layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path.name}: tensor '{name}' is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"planned {dtype} {shape}")
        data = tensor.detach().contiguous().cpu()
        # A byte view of the tensor's memory: no copy for bf16 (numpy has no bf16, so view as uint8).
        self.f.write(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")
        self.written += 1

    def close(self) -> None:
        self.f.close()
        if self.written != len(self.expected):
            raise ValueError(f"{self.path.name}: {len(self.expected) - self.written} tensors were never written "
                             f"(next: '{self.expected[self.written]}')")

    def abort(self) -> None:
        self.f.close()


def pack_in_order(items: list, size_of, max_bytes: int) -> list[list]:
    """Consecutive items into groups of at most max_bytes (an item bigger than that gets a group of its own),
    in order, as save_pretrained fills shards."""
    groups, cur, size = [], [], 0
    for item in items:
        n = size_of(item)
        if cur and size + n > max_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += n
    if cur:
        groups.append(cur)
    return groups
