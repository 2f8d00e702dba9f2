"""Lazy, validated reads of a HF safetensors checkpoint (single file or sharded with an index).

Nothing is loaded up front: `HFCheckpoint` reads only the index and each shard's JSON header, and checks
that the files can hold what the headers promise (a truncated shard is caught here, naming the tensors whose
bytes are missing). Tensors are then read one row range at a time: a tensor-parallel chunk reads only its own
rows. (Layout per the safetensors spec: u64 little-endian header size, JSON header, then each tensor's
row-major bytes at its data_offsets.)
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import SAFETENSORS
from .hf_index import CheckpointError, shard_files

SAFETENSORS_DTYPES = SAFETENSORS


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # absolute byte offset of the tensor's data in the file


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path.name}: truncated (only {size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path.name}: header length {n} exceeds the file size {size}: truncated or corrupt")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path.name}: corrupt safetensors header ({e})") from e
    return header, 8 + n


class HFCheckpoint:
    """The tensors of a HF checkpoint directory, validated, readable lazily and from several threads."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.tensors: dict[str, TensorInfo] = {}
        self._local = threading.local()
        self._scan()

    # ---- validation -----------------------------------------------------------------------------------
    def _scan(self) -> None:
        weight_map, files = shard_files(self.dir)
        missing_files = [f for f in files if not (self.dir / f).is_file()]
        if missing_files:
            named = sorted(k for k, v in (weight_map or {}).items() if v in missing_files)
            raise CheckpointError(
                f"missing shard file(s) {missing_files} named by the index (they hold {len(named)} tensors, "
                f"e.g. {named[:3]})"
            )
        for fname in files:
            path = self.dir / fname
            header, data_start = read_header(path)
            size = path.stat().st_size
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                if data_start + end > size:
                    raise CheckpointError(
                        f"{fname}: truncated: tensor '{name}' needs bytes up to {data_start + end} but the file "
                        f"has {size}"
                    )
                dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise CheckpointError(f"{fname}: tensor '{name}' has unsupported dtype {entry['dtype']}")
                shape = tuple(entry["shape"])
                expect = dtype.itemsize * math.prod(shape)
                if end - begin != expect:
                    raise CheckpointError(
                        f"{fname}: tensor '{name}' claims {end - begin} bytes for shape {shape} {entry['dtype']} "
                        f"({expect} expected): corrupt header"
                    )
                if name in self.tensors:
                    raise CheckpointError(f"tensor '{name}' appears in both {self.tensors[name].file.name} and {fname}")
                self.tensors[name] = TensorInfo(name, path, dtype, shape, expect, data_start + begin)
        if weight_map is not None:
            absent = sorted(k for k, f in weight_map.items() if k not in self.tensors or self.tensors[k].file.name != f)
            if absent:
                raise CheckpointError(
                    f"the index names {len(absent)} tensor(s) that are not in the shard it points to: {absent[:5]}"
                )
            unindexed = sorted(set(self.tensors) - set(weight_map))
            if unindexed:
                raise CheckpointError(f"shards hold {len(unindexed)} tensor(s) the index does not name: {unindexed[:5]}")

    # ---- reading ------------------------------------------------------------------------------------------
    # Reads use pread on the raw file rather than safetensors' memory map: mapped pages that were read stay
    # resident and count against the process, so converting a 500 GB checkpoint through a map would look
    # like (and, under memory pressure, behave like) holding it. A row range of a row-major tensor is one
    # contiguous byte range, read straight into the tensor's own buffer.
    def _fd(self, path: Path) -> int:
        fds = getattr(self._local, "fds", None)
        if fds is None:
            fds = self._local.fds = {}
        if path not in fds:
            fds[path] = os.open(path, os.O_RDONLY)
        return fds[path]

    def dtype_of(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """Tensor `name`, or only rows[, cols] of it, read from disk without touching the rest."""
        info = self.tensors[name]
        r0, r1, _ = (rows or slice(None)).indices(info.shape[0]) if info.shape else (0, 1, 1)
        width = (cols.indices(info.shape[1])[1] - cols.indices(info.shape[1])[0]) if cols is not None else None
        out = torch.empty((r1 - r0,) + ((width,) if width is not None else tuple(info.shape[1:])), dtype=info.dtype)
        self.read_into(out, name, r0, cols)
        return out

    def read_into(self, out: torch.Tensor, name: str, row_start: int, cols: slice | None = None) -> None:
        """Fill `out` (rows row_start.. of tensor `name`, [:, cols] if given) straight from the file."""
        info = self.tensors[name]
        row_bytes = math.prod(info.shape[1:]) * info.dtype.itemsize
        if out.dtype != info.dtype:
            raise ValueError(f"read_into: {name} is {info.dtype}, buffer is {out.dtype}")
        flat = memoryview(out.view(-1).view(torch.uint8).numpy())
        if cols is None:
            self._pread(info, flat, info.offset + row_start * row_bytes)
            return
        # A column slice (a TP chunk of a row-parallel weight) is one short byte range per row: read exactly
        # those, each into its row of `out`, so TP chunks of a tensor together read it once, not TP times.
        c0, c1, _ = cols.indices(info.shape[1])
        width = (c1 - c0) * info.dtype.itemsize
        first = info.offset + row_start * row_bytes + c0 * info.dtype.itemsize
        for r in range(out.shape[0]):
            self._pread(info, flat[r * width:(r + 1) * width], first + r * row_bytes)

    def _pread(self, info: "TensorInfo", buf: memoryview, offset: int) -> None:
        fd, done, n = self._fd(info.file), 0, len(buf)
        while done < n:
            got = os.preadv(fd, [buf[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{info.file.name}: unexpected end of file reading tensor '{info.name}'")
            done += got

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})
