"""HF safetensors -> Megatron torch_dist: the job every process of a conversion builds the same way.

config.json -> plan -> bound mappings -> every source tensor checked against the plan (before anything is
written) -> one DCP write item per Megatron chunk, grouped per simulated Megatron rank (TP fastest, then PP),
so the data files are laid out as a run at that layout writes them -> the chunks of each tensor produced together
from one read of exactly the HF rows they need.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import dtypes
from ..errors import ConversionError
from ..io.dcp import bytes_item, extra_state_payload, tensor_item, write_failure
from ..io.streamed import BLOCK_BYTES, STREAM_MIN_BYTES, HoleChunk, StreamedChunk, can_stream, pwrite_all
from ..io.writeback import WRITEBACK
from ..io.hf_index import quoted
from ..io.hf_reader import HFCheckpoint
from ..io.quantized import open_checkpoint
from ..io.hf_checkpoint import GENERATION_CONFIG, carry_files, has_tokenizer
from ..io.megatron_checkpoint import DESCRIPTION_FORMAT, FORMAT_VERSION, HF_FILES_DIR, ITERATION_DIR, \
    common_state, write_description, write_megatron_files
from ..layout import require_layout
from ..mappings import Chunk, TensorMapping, bind, ignored_hf_key
from ..megatron.compat import COMMON_STATE, COMMON_STATE_KEY, common_forms, common_state_payload
from ..plan import load_config, load_plan
from .common import ErrorSink, FiniteCount, Summary, check_finite


def check_hf_sources(ckpt: HFCheckpoint, maps: list[TensorMapping], keep: bool = True) -> None:
    """Every expected tensor present with the planned shape, nothing left over; with `keep` (no --dtype), the
    HF tensors that one Megatron tensor fuses (q/k/v, gate/up) in one dtype, or that tensor would round some of
    them to the first one's. Runs before any write."""
    problems, expected = [], {}
    for m in maps:
        for key, shape in zip(m.hf, m.hf_shapes):
            expected[key] = (m, shape)
    for key, (m, shape) in expected.items():
        info = ckpt.tensors.get(key)
        if info is None:
            problems.append(f"{m.where}: missing tensor '{key}' (expected shape {list(shape)})")
        elif info.shape != shape:
            problems.append(f"{m.where}: tensor '{key}' has shape {list(info.shape)}, the config implies {list(shape)}")
        elif not info.dtype.is_floating_point:
            problems.append(f"{m.where}: tensor '{key}' has non-float dtype {info.dtype}")
    for m in maps if keep else ():
        held = {k: ckpt.tensors[k].dtype for k in m.hf if k in ckpt.tensors}
        if len(set(held.values())) > 1:
            problems.append(f"{m.where}: '{m.megatron}' fuses tensors of different dtypes ("
                            + ", ".join(f"{quoted(k)} {dtypes.config_name(d)}" for k, d in held.items())
                            + "): one Megatron tensor has one dtype, so choose it with --dtype")
    leftover = sorted(k for k in ckpt.tensors if k not in expected and not ignored_hf_key(k))
    for key in leftover:
        problems.append(f"unexpected tensor {quoted(key)} {list(ckpt.tensors[key].shape)}: the config has no place "
                        f"for it (does config.json match the weights?)")
    if problems:
        raise ConversionError(f"{len(problems)} problem(s) with the HF checkpoint {ckpt.dir}, nothing written:\n  - "
                              + "\n  - ".join(problems[:50]))


def megatron_write_items(maps: list[TensorMapping], tp: int, pp: int,
                         dtype_of: Callable[[TensorMapping], torch.dtype]):
    """One list of DCP write items per Megatron rank, and a lookup from item to (mapping, chunk)."""
    items: list[list] = [[] for _ in range(tp * pp)]
    lookup: dict = {}
    for m in maps:
        for c in m.chunks(tp):
            item = tensor_item(m.megatron, m.shape, c.offsets, c.sizes, dtype_of(m))
            items[m.stage * tp + c.tp_rank].append(item)  # megatron's rank order: TP fastest, then PP
            lookup[(m.megatron, tuple(c.offsets))] = (m, c)
        for key in m.extra_state:
            # Megatron names a ShardedObject entry key/shard_{offsets}_{fragments}; one shard whatever the TP.
            items[m.stage * tp].append(bytes_item(f"{key}/shard_0_1", 0))
    return items, lookup


def add_common_state_item(items: list[list], target: str) -> tuple[str, ...]:
    """The common-state forms for a `--megatron-core` target; when they include 0.19's common_state object, its
    write item goes to rank 0's items (in a megatron save rank 0 writes it, as the main replica)."""
    forms = common_forms(target)
    if COMMON_STATE in forms:
        items[0].append(bytes_item(COMMON_STATE_KEY, 0))
    return forms


