"""torch.distributed.checkpoint (DCP) reads and writes, one tensor at a time.

Writing (`write_groups`): the write items come in groups (every chunk of one Megatron tensor), each produced
together from one read of its source and released once written; every item is appended to a data file of its
Megatron rank (`__{rank}_{k}.distcp`, one file per rank per writer thread), so a rank's files hold only its
chunks, as a Megatron run at that layout writes them. Items are serialised exactly as DCP's own writer does
(torch.save of the chunk, raw bytes for objects); `finish_metadata` then writes `.metadata` through DCP's own
planner and writer. DCP's FileSystemWriter itself is not used for the data: in torch 2.13 its file loop keeps
every tensor of a data file referenced until the file is finished, so a rank's whole data would sit in memory.

Reading: `DCPReader` loads one key at a time (the whole global tensor, assembled from whatever chunks it was
saved in). Nothing of an input checkpoint is trusted: `.metadata` is unpickled with an allow-list and its
structure checked once (see `safe_pickle`), and each chunk is read from its own byte range and checked
against it, dtype and shape, before it lands in the tensor. A homogeneous model's stacked layers
(`decoder.layers.X` [L, ...]) can be seen as per-layer tensors, each read from its own layer's chunks.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from .dcp_types import (BytesIOWriteData, BytesStorageMetadata, ChunkStorageMetadata, MetadataIndex, StorageInfo,
                        TensorProperties, TensorStorageMetadata, TensorWriteData, WriteItem, WriteItemType,
                        WriteResult, write_metadata)

from ..errors import OUT_OF_MEMORY_ADVICE, ConversionError, out_of_memory
from ..packing import balance
from .hf_index import CheckpointError, quoted
from .streamed import BLOCK_BYTES, HoleChunk, StreamedChunk, save_hole, save_streamed
from .torch_record import FileRange, tensor_span
from .writeback import SequentialWriteback
from .safe_pickle import (
    METADATA_FILE,
    UnsafePickleError,
    load_common,
    load_dcp_metadata,
    weights_only_reason,
)


# megatron's per-layer keys are LAYERS_PREFIX + "{i}." + the module's; a homogeneous model's stacked ones
# LAYERS_PREFIX + the module's (see DCPReader.view_stacked_layers).
LAYERS_PREFIX = "decoder.layers."


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


def _write_item(f, name: str, item: WriteItem, data, buf: Callable[[], torch.Tensor]) -> WriteResult:
    """Append one item to an open data file, serialised exactly as DCP's own writer does (torch.save of the
    chunk, raw bytes for objects), and say where it went. A `StreamedChunk` goes through `buf()`, the
    thread's block buffer; a `HoleChunk`'s data is left for its producer to fill."""
    offset = f.tell()
    if item.type == WriteItemType.BYTE_IO:
        f.write(data.getbuffer())
    elif isinstance(data, StreamedChunk):
        save_streamed(f, data, buf())
    elif isinstance(data, HoleChunk):
        save_hole(f, data)
    else:
        torch.save(data, f)
    length = f.tell() - offset
    return WriteResult(index=item.index, size_in_bytes=length, storage_data=StorageInfo(name, offset, length))


_crc32_lock = threading.Lock()
_crc32_users: list = [0, None]  # writer threads inside _without_crc32, and the setting the first one found


@contextlib.contextmanager
def _without_crc32():
    """torch.save computes a CRC32 of every record it writes that no reader checks: torch.load, and so DCP and
    megatron-core, never verify it (nor does `torch_record`). Off while the calling thread writes. Each writer
    thread turns it off itself, as torch keeps this setting per thread (a context variable) in newer versions;
    where it is process-wide instead, the last thread out restores what the first one found. Torch versions
    without the setting are left as they are."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        yield
        return
    save = getattr(config, "save", None)
    if save is None or not hasattr(save, "compute_crc32"):
        yield
        return
    with _crc32_lock:
        if _crc32_users[0] == 0:
            _crc32_users[1] = save.compute_crc32
        _crc32_users[0] += 1
    save.compute_crc32 = False
    try:
        yield
    finally:
        with _crc32_lock:
            _crc32_users[0] -= 1
            if _crc32_users[0] == 0:
                save.compute_crc32 = _crc32_users[1]


