"""torch.distributed.checkpoint (DCP) reads and writes, one tensor at a time.

Writing (`write_groups`): the write items come in groups (every chunk of one Megatron tensor), each produced
together from one read of its source and released once written; every item is appended to a data file of its
Megatron rank (`__{rank}_{k}.distcp`, one file per rank per writer thread), so a rank's files hold only its
chunks, as a Megatron run at that layout writes them. Items are serialised exactly as DCP's own writer does
(torch.save of the chunk, raw bytes for objects); `finish_metadata` then writes `.metadata` through DCP's own
planner and writer. DCP's FileSystemWriter itself is not used for the data: in torch 2.13 its file loop keeps
every tensor of a data file referenced until the file is finished, so a rank's whole data would sit in memory.

Reading: `DCPReader` loads one key at a time (the whole global tensor, assembled from whatever chunks it was
saved in), caching the metadata so a thousand keys do not re-read it a thousand times.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import BytesIOWriteData, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from ..packing import balance


def tensor_item(key: str, global_shape, offsets, sizes, dtype: torch.dtype) -> WriteItem:
    return WriteItem(
        index=MetadataIndex(key, torch.Size(offsets)),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
            properties=TensorProperties(dtype=dtype),
            size=torch.Size(global_shape),
        ),
    )


def bytes_item(key: str, nbytes: int) -> WriteItem:
    return WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO, bytes_io_data=BytesIOWriteData(nbytes))


def _item_bytes(item: WriteItem) -> int:
    if item.type == WriteItemType.BYTE_IO:
        return 0
    n = item.tensor_data.properties.dtype.itemsize
    for d in item.tensor_data.chunk.sizes:
        n *= d
    return n


class ByteBudget:
    """At most `limit` bytes of chunks in flight across writer threads (a larger chunk waits to be alone).

    With K threads, K large chunks (an embedding and an output layer) could otherwise be in memory at once;
    the budget keeps the peak near 1.5 x the largest chunk whatever --workers is, while small chunks
    still overlap."""

    def __init__(self, limit: int):
        self.limit, self.used = max(1, limit), 0
        self.cond = threading.Condition()

    def acquire(self, n: int) -> int:
        n = min(n, self.limit)
        with self.cond:
            self.cond.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        return n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def _write_item(f, name: str, item: WriteItem, data) -> WriteResult:
    """Append one item to an open data file, serialised exactly as DCP's own writer does (torch.save of the
    chunk, raw bytes for objects), and say where it went."""
    offset = f.tell()
    if item.type == WriteItemType.BYTE_IO:
        f.write(data.getbuffer())
    else:
        torch.save(data, f)
    length = f.tell() - offset
    return WriteResult(index=item.index, size_in_bytes=length, storage_data=_StorageInfo(name, offset, length))


@contextlib.contextmanager
def _without_crc32():
    """torch.save computes a CRC32 of every record it writes (about 40% of its time on a chunk) that no reader
    checks: torch.load, and so DCP and megatron-core, never verify it. Off while our writers run (the setting
    is process-wide; torch versions without it are left as they are)."""
    save = getattr(getattr(getattr(torch.utils, "serialization", None), "config", None), "save", None)
    if save is None or not hasattr(save, "compute_crc32"):
        yield
        return
    old, save.compute_crc32 = save.compute_crc32, False
    try:
        yield
    finally:
        save.compute_crc32 = old


def write_groups(
    path: str | Path,
    groups: list[list[WriteItem]],
    produce: Callable[[list[WriteItem]], Iterable[tuple[WriteItem, torch.Tensor | io.BytesIO]]],
    rank_of: Callable[[WriteItem], int],
    threads: int = 1,
    file_tag: str = "",
    budget: ByteBudget | None = None,
) -> list[WriteResult]:
    """Tensor-major writing: the items of a group (every chunk of one tensor, say) are produced together, from
    one read of their source, and each is appended to the file of its rank. A thread owns its files
    (`__{rank}_{file_tag}{thread}.distcp`), so nothing is shared but the budget, which caps the groups in
    flight by their bytes. Returns every item's WriteResult (the `.metadata` is written by the caller)."""
    threads = max(1, min(threads, len(groups))) if groups else 1
    sizes = [sum(_item_bytes(it) for it in g) for g in groups]
    shares = balance(sizes, threads)

    def run(t: int, picked: list[int]) -> list[WriteResult]:
        files: dict[int, object] = {}
        results = []
        try:
            for g in picked:
                held = budget.acquire(sizes[g]) if budget else 0
                try:
                    for item, data in produce(groups[g]):
                        rank = rank_of(item)
                        name = f"__{rank}_{file_tag}{t}.distcp"
                        if rank not in files:
                            files[rank] = open(Path(path) / name, "wb")
                        results.append(_write_item(files[rank], name, item, data))
                finally:
                    if budget:
                        budget.release(held)
        finally:
            for f in files.values():
                f.close()
        return results

    with _without_crc32(), ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(run, t, picked) for t, picked in enumerate(shares) if picked]
        return [r for fut in futures for r in fut.result()]


