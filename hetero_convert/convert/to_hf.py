"""Megatron torch_dist -> HF safetensors: the job every process of a conversion builds the same way.

description (ours, or a training run's args) -> plan -> every stored key checked against the plan (before
anything is written) -> safetensors shards planned from the plan (names, dtypes, shapes) and created -> one
Megatron tensor at a time, at whatever TP it was saved, cut into its HF tensors, each written at its planned
offset (by whichever process the tensor went to): streamed from the records' byte ranges through a small
buffer, or loaded whole where it cannot be -> index, config.json with regenerated block_configs, remote code,
tokenizer.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import torch

from .. import dtypes
from ..errors import ConversionError
from ..io.dcp import ByteBudget, DCPReader, StoredRows
from ..io.description import padding_checked, padding_problem, tensor_problems
from ..io.hf_index import CheckpointError, quoted
from ..io.hf_checkpoint import GENERATION_CONFIG, ShardedWriter, copy_tokenizer, export_schema, has_tokenizer, \
    plan_shards, write_config, write_generation_config
from ..io.megatron_checkpoint import DESCRIPTION_FILE, HF_FILES_DIR, NON_MODEL_PREFIXES, iteration_dir, \
    read_description, read_plan
from ..io.streamed import BLOCK_BYTES, STREAM_MIN_BYTES, StreamedChunk
from ..mappings import TensorMapping, bind
from ..megatron.compat import INTEGRITY_FILE, read_integrity_manifest
from .common import ErrorSink, FiniteCount, Summary, check_finite, parse_size


def check_megatron_keys(reader: DCPReader, maps: list[TensorMapping], description: dict | None = None,
                        plan=None) -> None:
    """Every stored key against the plan's mappings (at TP 1), exactly; and, given our description of the
    checkpoint, what it says about the tensors against them (`io.description.tensor_problems`)."""
    stored = reader.tensor_keys()
    problems = []
    for m in maps:
        md = stored.get(m.megatron)
        if md is None:
            problems.append(f"{m.where}: missing tensor '{m.megatron}' (expected {list(m.shape)})")
            continue
        shape = tuple(md.size)
        if m.vocab_padded:  # saved at any TP: padded to a multiple of 128*TP, never fewer than the vocabulary
            ok = shape[1:] == m.shape[1:] and shape[0] >= m.vocab_rows
        else:
            ok = shape == m.shape
        if not ok:
            problems.append(f"{m.where}: '{m.megatron}' has shape {list(shape)}, the plan implies {list(m.shape)}")
        if md.properties.dtype not in dtypes.WEIGHTS:
            problems.append(f"{m.where}: '{m.megatron}' is stored as {str(md.properties.dtype)[:40]}, no dtype a "
                            f"weight is kept in ({', '.join(map(dtypes.config_name, dtypes.WEIGHTS))})")
    absent = reader.missing_bytes()
    problems += [f"{m.where}: '{m.megatron}': {absent[m.megatron]}" for m in maps if m.megatron in absent]
    if description is not None:
        where = reader.path / DESCRIPTION_FILE
        problems += [f"{where}: {p}" for p in tensor_problems(description, plan, maps, stored)]
    known = {m.megatron for m in maps}
    leftover = sorted(k for k in stored if k not in known and not k.startswith(NON_MODEL_PREFIXES))
    problems += [f"unexpected tensor {quoted(k)} {list(stored[k].size)}: the description has no place for it"
                 for k in leftover]
    if problems:
        raise ConversionError(f"{len(problems)} problem(s) with the Megatron checkpoint {reader.path}, nothing "
                              f"written:\n  - "
                              + "\n  - ".join(problems[:50]))


def unreadable(m: TensorMapping, e: BaseException) -> ConversionError:
    """One line for a stored tensor that could not be read: its layer and key, and the first line of why."""
    return ConversionError(f"{m.where}: cannot read '{m.megatron}': {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}")


def plan_hf_shards(maps: list[TensorMapping], dtype_of, max_bytes: int):
    """The shards' tensor layouts. All HF tensors of one Megatron tensor go to the same shard, so the tensor
    that is loaded once to make them is written into one file."""
    return plan_shards([[(k, dtype_of(m), s) for k, s in zip(m.hf, m.hf_shapes)] for m in maps], max_bytes)


class ToHFJob:
    """megatron_to_hf's inputs, checked, and the safetensors shards to write (each process of a distributed
    job builds the same job and writes its share of the tensors into the shared shard files)."""

    direction = "megatron-to-hf"

    def __init__(self, megatron_dir, out_dir, max_shard_size, dtype, strict: bool,
                 progress: Callable[[int], None] | None, tokenizer_from=None, schema: str | None = None,
                 verify_integrity: bool = True):
        self.strict, self.progress = strict, progress
        self.want = dtypes.parse(dtype, keep=True)
        self.it_dir = iteration_dir(megatron_dir)
        self.reader = DCPReader(self.it_dir)
        notes: list[str] = []
        # the config schema written (auto: the source's)
        self.plan = export_schema(read_plan(self.it_dir, self.reader, notes), schema)
        self.reader.view_stacked_layers(self.plan.num_layers)  # a homogeneous run's layers, seen per layer
        # megatron's optional integrity.json: {file name: sha256}, checked (by the driver) before the commit
        manifest = read_integrity_manifest(self.it_dir)
        self.integrity = manifest if verify_integrity else None
        if manifest is not None and not verify_integrity:
            notes.append(f"{self.it_dir / INTEGRITY_FILE}: not verified (verify_integrity=False)")
        self.maps = bind(self.plan)
        self.description = read_description(self.it_dir) or {}
        check_megatron_keys(self.reader, self.maps, self.description or None, self.plan)
        self.stored = self.reader.tensor_keys()
        carried = self.it_dir / HF_FILES_DIR
        # The tokenizer: the one given, else the one the checkpoint carries from its HF source.
        self.tokenizer_from = Path(tokenizer_from) if tokenizer_from else (carried if has_tokenizer(carried) else None)
        self.generation_config = carried / GENERATION_CONFIG
        self.shard_layout = plan_hf_shards(self.maps, self.dtype_of, parse_size(max_shard_size))
        self.sink, self.summary = ErrorSink(), Summary(self.direction, str(megatron_dir), str(out_dir))
        for note in notes:
            self.sink.warn(note)
        self.lock = threading.Lock()

    def integrity_files(self) -> list[Path]:
        """The files integrity.json lists that exist (a listed file that is missing fails `check_integrity`)."""
        return [self.it_dir / n for n in (self.integrity or {}) if (self.it_dir / n).is_file()]

    def check_integrity(self, digests: dict[str, str]) -> int:
        """Compare the sha256 of the listed files with integrity.json (as megatron's own verification does:
        files it does not list are not checked); ConversionError naming each file that differs or is missing.
        Returns the number of files checked."""
        if self.integrity is None:
            return 0
        problems = []
        for name, want in self.integrity.items():
            got = digests.get(name)
            if got is None:
                problems.append(f"{name}: listed in {INTEGRITY_FILE}, missing from the folder")
            elif got != want:
                problems.append(f"{name}: sha256 {got[:16]}..., {INTEGRITY_FILE} says {want[:16]}...")
        if problems:
            raise ConversionError(f"{self.it_dir}: {len(problems)} file(s) differ from {INTEGRITY_FILE}, nothing "
                                  f"written:\n  - " + "\n  - ".join(problems[:50]))
        return len(self.integrity)

    def dtype_of(self, m: TensorMapping) -> torch.dtype:
        return self.want or self.stored[m.megatron].properties.dtype

    def total_bytes(self) -> int:
        """Bytes of HF tensor data this job writes (vocab padding stripped, in the output dtype)."""
        return sum(math.prod(s) * self.dtype_of(m).itemsize for m in self.maps for s in m.hf_shapes)

    def stored_bytes(self, m: TensorMapping) -> int:
        return self.reader.tensor_bytes(m.megatron)

    def write_tensor(self, m: TensorMapping, w: ShardedWriter, budget: ByteBudget | None,
                     buffers: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One Megatron tensor written as its HF tensors: streamed through the thread's `buffers()` (a block, and
        the scratch rows are gathered in from column strips) when its stored bytes can be (`stored_rows`), else
        loaded whole (any TP it was saved at)."""
        rows = self.stored_rows(m)
        if rows is not None:
            with rows:
                buf, scratch = buffers()
                if rows.unit <= len(buf):  # (a row wider than the block, of column strips: loaded whole)
                    self._stream_tensor(m, w, rows, buf, scratch)
                    return
        held = budget.acquire(self.stored_bytes(m)) if budget else 0
        try:
            self._write_tensor(m, w)
        finally:
            if budget:
                budget.release(held)

    def stored_rows(self, m: TensorMapping) -> StoredRows | None:
        """`m`'s stored chunks as byte ranges of rows (`DCPReader.stored_rows`), or None when it is loaded
        whole: a dtype conversion, a record that is not plain, or a tensor too small to gain."""
        if self.dtype_of(m) != self.stored[m.megatron].properties.dtype or self.stored_bytes(m) < STREAM_MIN_BYTES:
            return None
        try:
            return self.reader.stored_rows(m.megatron)
        except (CheckpointError, OSError) as e:  # a record's header unreadable, a data file gone or unopenable
            raise unreadable(m, e) from e

    def _stream_tensor(self, m: TensorMapping, w: ShardedWriter, rows: StoredRows, buf: torch.Tensor,
                       scratch: torch.Tensor) -> None:
        dtype = self.dtype_of(m)
        failed: list[BaseException] = []
        # The padding rows, read on their own: every stored one (padded for the TP it was saved at, which may be
        # more than m.shape, padded for TP=1).
        stored = self.stored[m.megatron].size[0]
        if self.description and padding_checked(m) and stored > m.vocab_rows:
            pad = StreamedChunk(dtype, (stored - m.vocab_rows,) + tuple(m.shape[1:]),
                                rows.pieces(m.vocab_rows, stored, scratch), lambda block: None, failed.append,
                                rows.unit).materialize(buf)
            self._raise_unreadable(m, failed)
            problem = padding_problem(m, pad)
            if problem:
                raise ConversionError(f"{self.it_dir / DESCRIPTION_FILE}: {problem}")
        for key, ranges, shape in zip(m.hf, m.hf_rows(), m.hf_shapes):
            finite = FiniteCount(f"{m.where}: {key}", self.sink, self.strict)
            chunk = StreamedChunk(dtype, shape, [p for a, n in ranges for p in rows.pieces(a, a + n, scratch)],
                                  finite, failed.append, rows.unit)
            try:
                w.write_streamed(key, chunk, buf)
            except OSError as e:  # disk full, I/O error: say which tensor and shard
                raise ConversionError(f"{m.where}: writing '{key}' to {w.writer_of(key).path}: {e}") from e
            self._raise_unreadable(m, failed)
            finite.report()
            self._count(chunk.nbytes)
        with self.lock:
            self.summary.bytes_read += self.stored_bytes(m)

    @staticmethod
    def _raise_unreadable(m: TensorMapping, failed: list[BaseException]) -> None:
        if failed:
            raise unreadable(m, failed[0]) from failed[0]

    def _count(self, nbytes: int) -> None:
        with self.lock:
            self.summary.chunks += 1
            self.summary.bytes_written += nbytes
        if self.progress is not None:
            self.progress(nbytes)

    def _write_tensor(self, m: TensorMapping, w: ShardedWriter) -> None:
        try:
            full = self.reader.load(m.megatron)
        except Exception as e:  # a corrupt chunk: name the tensor, not only the zip reader's complaint
            raise unreadable(m, e) from e
        if m.vocab_padded and self.description:
            problem = padding_problem(m, full[m.vocab_rows:])
            if problem:
                raise ConversionError(f"{self.it_dir / DESCRIPTION_FILE}: {problem}")
        for key, t in zip(m.hf, m.to_hf(full)):
            t = t.to(self.dtype_of(m))
            check_finite(t, f"{m.where}: {key}", self.sink, self.strict)
            try:
                w.write(key, t)
            except OSError as e:  # disk full, I/O error: say which tensor and shard
                raise ConversionError(f"{m.where}: writing '{key}' to {w.writer_of(key).path}: {e}") from e
            self._count(t.numel() * t.element_size())
        with self.lock:
            self.summary.bytes_read += full.numel() * full.element_size()

    def create_files(self, tmp: Path) -> None:
        """Every shard file with its header (one process, before any process writes its share)."""
        ShardedWriter.create_files(tmp, self.shard_layout)

    def read_plan(self, picked: list[int]) -> list[tuple[Path, int, int]]:
        """The byte ranges `write_tensors(picked)` reads, in the order it starts on them."""
        return [r for i in picked for r in self.reader.read_ranges(self.maps[i].megatron)]

    def tensor_costs(self) -> list[int]:
        """Bytes read and written per Megatron tensor: the unit of work of a job over several processes."""
        return [self.stored_bytes(m) + sum(math.prod(s) for s in m.hf_shapes) * self.dtype_of(m).itemsize
                for m in self.maps]

    def write_tensors(self, tmp: Path, picked: list[int], workers: int) -> None:
        """Write the Megatron tensors `picked` (indices into the mappings) as their HF tensors into the shard
        files `create_files` made, `workers` tensors at a time, each at its planned offset: the processes of a
        job share the files, each with its own tensors (a 16 GB model is four 5 GB shards, which would leave
        eight processes half idle)."""
        # A tensor being loaded costs about its size plus its HF outputs, so the tensors in flight are capped at
        # the largest one's size: peak ~ 2 x largest whatever --workers is.
        budget = ByteBudget(max(self.stored_bytes(m) for m in self.maps)) if workers > 1 else None
        writer = ShardedWriter(tmp, self.shard_layout, tensors={k for i in picked for k in self.maps[i].hf},
                               create=False)
        local = threading.local()

        def buffers() -> tuple[torch.Tensor, torch.Tensor]:  # each writer thread's, made on first use
            if not hasattr(local, "block"):
                local.block = torch.empty(BLOCK_BYTES, dtype=torch.uint8), torch.empty(BLOCK_BYTES, dtype=torch.uint8)
            return local.block

        pool = ThreadPoolExecutor(max_workers=max(1, workers))
        try:
            futures = [pool.submit(self.write_tensor, self.maps[i], writer, budget, buffers) for i in picked]
            # The first failure, wherever it is, stops the queue: no need to finish the tensors before it.
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:  # the first failure in the tensors' order (others may fail meanwhile)
                if f in done:
                    f.result()
            pool.shutdown()
            writer.close()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            writer.abort()
            raise

    def write_metadata(self, tmp: Path) -> None:
        """Everything but the shards: the index (when sharded), config.json, generation config, remote code,
        and the tokenizer (given, or carried from the HF source); a missing tokenizer is a warning."""
        ShardedWriter(tmp, self.shard_layout, tensors=set()).write_index()
        out_dtype = self.want or self.stored[self.maps[0].megatron].properties.dtype
        source_config = (self.description.get("source") or {}).get("source_config")
        write_config(tmp, self.plan, out_dtype, source_config)
        write_generation_config(tmp, self.plan, self.generation_config)
        if self.tokenizer_from is None:
            self.sink.warn("no tokenizer written: the checkpoint carries none (its source had none, or it was not "
                           "made by hf-to-megatron); pass tokenizer_from (--tokenizer-from DIR) to add one")
        elif not copy_tokenizer(self.tokenizer_from, tmp):
            raise ConversionError(f"tokenizer_from {self.tokenizer_from}: no tokenizer files found there")

    def finish_summary(self, t0: float) -> Summary:
        self.summary.tensors = sum(len(m.hf) for m in self.maps)
        self.summary.warnings = self.sink.warnings
        self.summary.seconds = time.time() - t0
        self.summary.layout.update(shards=len(self.shard_layout))
        return self.summary