def common_state_group(group: list):
    """(item, payload) of a group holding the common_state object, else None."""
    if len(group) == 1 and group[0].index.fqn == COMMON_STATE_KEY:
        return group[0], common_state_payload(common_state())
    return None


class TensorGroups:
    """The write items of a Megatron checkpoint grouped by tensor (its chunks, then its extra-state objects),
    in model order, with the rank each item belongs to: a group is produced from one read of its source. An
    object no tensor owns (the common_state object) is a group of its own, after the tensors."""

    def __init__(self, maps: list[TensorMapping], items_per_rank: list[list]):
        self.rank = {id(it): r for r, items in enumerate(items_per_rank) for it in items}
        by_tensor: dict[str, list] = {m.megatron: [] for m in maps}
        owner = {f"{k}/shard_0_1": m.megatron for m in maps for k in m.extra_state}
        alone: list[list] = []
        for items in items_per_rank:
            for it in items:
                if it.type.name != "BYTE_IO":
                    by_tensor[it.index.fqn].append(it)
                elif it.index.fqn in owner:
                    by_tensor[owner[it.index.fqn]].append(it)
                else:
                    alone.append([it])
        self.groups = [by_tensor[m.megatron] for m in maps] + alone

    def rank_of(self, item) -> int:
        return self.rank[id(item)]

    @staticmethod
    def write_bytes(group: list) -> int:
        return sum(math.prod(it.tensor_data.chunk.sizes) * it.tensor_data.properties.dtype.itemsize
                   for it in group if it.type.name != "BYTE_IO")