def write_groups(
    path: str | Path,
    groups: list[list[WriteItem]],
    produce: Callable[[list[WriteItem]], Iterable[tuple[WriteItem, torch.Tensor | io.BytesIO]]],
    rank_of: Callable[[WriteItem], int],
    threads: int = 1,
    file_tag: str = "",
    budget: ByteBudget | None = None,
    held: Callable[[list[WriteItem]], int] | None = None,
) -> list[WriteResult]:
    """Tensor-major writing: the items of a group (every chunk of one tensor, say) are produced together, from
    one read of their source, and each is appended to the file of its rank. A thread owns its files
    (`__{rank}_{file_tag}{thread}.distcp`), so nothing is shared but the budget, which caps the groups in
    flight by the bytes they hold in memory: `held(group)`, or all of their bytes when not given (a group
    produced as `StreamedChunk`s holds only its thread's block buffer). Returns every item's WriteResult (the
    `.metadata` is written by the caller)."""
    threads = max(1, min(threads, len(groups))) if groups else 1
    sizes = [sum(_item_bytes(it) for it in g) for g in groups]
    memory = [held(g) for g in groups] if held is not None else sizes
    shares = balance(sizes, threads)

    def run(t: int, picked: list[int]) -> list[WriteResult]:
        with _without_crc32():
            return _run(t, picked)

    def _run(t: int, picked: list[int]) -> list[WriteResult]:
        files: dict[int, tuple[object, SequentialWriteback]] = {}
        results = []
        block: list[torch.Tensor] = []

        def buf() -> torch.Tensor:  # allocated on first use, then reused for every streamed chunk
            if not block:
                block.append(torch.empty(BLOCK_BYTES, dtype=torch.uint8))
            return block[0]

        try:
            for g in picked:
                taken = budget.acquire(memory[g]) if budget else 0
                try:
                    for item, data in produce(groups[g]):
                        rank = rank_of(item)
                        name = f"__{rank}_{file_tag}{t}.distcp"
                        try:
                            if rank not in files:
                                f = open(Path(path) / name, "w+b")  # read too: a streamed record is checked
                                files[rank] = (f, SequentialWriteback(Path(path) / name))
                            f, written = files[rank]
                            results.append(_write_item(f, name, item, data, buf))
                            written.wrote_up_to(f.tell())
                        except (OSError, RuntimeError) as e:  # disk full: torch.save says only "unexpected pos"
                            raise ConversionError(write_failure(Path(path) / name, item.index.fqn, e)) from None
                finally:
                    if budget:
                        budget.release(taken)
        finally:
            for f, written in files.values():
                try:
                    f.flush()
                    written.close(f.tell())
                except OSError:
                    pass  # a full disk: the write that hit it has already raised, naming the file
                finally:
                    f.close()
        return results

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(run, t, picked) for t, picked in enumerate(shares) if picked]
        return [r for fut in futures for r in fut.result()]


def write_failure(file: Path, key: str, e: BaseException) -> str:
    """One line for a failed write: the file, the entry, the error, and the space left where it was going (or,
    for an allocation that failed while writing, that memory ran out: no hint at the disk)."""
    import shutil

    text = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [""])[0]
    if out_of_memory(e):
        return (f"{file}: writing {quoted(key)} failed: out of memory ({type(e).__name__}: {text[:200]}): "
                f"{OUT_OF_MEMORY_ADVICE}")
    try:
        free = f"{shutil.disk_usage(file.parent).free:,} bytes free there"
    except OSError:
        free = "free space unknown"
    return f"{file}: writing {quoted(key)} failed ({type(e).__name__}: {text[:200]}; {free}): a full disk or quota?"


def finish_metadata(path: str | Path, items_per_rank: list[list[WriteItem]], results: list[WriteResult],
                    checkpoint_id: str | Path | None = None) -> None:
    """Write `.metadata` for the data files (of every process: their WriteResults gathered here), recording
    `checkpoint_id` (where the checkpoint will live) as DCP's own save records the path it saved to."""
    write_metadata(path, items_per_rank, results, str(checkpoint_id) if checkpoint_id is not None else None)


