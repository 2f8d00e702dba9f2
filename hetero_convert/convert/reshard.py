"""Megatron torch_dist -> Megatron torch_dist at another TP/PP (and dtype), without going through HF files.

Training runs reshard before a long run so that each rank reads its own bytes. The source is read one Megatron
tensor at a time (at whatever TP it was saved), cut into its HF tensors in memory and re-chunked for the
target layout through the same mapping objects as the file converters, so the result is exactly what
hf-to-megatron at the target layout writes. Writing is tensor-major: all chunks of a tensor come from one read,
each appended to its rank's file (`__{rank}_{k}.distcp`, k per writer thread).
"""

from __future__ import annotations

import copy
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import dtypes
from ..errors import ConversionError
from ..io.dcp import DCPReader, extra_state_payload
from ..io.description import padding_problem
from ..io.megatron_checkpoint import DESCRIPTION_FILE, HF_FILES_DIR, ITERATION_DIR, iteration_dir, read_description, \
    read_plan, write_description, write_megatron_files
from ..layout import require_layout
from ..mappings import DictSource, TensorMapping, bind
from ..megatron.compat import common_forms
from .common import ErrorSink, Summary, check_finite
from .to_hf import check_megatron_keys
from .to_megatron import TensorGroups, add_common_state_item, common_state_group, megatron_write_items


class ReshardJob:
    """megatron_to_megatron's inputs, checked, and the target chunks grouped by source tensor."""

    direction = "megatron-to-megatron"

    def __init__(self, megatron_dir, out_dir, tp: int, pp: int, dtype, strict: bool,
                 progress: Callable[[int], None] | None, megatron_core: str = "any"):
        self.tp, self.pp, self.strict, self.progress = tp, pp, strict, progress
        self.want = dtypes.parse(dtype, keep=True)
        common_forms(megatron_core)  # an unknown target is refused before any read
        self.it_dir = iteration_dir(megatron_dir)
        self.reader = DCPReader(self.it_dir)
        self.notes: list[str] = []
        self.plan = read_plan(self.it_dir, self.reader, self.notes)
        require_layout(self.plan, tp, pp)
        self.reader.view_stacked_layers(self.plan.num_layers)
        self.source_description = read_description(self.it_dir)
        check_megatron_keys(self.reader, bind(self.plan), self.source_description, self.plan)
        self.stored = self.reader.tensor_keys()
        self.maps = bind(self.plan, tp, pp)
        self.items, self.lookup = megatron_write_items(self.maps, tp, pp, self.dtype_of)
        self.common_forms = add_common_state_item(self.items, megatron_core)
        self.grouped = TensorGroups(self.maps, self.items)
        self.by_name = {m.megatron: m for m in self.maps}
        self.sink, self.summary = ErrorSink(), Summary(self.direction, str(megatron_dir), str(out_dir))
        for note in self.notes:
            self.sink.warn(note)
        self.lock = threading.Lock()

    def dtype_of(self, m: TensorMapping) -> torch.dtype:
        return self.want or self.stored[m.megatron].properties.dtype

    def read_bytes(self, m: TensorMapping) -> int:
        return self.reader.tensor_bytes(m.megatron)

    def total_bytes(self) -> int:
        return sum(m.numel * self.dtype_of(m).itemsize for m in self.maps)

    def produce(self, group: list):
        """Every item of one tensor's group, from one read of the source tensor."""
        alone = common_state_group(group)
        if alone is not None:
            yield alone
            return
        name = next(it.index.fqn for it in group if it.type.name != "BYTE_IO")
        m = self.by_name[name]
        full = self.reader.load(m.megatron)
        problem = padding_problem(m, full[m.vocab_rows:]) if m.vocab_padded and self.source_description else None
        if problem:
            raise ConversionError(f"{self.it_dir / DESCRIPTION_FILE}: {problem}")
        # Back to the HF tensors (global shapes do not depend on TP, except the vocabulary padding, which is
        # dropped here and redone for the target), then chunked for the target layout.
        hf = [full[: m.vocab_rows]] if m.vocab_padded else m.to_hf(full)
        source = DictSource(dict(zip(m.hf, hf)))
        for item in group:
            if item.type.name == "BYTE_IO":
                yield item, extra_state_payload()
                continue
            _, c = self.lookup[(item.index.fqn, tuple(item.index.offset))]
            t = m.read_chunk(source, c, self.dtype_of(m))
            check_finite(t, f"{m.where}: {m.megatron}", self.sink, self.strict)
            with self.lock:
                self.summary.chunks += 1
                self.summary.bytes_written += t.numel() * t.element_size()
            if self.progress is not None:
                self.progress(t.numel() * t.element_size())
            yield item, t
        with self.lock:
            self.summary.bytes_read += full.numel() * full.element_size()

    def description(self) -> dict:
        desc = copy.deepcopy(self.source_description) if self.source_description else {
            "format": "hetero_convert.megatron", "format_version": 1, "plan": self.plan.to_json(),
            "hf_block_configs": self.plan.hf_block_configs(),
            "megatron_block_configs": self.plan.megatron_block_configs()}
        desc.update({"tensor_parallel": self.tp, "pipeline_parallel": self.pp,
                     "padded_vocab_size": self.maps[0].shape[0],
                     "dtype": dtypes.config_name(self.dtype_of(self.maps[0])),
                     "resharded_from": {"path": str(self.it_dir),
                                        "tensor_parallel": (self.source_description or {}).get("tensor_parallel"),
                                        "pipeline_parallel": (self.source_description or {}).get("pipeline_parallel")}})
        return desc

    def write_description(self, root: Path) -> None:
        it_dir = Path(root) / ITERATION_DIR
        if (self.it_dir / HF_FILES_DIR).is_dir():  # the source's tokenizer and generation config travel along
            shutil.copytree(self.it_dir / HF_FILES_DIR, it_dir / HF_FILES_DIR)
        write_description(it_dir, self.description())
        write_megatron_files(Path(root), forms=self.common_forms)

    def finish_summary(self, t0: float, files: int) -> Summary:
        s = self.summary
        s.tensors = len(self.maps)
        s.warnings = self.sink.warnings
        s.seconds = time.time() - t0
        s.layout.update(tp=self.tp, pp=self.pp, files=files)
        return s