class ToMegatronJob:
    """hf_to_megatron's inputs, checked, and the Megatron chunks to write (each process of a distributed job
    builds the same job and writes its share of `items`)."""

    direction = "hf-to-megatron"

    def __init__(self, hf_dir: Path, out_dir: Path, tp: int, pp: int, dtype, strict: bool,
                 progress: Callable[[int], None] | None, megatron_core: str = "any"):
        self.hf_dir, self.tp, self.pp, self.strict, self.progress = Path(hf_dir), tp, pp, strict, progress
        self.want = dtypes.parse(dtype, keep=True)
        common_forms(megatron_core)  # an unknown target is refused before any read
        self.config = load_config(hf_dir)
        self.plan = load_plan(self.config)
        require_layout(self.plan, tp, pp)
        self.ckpt = open_checkpoint(hf_dir, self.config)  # a ModelOpt FP8/NVFP4 checkpoint reads dequantized
        self.maps = bind(self.plan, tp, pp)
        check_hf_sources(self.ckpt, self.maps, keep=self.want is None)
        self.src_dtype = {m.megatron: self.ckpt.tensors[m.hf[0]].dtype for m in self.maps}
        self.items, self.lookup = megatron_write_items(self.maps, tp, pp, self.dtype_of)
        self.common_forms = add_common_state_item(self.items, megatron_core)
        self.grouped = TensorGroups(self.maps, self.items)
        self.sink, self.summary = ErrorSink(), Summary(self.direction, str(hf_dir), str(out_dir))
        self.counter = threading.Lock()
        self.streams = can_stream() and type(self.ckpt) is HFCheckpoint  # a quantized source dequantizes

    def dtype_of(self, m: TensorMapping) -> torch.dtype:
        return self.want or self.src_dtype[m.megatron]

    def read_bytes(self, m: TensorMapping) -> int:
        return sum(self.ckpt.tensors[k].nbytes for k in m.hf)

    def total_bytes(self) -> int:
        return self.ckpt.total_bytes()

    def produce(self, group: list):
        """(item, data) for every item of one tensor's group. A chunk that is a plain copy of source bytes is
        a `StreamedChunk`, written a block at a time; the column strips of a row-parallel weight are
        `HoleChunk`s, filled once all of them are written (`fill_strips`); the others are read together into
        tensors. A source that cannot be read, or NaN/Inf under `strict`, is recorded and the chunk still
        written (zeros in place of what could not be read), so the rank's files complete and the job then fails
        naming every problem (they are checked before the commit)."""
        alone = common_state_group(group)
        if alone is not None:
            yield alone
            return
        chunked = [it for it in group if it.type.name != "BYTE_IO"]
        m = self.lookup[(chunked[0].index.fqn, tuple(chunked[0].index.offset))][0]
        chunks = [self.lookup[(it.index.fqn, tuple(it.index.offset))][1] for it in chunked]
        dtype = self.dtype_of(m)
        what = f"{m.where}: {m.megatron} (from {', '.join(m.hf)})"
        pieces = [self.stream_pieces(m, c, dtype) for c in chunks]
        strips = [self.strip_chunk(m, c, dtype) for c in chunks]  # filled below, from one pass over the rows
        plain = [c for c, p, h in zip(chunks, pieces, strips) if p is None and not h]
        read: list[torch.Tensor] = []
        if plain:
            try:
                read = m.read_chunks(self.ckpt, plain, dtype)
                for t in read:
                    check_finite(t, what, self.sink, self.strict)
            except Exception as e:  # noqa: BLE001 - reported after the files are written
                self.sink.error(f"{m.where}: {m.megatron}: {type(e).__name__}: {e}")
                read = [torch.zeros(c.sizes, dtype=dtype) for c in plain]
        failed: list[str] = []

        def fail(e: BaseException) -> None:  # once per tensor, however many of its chunks the error stops
            if not failed:
                failed.append(f"{m.where}: {m.megatron}: {type(e).__name__}: {e}")
                self.sink.error(failed[0])

        holes: list[tuple[HoleChunk, Chunk]] = []
        for item, c, p, strip in zip(chunked, chunks, pieces, strips):
            if strip:
                holes.append((HoleChunk(dtype, tuple(c.sizes), lambda c=c: self.read_strip(m, c, dtype, what, fail)),
                              c))
                yield item, holes[-1][0]
                continue  # counted once filled
            if p is None:
                yield item, read.pop(0)
            else:
                finite = FiniteCount(what, self.sink, self.strict)
                yield item, StreamedChunk(dtype, tuple(c.sizes), p, finite, fail)
                finite.report()
            # counted once written: the consumer asks for the next item only after writing this one
            self._count(math.prod(c.sizes) * dtype.itemsize)
        if holes:  # every strip's record is written (the consumer asked for the next item): fill them
            self.fill_strips(m, holes, dtype, what, fail)
            for _, c in holes:
                self._count(math.prod(c.sizes) * dtype.itemsize)
        for item in group:
            if item.type.name == "BYTE_IO":
                yield item, extra_state_payload()

    def _count(self, nbytes: int) -> None:
        with self.counter:
            self.summary.bytes_written += nbytes
            self.summary.chunks += 1
        if self.progress is not None:
            self.progress(nbytes)

    def strip_chunk(self, m: TensorMapping, chunk, dtype: torch.dtype) -> bool:
        """Whether `chunk` is a column strip of one HF tensor (a row-parallel weight at TP > 1), in the source's
        dtype, written as a `HoleChunk` and filled by `fill_strips`; False: read whole (`read_chunks`)."""
        if not self.streams or m.tp_rule != "cols" or len(m.hf) != 1 or len(m.shape) != 2:
            return False
        name = m.hf[0]
        info = self.ckpt.tensors[name]
        return (info.dtype == dtype and tuple(info.shape) == tuple(m.shape) and chunk.sizes[1] != m.shape[1]
                and m.numel * dtype.itemsize >= STREAM_MIN_BYTES)

    def read_strip(self, m: TensorMapping, chunk, dtype: torch.dtype, what: str, fail) -> torch.Tensor:
        """The whole strip, read the plain way (where torch's record cannot be left with a hole); zeros, with
        the error sent to `fail`, when the source cannot be read."""
        try:
            t = m.read_chunk(self.ckpt, chunk, dtype)
        except Exception as e:  # noqa: BLE001 - reported after the files are written
            fail(e)
            return torch.zeros(tuple(chunk.sizes), dtype=dtype)
        check_finite(t, what, self.sink, self.strict)
        return t

    def fill_strips(self, m: TensorMapping, holes: list, dtype: torch.dtype, what: str, fail) -> None:
        """Fill the strips' records from one pass over the source tensor's rows: a block of whole rows read, and
        each strip's columns of it copied together, checked for NaN/Inf and written at their place (a strip
        saved whole instead, see `HoleChunk`, was checked when it was read). A read that fails goes to `fail`
        and leaves the rest of the holes as zeros (the job fails before the commit)."""
        holes = [(hole, c) for hole, c in holes if hole.hole is not None]
        if not holes:
            return
        name = m.hf[0]
        rows, row_bytes = m.shape[0], m.shape[1] * dtype.itemsize
        step = max(1, BLOCK_BYTES // row_bytes)
        block = torch.empty(min(step, rows) * row_bytes, dtype=torch.uint8)
        scratch = torch.empty(min(step, rows) * max(c.sizes[1] for _, c in holes) * dtype.itemsize,
                              dtype=torch.uint8)
        finite = FiniteCount(what, self.sink, self.strict)
        for r in range(0, rows, step):
            n = min(step, rows - r)
            whole = block[:n * row_bytes]
            try:
                self.ckpt.read_bytes(name, r * row_bytes, memoryview(whole.numpy()))
            except Exception as e:  # noqa: BLE001 - reported through `fail`, the rest of the holes zeros
                fail(e)
                break
            for hole, c in holes:
                fd, path, base = hole.hole
                col, width = c.offsets[1] * dtype.itemsize, c.sizes[1] * dtype.itemsize
                part = scratch[:n * width]
                part.view(n, width).copy_(whole.view(n, row_bytes)[:, col:col + width])
                finite(part.view(dtype))
                try:
                    pwrite_all(fd, memoryview(part.numpy()), base + r * width)
                except OSError as e:  # disk full: the file and the tensor, on one line
                    raise ConversionError(write_failure(Path(path), m.megatron, e)) from None
        finite.report()
        for hole, c in holes:  # now dirty: the file's sequential write-back had passed them as holes
            WRITEBACK.submit(hole.hole[1], hole.hole[2], math.prod(c.sizes) * dtype.itemsize)

    def stream_pieces(self, m: TensorMapping, chunk, dtype: torch.dtype):
        """The chunk as `StreamedChunk` pieces (readers of source byte ranges, None for padding), or None when
        it is read whole: a dtype conversion, a quantized source, strided columns, or too small to gain."""
        if not self.streams or any(self.ckpt.tensors[k].dtype != dtype for k in m.hf):
            return None
        pieces = m.byte_pieces(chunk, dtype.itemsize)
        if pieces is None or sum(n for _, _, n in pieces) < STREAM_MIN_BYTES:
            return None
        return [(None if name is None else
                 (lambda buf, at, name=name, start=start: self.ckpt.read_bytes(name, start + at, buf)), n)
                for name, start, n in pieces]

    def held_bytes(self, group: list) -> int:
        """What producing `group` holds in memory: the chunks it reads whole (a streamed chunk holds only its
        writer thread's block buffer, column strips one block of source rows)."""
        chunked = [it for it in group if it.type.name != "BYTE_IO"]
        if not chunked:
            return 0
        m = self.lookup[(chunked[0].index.fqn, tuple(chunked[0].index.offset))][0]
        dtype = self.dtype_of(m)
        chunks = [self.lookup[(it.index.fqn, tuple(it.index.offset))][1] for it in chunked]
        return sum(math.prod(c.sizes) * dtype.itemsize for c in chunks
                   if self.stream_pieces(m, c, dtype) is None and not self.strip_chunk(m, c, dtype))

    def read_plan(self, groups: list[list]) -> list[tuple[Path, int, int]]:
        """The source byte ranges of `groups`, in their order (the writer threads each go through their share
        of them in that order): each mapping's HF tensors, whole. Empty for a quantized source, which is read
        through its dequantizing reader."""
        if type(self.ckpt) is not HFCheckpoint:
            return []
        plan = []
        for group in groups:
            chunked = [it for it in group if it.type.name != "BYTE_IO"]
            if chunked:
                m = self.lookup[(chunked[0].index.fqn, tuple(chunked[0].index.offset))][0]
                plan.extend((info.file, info.offset, info.nbytes) for info in (self.ckpt.tensors[k] for k in m.hf))
        return plan

    def description(self, checksums: dict) -> dict:
        return {
            "format": DESCRIPTION_FORMAT, "format_version": FORMAT_VERSION,
            "plan": self.plan.to_json(),
            "hf_block_configs": self.plan.hf_block_configs(),
            "megatron_block_configs": self.plan.megatron_block_configs(),
            "tensor_parallel": self.tp, "pipeline_parallel": self.pp,
            "padded_vocab_size": self.maps[0].shape[0],
            "dtype": dtypes.config_name(self.want or sorted(set(self.src_dtype.values()), key=str)[0]),
            "source": {"source_dir": str(self.hf_dir), "source_config": self.config,
                       "source_format": self.plan.source_format, "file_sha256": checksums,
                       **({"quantization": self.ckpt.record()} if hasattr(self.ckpt, "record") else {})},
        }

    def write_description(self, root: Path, checksums: dict) -> None:
        """Everything but the data files: the source's tokenizer and generation config, the description,
        common.pt (unless the target is 0.19 alone), metadata.json (last) and the tracker."""
        it_dir = Path(root) / ITERATION_DIR
        carried = carry_files(self.hf_dir, it_dir / HF_FILES_DIR) if (
            has_tokenizer(self.hf_dir) or (self.hf_dir / GENERATION_CONFIG).is_file()) else []
        desc = self.description(checksums)
        desc["hf_files"] = {"dir": HF_FILES_DIR, "files": carried, "from": str(self.hf_dir)}
        write_description(it_dir, desc)
        write_megatron_files(Path(root), forms=self.common_forms)

    def finish_summary(self, t0: float, files: int) -> Summary:
        s = self.summary
        s.tensors = len(self.maps)
        s.bytes_read = sum(self.ckpt.tensors[k].nbytes for m in self.maps for k in m.hf)
        s.warnings = self.sink.warnings
        s.seconds = time.time() - t0
        s.layout.update(tp=self.tp, pp=self.pp, files=files)
        return s