def extra_state_payload() -> io.BytesIO:
    """What megatron stores for a module's `_extra_state` ShardedObject when there is none: torch.save([None])."""
    buf = io.BytesIO()
    torch.save([None], buf)
    buf.seek(0)
    return buf


_IOV_MAX = 1024  # Linux's limit on buffers per preadv
_MIN_RUN_BYTES = 512  # narrower column chunks cost more in syscall buffers than the copy they save
_MAX_RUNS = 1 << 20


def _runs(size: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...],
          itemsize: int) -> tuple[list[int], int] | None:
    """The chunk at `offsets`/`sizes` of a contiguous tensor of `size`, as the element offsets of its
    contiguous runs, in the chunk's own (row-major) order, and their common length; None when the chunk is
    empty or cut into too many or too narrow runs."""
    split = max((d for d in range(len(size)) if sizes[d] != size[d]), default=-1)
    length, count = 1, 1
    for d, n in enumerate(sizes):
        if d >= max(split, 0):
            length *= n
        else:
            count *= n
    if length == 0 or count > _MAX_RUNS or (count > 1 and length * itemsize < _MIN_RUN_BYTES):
        return None
    strides = [1] * len(size)
    for d in range(len(size) - 2, -1, -1):
        strides[d] = strides[d + 1] * size[d + 1]
    starts = [sum(o * s for o, s in zip(offsets, strides))]
    for d in range(split - 1, -1, -1):  # every index of the dimensions before the last split one, last fastest
        if sizes[d] > 1:
            starts = [s + i * strides[d] for i in range(sizes[d]) for s in starts]
    return starts, length


def _fill(f, views: list, at: int, done: int) -> bool:
    """Finish a short preadv: the rest of `views` from offset `at` + `done`. False if the file ends first."""
    for v in views:
        if done >= len(v):
            done -= len(v)
            at += len(v)
            continue
        while done < len(v):
            got = os.preadv(f.fileno(), [v[done:]], at + done)
            if got <= 0:
                return False
            done += got
        at += len(v)
        done = 0
    return True


@contextmanager
def dcp_failures_named(what: str):
    """DCP reports a failed load as `CheckpointException`, a BaseException (an `except Exception` misses
    it) whose text is a multi-rank traceback. Turn it into one CheckpointError line naming `what` and the
    first underlying error."""
    from torch.distributed.checkpoint.api import CheckpointException  # DCP's own load is running: it is loaded

    try:
        yield
    except CheckpointException as e:
        failures = getattr(e, "failures", None) or {}
        first = next(iter(failures.values()), (e, None))[0]
        text = str(first).splitlines()[0] if str(first) else ""
        raise CheckpointError(f"{what}: DCP could not load it ({type(first).__name__}: {text[:200]})") from None


class Strip(NamedTuple):
    """One chunk of a stored tensor as bytes: rows [first, first + rows), each holding `width` bytes of the
    tensor's row from byte `col` on (the whole row, or a column strip of a row-parallel weight at TP > 1),
    stored one after another from `offset` of the open data file `file`."""

    first: int
    rows: int
    col: int
    width: int
    file: object
    offset: int
    where: str


