"""Lazy, validated reads of a HF safetensors checkpoint (single file or sharded with an index).

Nothing is loaded up front: `HFCheckpoint` reads only the index and each shard's JSON header, and checks
that the files can hold what the headers promise (a truncated shard is caught here, naming the tensors whose
bytes are missing). Tensors are then read one row range at a time: a tensor-parallel chunk reads only its own
rows. (Layout per the safetensors spec: u64 little-endian header size, JSON header, then each tensor's
row-major bytes at its data_offsets.)
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import SAFETENSORS
from .hf_index import INDEX_FILE, CheckpointError, quoted, read_header, shard_files

SAFETENSORS_DTYPES = SAFETENSORS


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # absolute byte offset of the tensor's data in the file


ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _nonneg_ints(value, count: int | None = None) -> bool:
    return (isinstance(value, list) and (count is None or len(value) == count)
            and all(type(v) is int and v >= 0 for v in value))


def parse_header(path: Path) -> list[TensorInfo]:
    """Every tensor of one safetensors file, validated at least as strictly as the safetensors library:
    each entry exactly {dtype, shape, data_offsets} of the right types, a known dtype, a byte count that
    matches dtype and shape, offsets that start at 0 and follow each other without gap or overlap, and a
    data section that they cover exactly (its size is the file size minus the header). `__metadata__`,
    if present, maps strings to strings."""
    header, data_start = read_header(path)
    size = path.stat().st_size
    data_len = size - data_start
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    infos = []
    for name, entry in header.items():
        what = f"{path}: tensor {quoted(name)}"
        if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS:
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise CheckpointError(f"{what}: corrupt header entry {quoted(got)} (needs exactly dtype, shape, "
                                  f"data_offsets)")
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise CheckpointError(f"{what} has unsupported dtype {quoted(entry['dtype'])}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not _nonneg_ints(shape):
            raise CheckpointError(f"{what}: shape {quoted(shape)} is not a list of non-negative integers")
        if not _nonneg_ints(offsets, 2) or offsets[0] > offsets[1]:
            raise CheckpointError(f"{what}: data_offsets {quoted(offsets)} are not [begin, end] with "
                                  f"0 <= begin <= end")
        begin, end = offsets
        if end > data_len:
            raise CheckpointError(f"{path}: truncated: tensor {quoted(name)} needs bytes up to "
                                  f"{data_start + end} but the file has {size}")
        # the element count stops growing past the data section: a shape of huge numbers is refused cheaply
        count = 0 if 0 in shape else 1
        for d in shape if count else ():
            count *= d
            if count * dtype.itemsize > data_len:
                break
        expect = count * dtype.itemsize
        if end - begin != expect:
            raise CheckpointError(f"{what} claims {end - begin} bytes for shape {list(shape)[:8]} {entry['dtype']} "
                                  f"({expect if expect <= data_len else 'more than the file'} expected): corrupt header")
        infos.append(TensorInfo(name, path, dtype, tuple(shape), expect, data_start + begin))
    # The library's rule: sorted by offsets, each tensor begins where the one before it ended, from 0 to the
    # end of the file; no gap (bytes nobody owns), no overlap (two tensors sharing bytes), no trailing data.
    at = 0
    for info in sorted(infos, key=lambda t: (t.offset, t.offset + t.nbytes)):
        begin = info.offset - data_start
        if begin != at:
            why = "overlaps the tensor before it" if begin < at else f"leaves bytes {at}..{begin} unowned"
            raise CheckpointError(f"{path}: tensor {quoted(info.name)} at data offset {begin} {why}: "
                                  f"corrupt header")
        at = begin + info.nbytes
    if at != data_len:
        raise CheckpointError(f"{path}: the tensors end at data offset {at} but the data section has "
                              f"{data_len} bytes: corrupt header or trailing data")
    return infos


class HFCheckpoint:
    """The tensors of a HF checkpoint directory, validated, readable lazily and from several threads."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.tensors: dict[str, TensorInfo] = {}
        self._local = threading.local()
        self._scan()

    # ---- validation -----------------------------------------------------------------------------------
    def _scan(self) -> None:
        weight_map, files = shard_files(self.dir)  # the index's names are checked before any file is opened
        missing_files = [f for f in files if not (self.dir / f).is_file()]
        if missing_files:
            named = sorted(k for k, v in (weight_map or {}).items() if v in missing_files)
            raise CheckpointError(
                f"{self.dir / INDEX_FILE}: missing shard file(s) {missing_files} named by the index (they hold "
                f"{len(named)} tensors, e.g. {named[:3]})"
            )
        for fname in files:
            for info in parse_header(self.dir / fname):
                if info.name in self.tensors:
                    raise CheckpointError(f"{self.dir}: tensor {quoted(info.name)} appears in both "
                                          f"{self.tensors[info.name].file.name} and {fname}")
                self.tensors[info.name] = info
        if weight_map is not None:
            absent = sorted(k for k, f in weight_map.items() if k not in self.tensors or self.tensors[k].file.name != f)
            if absent:
                raise CheckpointError(
                    f"{self.dir / INDEX_FILE}: the index names {len(absent)} tensor(s) that are not in the shard "
                    f"it points to: "
                    + ", ".join(quoted(a, 80) for a in absent[:5])
                )
            unindexed = sorted(set(self.tensors) - set(weight_map))
            if unindexed:
                raise CheckpointError(f"{self.dir / INDEX_FILE}: shards hold {len(unindexed)} tensor(s) the index "
                                      f"does not name: "
                                      + ", ".join(quoted(u, 80) for u in unindexed[:5]))

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
        if not info.shape:  # a 0-d tensor: one element, and no rows to select
            out = torch.empty((), dtype=info.dtype)
            self.read_into(out, name, 0)
            return out
        r0, r1, _ = (rows or slice(None)).indices(info.shape[0])
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

    def read_bytes(self, name: str, start: int, buf: memoryview) -> None:
        """Fill `buf` with tensor `name`'s data bytes from `start` on (a block of a chunk being streamed)."""
        info = self.tensors[name]
        if start < 0 or start + len(buf) > info.nbytes:
            raise ValueError(f"read_bytes: {name} has {info.nbytes} bytes, not {start}..{start + len(buf)}")
        self._pread(info, buf, info.offset + start)

    def _pread(self, info: TensorInfo, buf: memoryview, offset: int) -> None:
        fd, done, n = self._fd(info.file), 0, len(buf)
        while done < n:
            got = os.preadv(fd, [buf[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{info.file}: unexpected end of file reading tensor '{info.name}'")
            done += got

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})
