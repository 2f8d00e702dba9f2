"""torch.distributed.checkpoint (DCP) reads and writes, one tensor chunk at a time.

Writing: the items are grouped into one plan per (simulated) Megatron rank, so the data files are laid out as
a Megatron run at that TP/PP layout would write them (`__{rank}_{k}.distcp`), and each item's data is produced
on demand by `LazySavePlanner.resolve_data`, so a checkpoint of any size is written while only one chunk per
writer thread is in memory. DCP's own FileSystemWriter cannot promise that: in torch 2.13 its file loop keeps
every tensor of a data file referenced until the file is finished (a dict it fills for its safetensors
variant), so a rank's whole data would sit in memory. `StreamingWriter` therefore replaces only the data-file
loop: each item is serialised exactly as DCP does (torch.save of the chunk, raw bytes for objects), its
`WriteResult` recorded, and the chunk released before the next one; the `.metadata` file is still written by
DCP's own `finish`, and reading goes through DCP unchanged.

Reading: `DCPReader` loads one key at a time (the whole global tensor, assembled from whatever chunks it was
saved in), caching the metadata so a thousand keys do not re-read it a thousand times.
"""

from __future__ import annotations

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
from torch.distributed.checkpoint.planner import (
    BytesIOWriteData,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
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


class LazySavePlanner(SavePlanner):
    """Only `resolve_data` is used: we build the plans ourselves and drive the writer directly."""

    def __init__(self, resolve: Callable[[WriteItem], torch.Tensor | io.BytesIO]):
        self._resolve = resolve

    def resolve_data(self, write_item: WriteItem):
        return self._resolve(write_item)

    # The SavePlanner interface also asks for these; the write path below never calls them.
    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
        raise NotImplementedError("LazySavePlanner is driven by write_checkpoint, not dcp.save")

    def create_local_plan(self):
        raise NotImplementedError("LazySavePlanner is driven by write_checkpoint, not dcp.save")

    def create_global_plan(self, all_plans):
        raise NotImplementedError("LazySavePlanner is driven by write_checkpoint, not dcp.save")

    def finish_plan(self, new_plan):
        raise NotImplementedError("LazySavePlanner is driven by write_checkpoint, not dcp.save")


def _item_bytes(item: WriteItem) -> int:
    if item.type == WriteItemType.BYTE_IO:
        return 0
    n = item.tensor_data.properties.dtype.itemsize
    for d in item.tensor_data.chunk.sizes:
        n *= d
    return n


def split_by_bytes(items: list[WriteItem], bins: int) -> list[list[WriteItem]]:
    """Largest-first into the lightest bin; item order inside a bin follows the model order. No empty bins."""
    bins = max(1, min(bins, len(items)))
    return [[items[i] for i in b] for b in balance([_item_bytes(it) for it in items], bins) if b]


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


class StreamingWriter(FileSystemWriter):
    """FileSystemWriter whose data files are written one item at a time, each released once written."""

    budget: ByteBudget | None = None

    def write_file(self, name: str, items: list[WriteItem], planner: SavePlanner) -> list[WriteResult]:
        results = []
        with open(Path(self.path) / name, "wb") as f:
            for item in items:
                held = self.budget.acquire(_item_bytes(item)) if self.budget else 0
                try:
                    results.append(self._write_one(f, name, item, planner))
                finally:
                    if self.budget:
                        self.budget.release(held)
        return results

    @staticmethod
    def _write_one(f, name: str, item: WriteItem, planner: SavePlanner) -> WriteResult:
        data = planner.resolve_data(item)
        offset = f.tell()
        if item.type == WriteItemType.BYTE_IO:
            f.write(data.getbuffer())
        else:
            torch.save(data, f)  # DCP's torch_save serialisation of one chunk
        length = f.tell() - offset
        return WriteResult(index=item.index, size_in_bytes=length, storage_data=_StorageInfo(name, offset, length))


def write_checkpoint(
    path: str | Path,
    items_per_rank: list[list[WriteItem]],
    resolve: Callable[[WriteItem], torch.Tensor | io.BytesIO],
    threads: int = 1,
    after_rank: Callable[[int], None] | None = None,
    ranks: list[int] | None = None,
    write_metadata: bool = True,
    subset: dict[int, list[int]] | None = None,
    file_tag: str = "",
):
    """Write the items of each rank into `__{rank}_{k}.distcp` files and the `.metadata` file.

    `threads` files are written at once. A rank's items go into max(1, threads // ranks) files, so one rank
    alone still gets every thread. `ranks` restricts the data writing to those ranks (several processes can
    share one job, each writing its own files); the metadata always describes every rank's items and is
    written only if `write_metadata`. `after_rank(rank)` runs once each rank's files are complete.
    `subset` {rank: item indices} writes only those items of a rank (on top of `ranks`), into
    `__{rank}_{file_tag}{k}.distcp`: when a job has more processes than ranks, several processes share one
    rank's items and the tag keeps their files apart (DCP finds data through `.metadata`, never by file name).
    """
    threads = max(1, threads)
    writer = StreamingWriter(str(path), sync_files=False, overwrite=True)
    writer.set_up_storage_writer(True)
    if threads > 1:
        largest = max((_item_bytes(it) for items in items_per_rank for it in items), default=0)
        # 1.5x: the largest chunk may overlap with smaller ones but never with a second largest one; the
        # process's own ~270 MB (torch, megatron imports) must also fit in the 512 MB + 2x largest bound.
        writer.budget = ByteBudget(largest + largest // 2)
    plans = [writer.prepare_local_plan(SavePlan(items)) for items in items_per_rank]
    plans, metadata = create_default_global_save_plan(plans)
    plans = writer.prepare_global_plan(plans)
    planner = LazySavePlanner(resolve)
    subset = subset or {}
    whole = [r for r in range(len(plans)) if (ranks is None or r in ranks) and r not in subset]
    parts = {r: ([plans[r].items[i] for i in subset[r]], f"__{r}_{file_tag}") for r in sorted(subset)}
    selected = sorted(whole + list(parts))
    per_rank = max(1, threads // max(1, len(selected)))
    todo = {r: (plans[r].items, plans[r].storage_data.prefix) for r in whole} | parts
    tasks = [(rank, f"{todo[rank][1]}{k}.distcp", bucket)
             for rank in selected for k, bucket in enumerate(split_by_bytes(todo[rank][0], per_rank))]
    results: list[list[WriteResult]] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [(rank, pool.submit(writer.write_file, name, bucket, planner)) for rank, name, bucket in tasks]
        done_ranks: dict[int, list[WriteResult]] = {r: [] for r in selected}
        for rank, fut in futures:
            done_ranks[rank] += fut.result()
        for rank in selected:
            results.append(done_ranks[rank])
            if after_rank is not None:
                after_rank(rank)
    if write_metadata:
        writer.finish(metadata, results)
    return metadata, results


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
                        results.append(StreamingWriter._write_one(files[rank], name, item, _Resolved(data)))
                finally:
                    if budget:
                        budget.release(held)
        finally:
            for f in files.values():
                f.close()
        return results

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(run, t, picked) for t, picked in enumerate(shares) if picked]
        return [r for fut in futures for r in fut.result()]


class _Resolved:
    """A planner whose one answer is already known (`StreamingWriter._write_one` asks the planner)."""

    def __init__(self, data):
        self.data = data

    def resolve_data(self, item):
        return self.data


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