class StoredRows:
    """A stored tensor split only along its first two dimensions (TP=1, a row-split TP chunk, the column strips
    of a row-parallel weight, a stacked layer), seen as the byte ranges of its chunks' data: any run of the
    tensor's rows is then a few plain reads, into whatever buffer the caller reuses, with no tensor built. Made
    by `DCPReader.stored_rows`, which has checked each record as `_read_in_place` does; holds the data files
    open until `close()`.

    `unit`: 1 when every chunk holds whole rows (a run of rows is a byte range of one chunk); else a row's
    bytes, as a row is then gathered from every strip, and a reader is asked for whole rows only."""

    def __init__(self, key: str, row_bytes: int, strips: list[Strip]):
        self.key, self.row_bytes = key, row_bytes
        self.strips = sorted(strips, key=lambda s: (s.first, s.col))
        self.unit = 1 if all(s.width == row_bytes for s in strips) else row_bytes

    def pieces(self, start: int, stop: int, scratch: torch.Tensor | None = None) -> list[tuple[Callable, int]]:
        """Rows [start, stop) as `StreamedChunk` pieces, (read(buf, at), length): one per chunk they span, or,
        for column strips, one gathering each block of rows through `scratch` (uint8, as large as the blocks)."""
        if self.unit != 1:
            return [(lambda buf, at: self._gather(buf, start + at // self.row_bytes, scratch),
                     (stop - start) * self.row_bytes)]
        out = []
        for s in self.strips:
            lo, hi = max(start, s.first), min(stop, s.first + s.rows)
            if lo < hi:
                base = s.offset + (lo - s.first) * self.row_bytes
                out.append((lambda buf, at, s=s, base=base: _read_exactly(s.file, buf, base + at, s.where),
                            (hi - lo) * self.row_bytes))
        return out

    def _gather(self, buf: memoryview, first: int, scratch: torch.Tensor) -> None:
        """Rows [first, first + k) into `buf` (k whole rows): each strip's part of them is one contiguous read
        into `scratch`, then copied into its columns."""
        k = len(buf) // self.row_bytes
        rows = torch.frombuffer(buf, dtype=torch.uint8).view(k, self.row_bytes)
        for s in self.strips:
            lo, hi = max(first, s.first), min(first + k, s.first + s.rows)
            if lo < hi:
                part = scratch[:(hi - lo) * s.width]
                _read_exactly(s.file, memoryview(part.numpy()), s.offset + (lo - s.first) * s.width, s.where)
                rows[lo - first:hi - first, s.col:s.col + s.width].copy_(part.view(hi - lo, s.width))

    def close(self) -> None:
        for f in {id(s.file): s.file for s in self.strips}.values():
            f.close()

    def __enter__(self) -> StoredRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_exactly(f, buf: memoryview, at: int, where: str) -> None:
    if not _fill(f, [buf], at, 0):  # a regular file reads short only at its end: it shrank since it was checked
        raise CheckpointError(f"{where}: the file ends inside the chunk's data")


class DCPReader:
    """Keys, shapes and one-key-at-a-time loads of a DCP directory.

    The metadata is read safely (`safe_pickle.load_dcp_metadata`) and checked up front: every chunk inside its tensor, the
    chunks tiling it, every record under a plain file name. Each chunk is then torch.load-ed
    (weights_only) from its byte range and must hold exactly the dtype and shape `.metadata` gives it: DCP's
    own load would copy a chunk of another dtype into the preallocated tensor, converting it silently (a
    `.metadata` that lies about one chunk's dtype at TP > 1 would pass)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / METADATA_FILE).is_file():
            raise FileNotFoundError(f"{self.path}: no .metadata: not a torch.distributed.checkpoint directory")
        self.metadata = load_dcp_metadata(self.path / METADATA_FILE)
        self._sizes: dict[str, int | None] = {}
        self._views: dict[str, tuple[str, int, TensorStorageMetadata]] = {}  # see view_stacked_layers

    def view_stacked_layers(self, num_layers: int) -> int:
        """See a homogeneous model's stacked layers as the per-layer tensors a heterogeneous checkpoint has.

        megatron's TransformerBlock saves per-layer keys `decoder.layers.{i}.X` only for heterogeneous layers;
        a homogeneous model (a Megatron-LM Llama run) is saved as one entry per module, `decoder.layers.X`, with
        a leading axis over all the model's layers (each layer of each rank its own [1, ...] chunk). After this
        call such an entry (leading dimension `num_layers`) is listed and loaded as `decoder.layers.{i}.X`,
        reading only the chunks of layer i, each checked as any other chunk. Returns the entries so seen."""
        self._views.clear()
        stacked = 0
        entries = self.metadata.state_dict_metadata
        for key, md in entries.items():
            if not isinstance(md, TensorStorageMetadata) or not key.startswith(LAYERS_PREFIX):
                continue
            rest = key[len(LAYERS_PREFIX):]
            if rest.split(".", 1)[0].isdigit() or not md.size or md.size[0] != num_layers:
                continue
            stacked += 1
            for i in range(num_layers):
                view = f"{LAYERS_PREFIX}{i}.{rest}"
                if view in entries:
                    raise CheckpointError(f"{self.path / METADATA_FILE}: {quoted(view)} is stored both on its own "
                                          f"and in the stacked {quoted(key)}")
                chunks = [ChunkStorageMetadata(offsets=torch.Size(c.offsets[1:]), sizes=torch.Size(c.sizes[1:]))
                          for c in md.chunks if c.offsets[0] <= i < c.offsets[0] + c.sizes[0]]
                self._views[view] = (key, i, TensorStorageMetadata(properties=md.properties,
                                                                   size=torch.Size(md.size[1:]), chunks=chunks))
        return stacked

    @property
    def stacked(self) -> bool:
        """Whether any stacked layer entry is being viewed per layer (see view_stacked_layers)."""
        return bool(self._views)

    def tensor_keys(self) -> dict[str, TensorStorageMetadata]:
        sources = {src for src, _, _ in self._views.values()}
        out = {k: v for k, v in self.metadata.state_dict_metadata.items()
               if isinstance(v, TensorStorageMetadata) and k not in sources}
        out.update({view: md for view, (_, _, md) in self._views.items()})
        return out

    def object_keys(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]

    def load(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor `key` (assembled from its chunks), in `dtype` if given, else as stored."""
        if key in self._views:
            return self._load_layer(key, dtype)
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{self.path / METADATA_FILE}: no tensor {quoted(key)}")
        self._check_bytes_present(key, md)
        out = torch.empty(tuple(md.size), dtype=dtype or md.properties.dtype)
        for chunk in md.chunks:
            if out.dtype == md.properties.dtype and self._read_in_place(key, md, chunk, out):
                continue
            part = self._read_chunk(key, md, chunk)
            out[tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))].copy_(part)
            del part
        return out

    def _load_layer(self, view: str, dtype: torch.dtype | None) -> torch.Tensor:
        """Layer i of a stacked entry, from the chunks that hold layer i (megatron writes one per layer and TP
        rank, so this reads just that layer's bytes)."""
        key, i, md, chunks = self._layer_chunks(view)
        vmd = self._views[view][2]
        self._check_bytes_present(key, md, chunks)
        if len(chunks) == 1 and chunks[0].sizes[0] == 1 and tuple(chunks[0].sizes[1:]) == tuple(vmd.size) \
                and dtype in (None, md.properties.dtype):
            return self._read_chunk(key, md, chunks[0])[0]
        out = torch.empty(tuple(vmd.size), dtype=dtype or md.properties.dtype)
        for chunk in chunks:
            part = self._read_chunk(key, md, chunk)
            out[tuple(slice(o, o + n) for o, n in zip(chunk.offsets[1:], chunk.sizes[1:]))].copy_(
                part[i - chunk.offsets[0]])
            del part
        return out

    def stored_rows(self, key: str) -> StoredRows | None:
        """`key`'s chunks as `StoredRows`, or None when it must be loaded instead: a chunk split along a third
        dimension, a compressed record, or one that is not the plain tensor torch writes (`tensor_span`). A
        stacked layer's chunk holds that layer's rows at a fixed offset."""
        if key in self._views:
            stored, layer, md, chunks = self._layer_chunks(key)
            size, lead = tuple(self._views[key][2].size), 1
        else:
            stored, layer, md = key, 0, self.metadata.state_dict_metadata.get(key)
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointError(f"{self.path / METADATA_FILE}: no tensor {quoted(key)}")
            chunks, size, lead = md.chunks, tuple(md.size), 0
        if not size or any(tuple(c.sizes[lead + 2:]) != size[2:] for c in chunks):
            return None
        self._check_bytes_present(stored, md, chunks)
        dtype = md.properties.dtype
        row_bytes = math.prod(size[1:]) * dtype.itemsize
        inner = math.prod(size[2:]) * dtype.itemsize  # bytes per index of the second dimension
        strips: list[Strip] = []
        files: dict[str, object] = {}
        try:
            for c in chunks:
                info = self.metadata.storage_data[MetadataIndex(stored, c.offsets)]
                if getattr(info, "transform_descriptors", None):
                    return None
                name = info.relative_path
                if name not in files:
                    files[name] = open(self.path / name, "rb", buffering=0)
                span = tensor_span(FileRange(files[name], info.offset, info.length), dtype, tuple(c.sizes))
                if span is None:
                    return None
                # a stacked chunk holds its layers one after another: skip the ones before `layer`
                skip = (layer - c.offsets[0]) * math.prod(c.sizes[1:]) * dtype.itemsize if lead else 0
                col, width = (c.offsets[lead + 1] * inner, c.sizes[lead + 1] * inner) if len(size) > 1 \
                    else (0, row_bytes)
                strips.append(Strip(c.offsets[lead], c.sizes[lead], col, width, files[name],
                                    info.offset + span.offset + skip,
                                    f"{self.path / name}: the chunk of {quoted(stored)} at {list(c.offsets)}"))
            return StoredRows(key, row_bytes, strips)
        finally:
            if len(strips) < len(chunks):  # given up on (or failed): StoredRows did not take the files
                for f in files.values():
                    f.close()

    def _layer_chunks(self, view: str):
        """A per-layer view's stacked entry: (its key, the layer, its metadata, the chunks holding the layer)."""
        stored, i, _ = self._views[view]
        md = self.metadata.state_dict_metadata[stored]
        return stored, i, md, [c for c in md.chunks if c.offsets[0] <= i < c.offsets[0] + c.sizes[0]]

    def read_ranges(self, key: str) -> list[tuple[Path, int, int]]:
        """(file, offset, length) of every record `load(key)` reads, in the order it reads them."""
        if key in self._views:
            stored, _, _, chunks = self._layer_chunks(key)
        else:
            stored, chunks = key, self.metadata.state_dict_metadata[key].chunks
        infos = [self.metadata.storage_data[MetadataIndex(stored, c.offsets)] for c in chunks]
        return [(self.path / info.relative_path, info.offset, info.length) for info in infos]

    def tensor_bytes(self, key: str) -> int:
        md = self._views[key][2] if key in self._views else self.metadata.state_dict_metadata[key]
        n = md.properties.dtype.itemsize
        for d in md.size:
            n *= d
        return n

    def load_object(self, key: str):
        """A BYTE_IO entry (a module's `_extra_state`, megatron-core 0.19's `common_state`), unpickled with
        torch.load(weights_only=True) and the allow-list of `safe_pickle.load_common`."""
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, BytesStorageMetadata):
            raise CheckpointError(f"{self.path / METADATA_FILE}: no object {quoted(key)}")
        info = self.metadata.storage_data[MetadataIndex(key)]
        where = f"{self.path / info.relative_path}: object {quoted(key)}"
        with open(self.path / info.relative_path, "rb", buffering=0) as f:
            raw = self._untransformed(FileRange(f, info.offset, info.length), info, where).read()
        return load_common(raw, where=where)

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
        for view, (key, _, _) in self._views.items():  # a stacked entry's problem is each of its layers'
            if key in out:
                out[view] = out[key]
        return out

    def _check_bytes_present(self, key: str, md: TensorStorageMetadata, chunks=None) -> None:
        """Before allocating the tensor: every chunk's record (of `chunks`, default all) is inside its data
        file (a short file would otherwise be found only after a tensor of the claimed size was allocated)."""
        for chunk in md.chunks if chunks is None else chunks:
            info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
            name = info.relative_path
            if name not in self._sizes:
                p = self.path / name
                self._sizes[name] = p.stat().st_size if p.is_file() else None
            if self._sizes[name] is None:
                raise CheckpointError(f"{self.path / METADATA_FILE}: {quoted(key)} is stored in {name}, which is missing")
            if info.offset + info.length > self._sizes[name]:
                raise CheckpointError(f"{self.path / name}: truncated: the chunk of {quoted(key)} at "
                                      f"{list(chunk.offsets)} needs bytes up to {info.offset + info.length}, the "
                                      f"file has {self._sizes[name]}")

    def _read_in_place(self, key: str, md: TensorStorageMetadata, chunk, out: torch.Tensor) -> bool:
        """Read one chunk's bytes straight into its place in `out` (contiguous, of the stored dtype): one read
        when the chunk is a contiguous block of `out` (a whole tensor, a row-split TP chunk), else one
        scattered read per 1024 rows (a column-split chunk: each row a run of `out`). False, with nothing
        read, when the record is not the plain tensor torch writes (see `torch_record.tensor_span`) or the
        runs are too small to be worth it; the caller then torch.loads it.

        DCP's own load, and torch.load, would read each chunk into a fresh tensor and then copy it into the
        assembled one: a second allocation and copy of every byte, which this skips."""
        info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        item = out.element_size()
        runs = _runs(tuple(md.size), tuple(chunk.offsets), tuple(chunk.sizes), item)
        if runs is None or getattr(info, "transform_descriptors", None):  # compressed records: torch.load's job
            return False
        where = f"{self.path / info.relative_path}: the chunk of {quoted(key)} at {list(chunk.offsets)}"
        with open(self.path / info.relative_path, "rb", buffering=0) as f:
            span = tensor_span(FileRange(f, info.offset, info.length), md.properties.dtype, tuple(chunk.sizes))
            if span is None:
                return False
            memory = memoryview(out.view(-1).view(torch.uint8).numpy())
            at, (starts, length) = info.offset + span.offset, runs
            for first in range(0, len(starts), _IOV_MAX):
                views = [memory[s * item:(s + length) * item] for s in starts[first:first + _IOV_MAX]]
                want = sum(len(v) for v in views)
                got = os.preadv(f.fileno(), views, at)
                if got != want:  # a regular file reads short only at its end: it shrank since it was checked
                    if got <= 0 or not _fill(f, views, at, got):
                        raise CheckpointError(f"{where}: the file ends inside the chunk's data")
                at += want
        return True

    def _read_chunk(self, key: str, md: TensorStorageMetadata, chunk) -> torch.Tensor:
        """One chunk, from its record (torch.load, weights_only), checked against `.metadata`."""
        info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        where = f"{self.path / info.relative_path}: the chunk of {quoted(key)} at {list(chunk.offsets)}"
        try:
            with open(self.path / info.relative_path, "rb", buffering=0) as f:
                stream = self._untransformed(FileRange(f, info.offset, info.length), info, where)
                t = torch.load(stream, map_location="cpu", weights_only=True)
        except CheckpointError:
            raise
        except pickle.UnpicklingError as e:
            raise UnsafePickleError(f"{where}: {weights_only_reason(str(e))}") from None
        except Exception as e:  # a garbled record: the zip reader's complaint, on one line
            text = str(e).splitlines()[0] if str(e) else ""
            raise CheckpointError(f"{where}: cannot be read ({type(e).__name__}: {text[:200]})") from None
        if isinstance(t, torch.nn.Parameter):
            t = t.detach()
        if type(t) is not torch.Tensor or t.layout != torch.strided or t.dtype != md.properties.dtype \
                or tuple(t.shape) != tuple(chunk.sizes):
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            raise CheckpointError(f"{where} holds {got}, .metadata says {md.properties.dtype} {list(chunk.sizes)}")
        return t

    def _untransformed(self, stream, info, where: str):
        """The record as torch.save wrote it: through DCP's stream transforms (compression, torch >= 2.7) when
        the entry names any."""
        descriptors = getattr(info, "transform_descriptors", None)
        if not descriptors:
            return stream
        from torch.distributed.checkpoint import FileSystemReader  # only for compressed records: rare

        transforms = getattr(FileSystemReader(str(self.path)), "transforms", None)
        if transforms is None:
            raise CheckpointError(f"{where}: stored with transforms {list(descriptors)}, which this torch "
                                  f"cannot undo")
        try:
            out = transforms.transform_load_stream(None, descriptors, stream)
            return out if out.seekable() else io.BytesIO(out.read())
        except Exception as e:
            raise CheckpointError(f"{where}: stored with transforms {list(descriptors)}, which cannot be undone "
                                  f"({type(e).__name__}: {str(e)[:200]})") from None