def finish_metadata(path: str | Path, items_per_rank: list[list[WriteItem]], results) -> None:
    """Write `.metadata` for data files that several processes wrote (their WriteResults gathered here)."""
    writer = FileSystemWriter(str(path), sync_files=False, overwrite=True)
    writer.set_up_storage_writer(True)
    plans = [SavePlan(items) for items in items_per_rank]
    _, metadata = create_default_global_save_plan(plans)
    writer.finish(metadata, results)


def extra_state_payload() -> io.BytesIO:
    """What megatron stores for a module's `_extra_state` ShardedObject when there is none: torch.save([None])."""
    buf = io.BytesIO()
    torch.save([None], buf)
    buf.seek(0)
    return buf


class _FileRange(io.RawIOBase):
    """bytes [offset, offset + length) of an unbuffered file, as a seekable stream of its own. It has
    `readinto`, which torch.load uses to read each record straight into the tensor's storage."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self.f, self.start, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")
        want = min(len(view), self.length - self.pos)
        if want <= 0:
            return 0
        done = 0
        while done < want:  # fill it all: torch's reader treats a short read as the end of the data
            got = os.preadv(self.f.fileno(), [view[done:want]], self.start + self.pos + done)
            if got <= 0:
                break
            done += got
        self.pos += done
        return done


class _CachedReader(FileSystemReader):
    def __init__(self, path):
        super().__init__(str(path))
        self._metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class DCPReader:
    """Keys, shapes and one-key-at-a-time loads of a DCP directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / ".metadata").is_file():
            raise FileNotFoundError(f"{self.path}: no .metadata: not a torch.distributed.checkpoint directory")
        self.reader = _CachedReader(self.path)
        self.metadata = self.reader.read_metadata()

    def tensor_keys(self) -> dict[str, TensorStorageMetadata]:
        return {k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def object_keys(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]

    def load(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        md = self.metadata.state_dict_metadata[key]
        whole = self._load_single_chunk(key, md) if dtype in (None, md.properties.dtype) else None
        if whole is not None:
            return whole
        out = torch.empty(tuple(md.size), dtype=dtype or md.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore")
            dcp.load({key: out}, storage_reader=self.reader, planner=DefaultLoadPlanner(), no_dist=True)
        return out

    def tensor_bytes(self, key: str) -> int:
        md = self.metadata.state_dict_metadata[key]
        n = md.properties.dtype.itemsize
        for d in md.size:
            n *= d
        return n

    def missing_bytes(self) -> dict[str, str]:
        """{key: why} for every entry whose bytes are not all there: its data file absent, or shorter than
        the entry's offset + length (a truncated copy). Checked from file sizes alone, before any read."""
        sizes: dict[str, int | None] = {}
        out: dict[str, str] = {}
        for index, info in self.metadata.storage_data.items():
            name = info.relative_path
            if name not in sizes:
                p = self.path / name
                sizes[name] = p.stat().st_size if p.is_file() else None
            if sizes[name] is None:
                out.setdefault(index.fqn, f"data file {name} is missing")
            elif info.offset + info.length > sizes[name]:
                out.setdefault(index.fqn, f"{name} is truncated: {sizes[name]} bytes, the chunk at offset "
                                          f"{list(index.offset or [])} needs bytes up to {info.offset + info.length}")
        return out

    def _load_single_chunk(self, key: str, md: TensorStorageMetadata) -> torch.Tensor | None:
        """A tensor saved as one chunk (TP=1), torch.load-ed straight from its byte range, or None.

        This is the entry DCP's own reader would torch.load too; DCP then copies it into a preallocated tensor,
        a second copy (and a second fresh allocation) of every byte that this path skips. Anything else (several
        chunks, a storage transform such as compression) goes through DCP."""
        if len(md.chunks) != 1 or tuple(md.chunks[0].sizes) != tuple(md.size):
            return None
        info = self.metadata.storage_data.get(MetadataIndex(key, md.chunks[0].offsets))
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        with open(self.path / info.relative_path, "rb", buffering=0) as f:
            t = torch.load(_FileRange(f, info.offset, info.length), map_location="cpu", weights_only=True)
        if not isinstance(t, torch.Tensor) or t.shape != md.size or t.dtype != md.properties.dtype:
            raise ValueError(f"{info.relative_path}: the chunk of '{key}' holds "
                             f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}, "
                             f".metadata says {md.properties.dtype} {list(md.size)}")
        return t
