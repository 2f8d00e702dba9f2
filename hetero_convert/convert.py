"""HF safetensors <-> Megatron torch_dist, streaming, one tensor chunk at a time.

hf_to_megatron:  config.json -> plan -> bound mappings -> check every source tensor against the plan ->
                 write each Megatron chunk (TP/PP layout as a Megatron run would) through DCP -> description
                 and metadata -> atomic rename.
megatron_to_hf:  description (ours, or a training run's args) -> plan -> check every stored key -> load one
                 Megatron tensor at a time, cut it into HF tensors -> streaming safetensors shards + index,
                 config.json with regenerated block_configs, remote code -> atomic rename.

Nothing is ever half-written in place: output goes to a hidden sibling directory that is renamed into place
only when everything succeeded, and is deleted on any failure.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .io.dcp import (
    ByteBudget, DCPReader, bytes_item, extra_state_payload, read_common_state, tensor_item, write_checkpoint,
)
from .io.hf_reader import CheckpointError, HFCheckpoint
from .io.checksums import FileHashes
from .io.safetensors_writer import StreamingSafetensorsWriter, pack_in_order
from .layout import require_layout
from .mappings import TensorMapping, bind, ignored_hf_key
from .plan import ModelPlan, load_config, load_plan

DESCRIPTION_FILE = "hetero_convert.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
ITERATION_DIR = "release"
FORMAT_VERSION = 1
DTYPE_OPTIONS = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Exactly what megatron's own save writes; megatron rejects any other key in this file.
MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}
# Megatron checkpoint keys that are not model weights (optimizer and RNG state of a training run).
NON_MODEL_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine", "chained_")


class ConversionError(ValueError):
    """The input cannot be converted; the message lists what is missing, left over or wrong."""


@dataclass
class Summary:
    direction: str
    source: str
    output: str
    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    layout: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---- shared plumbing ---------------------------------------------------------------------------------------


def begin_staging(out_dir: Path, overwrite: bool) -> Path:
    """Check out_dir may be written and create its hidden temporary sibling, which is returned."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ConversionError(f"{out_dir} exists and is not empty (use --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_staging(tmp: Path, out_dir: Path) -> None:
    """Move the finished temporary directory into place (replacing an old out_dir only now)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)


@contextmanager
def staged_output(out_dir: Path, overwrite: bool):
    """Yield a temporary sibling of out_dir; rename it into place on success, delete it on failure."""
    tmp = begin_staging(out_dir, overwrite)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_staging(tmp, out_dir)


class ErrorSink:
    """Collects errors raised in writer threads (DCP's threads would otherwise drop them silently)."""

    def __init__(self):
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.lock = threading.Lock()

    def error(self, msg: str):
        with self.lock:
            self.errors.append(msg)

    def warn(self, msg: str):
        with self.lock:
            self.warnings.append(msg)

    def raise_if_any(self):
        if self.errors:
            raise ConversionError("\n".join(self.errors[:20]) + (
                f"\n... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""))


def release_freed_memory() -> bool:
    """Make glibc give freed tensor buffers back to the OS (a process-wide malloc setting; the CLI calls it).

    glibc serves allocations below a *dynamic* threshold (raised up to 32 MiB as large blocks are freed)
    from per-thread arenas, and keeps what is freed there. With several writer threads passing 1-32 MiB
    chunks, that retained memory added ~700 MB at 12 GB (measured: peak 2029 -> 1544 MiB for hf-to-megatron
    and 2210 -> 1789 MiB for megatron-to-hf with --workers 4, about the same speed). A fixed 1 MiB mmap
    threshold makes every larger buffer its own mapping, returned when freed. Returns False where it does
    not apply (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 20))
    except (OSError, AttributeError):
        return False


def settle_process_for_streaming(workers: int = 1) -> None:
    """Process-wide settings for a conversion command (the CLI calls this once, after its imports).

    - glibc's mmap threshold pinned: see `release_freed_memory`.
    - `gc.freeze()`: the ~10^6 objects that importing torch and DCP creates never become garbage, yet every
      full collection during the run, and the interpreter's teardown, walked them: 6-9% of a 1 GB run's CPU
      samples were in the collector, and exit took 0.6 s instead of 0.2 s (measured on this machine).
    - intra-op threads: half the cores per writer thread (the other half reads, writes and hashes), so one on
      2 cores. Conversion moves bytes; beyond dtype casts it does no arithmetic worth splitting, and an
      OpenMP team per small copy or min/max spun ~9% of the CPU samples on 2 cores.
    """
    import gc

    release_freed_memory()
    gc.freeze()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // (2 * max(1, workers))))


def check_finite(t: torch.Tensor, what: str, sink: ErrorSink, strict: bool) -> None:
    # min and max propagate NaN, and an Inf is itself the min or max, so a finite (min, max) proves every
    # value finite. aminmax reads the tensor once in its own dtype (~40 ms/GB here) with no temporary, where a
    # float32 sum (converting first) took ~800 ms/GB and an elementwise isfinite ~1700 ms/GB. Only a tensor
    # that fails pays for the exact count.
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.reshape(-1))
    if math.isfinite(float(lo)) and math.isfinite(float(hi)):
        return
    bad = int((~torch.isfinite(t)).sum())
    msg = f"{what}: {bad} NaN/Inf values"
    (sink.error if strict else sink.warn)(msg + (" (refused: --strict)" if strict else ""))


def layer_name(m: TensorMapping) -> str:
    return f"layer {m.layer}" if m.layer is not None else "model"


# ---- HF -> Megatron ------------------------------------------------------------------------------------------


def check_hf_sources(ckpt: HFCheckpoint, maps: list[TensorMapping]) -> None:
    """Every expected tensor present with the planned shape, nothing left over. Runs before any write."""
    problems, expected = [], {}
    for m in maps:
        for key, shape in zip(m.hf, m.hf_shapes):
            expected[key] = (m, shape)
    for key, (m, shape) in expected.items():
        info = ckpt.tensors.get(key)
        if info is None:
            problems.append(f"{layer_name(m)}: missing tensor '{key}' (expected shape {list(shape)})")
        elif info.shape != shape:
            problems.append(f"{layer_name(m)}: tensor '{key}' has shape {list(info.shape)}, "
                            f"the config implies {list(shape)}")
        elif not info.dtype.is_floating_point:
            problems.append(f"{layer_name(m)}: tensor '{key}' has non-float dtype {info.dtype}")
    leftover = sorted(k for k in ckpt.tensors if k not in expected and not ignored_hf_key(k))
    for key in leftover:
        problems.append(f"unexpected tensor '{key}' {list(ckpt.tensors[key].shape)}: the config has no place "
                        f"for it (does config.json match the weights?)")
    if problems:
        raise ConversionError(f"{len(problems)} problem(s) with the HF checkpoint, nothing written:\n  - "
                              + "\n  - ".join(problems[:50]))


def rank_of(m: TensorMapping, tp_rank: int, tp: int) -> int:
    # Megatron's default rank order (tp fastest, then dp=1, then pp).
    return m.stage * tp + tp_rank


def megatron_write_items(maps: list[TensorMapping], tp: int, pp: int, dtype_of: Callable[[TensorMapping], torch.dtype]):
    """One list of DCP write items per Megatron rank, and a lookup from item to (mapping, chunk)."""
    items: list[list] = [[] for _ in range(tp * pp)]
    lookup: dict = {}
    for m in maps:
        for c in m.chunks(tp):
            item = tensor_item(m.megatron, m.shape, c.offsets, c.sizes, dtype_of(m))
            items[rank_of(m, c.tp_rank, tp)].append(item)
            lookup[(m.megatron, tuple(c.offsets))] = (m, c)
        for key in m.extra_state:
            # Megatron names a ShardedObject entry key/shard_{offsets}_{fragments}; one shard whatever the TP.
            items[rank_of(m, 0, tp)].append(bytes_item(f"{key}/shard_0_1", 0))
    return items, lookup


def read_chunk(ckpt: HFCheckpoint, m: TensorMapping, offsets, sizes, dtype) -> torch.Tensor:
    """The Megatron chunk at offsets/sizes, assembled from exactly the HF rows (and columns) it needs.

    Each piece is read straight into its rows of one preallocated chunk (no per-piece tensors to concatenate),
    so a chunk costs its own size, plus one piece when the dtype changes."""
    r0, nrows = offsets[0], sizes[0]
    cols = slice(offsets[1], offsets[1] + sizes[1]) if m.tp_rule == "cols" else None
    out = torch.empty(tuple(sizes), dtype=dtype)
    pos = 0
    for seg, a, b in m.pieces(r0, r0 + nrows):
        target = out[pos:pos + b - a]
        if seg.source is None:
            target.zero_()
        else:
            name = m.hf[seg.source]
            if ckpt.tensors[name].dtype == dtype:
                ckpt.read_into(target, name, a, cols)
            else:
                target.copy_(ckpt.read(name, slice(a, b), cols))
        pos += b - a
    return out


def describe_source(hf_dir: Path, plan: ModelPlan, config: dict, checksums: dict) -> dict:
    return {"source_dir": str(hf_dir), "source_config": config, "source_format": plan.source_format,
            "file_sha256": checksums}


class ToMegatronJob:
    """hf_to_megatron's inputs, checked, and the Megatron chunks to write: shared by the single-process and the
    distributed paths (each process builds the same job and writes its share of `items`)."""

    def __init__(self, hf_dir: Path, out_dir: Path, tp: int, pp: int, dtype: str, strict: bool,
                 progress: Callable[[int], None] | None):
        if dtype not in DTYPE_OPTIONS:
            raise ConversionError(f"--dtype must be one of {list(DTYPE_OPTIONS)}, got {dtype!r}")
        self.hf_dir, self.tp, self.pp, self.strict, self.progress = hf_dir, tp, pp, strict, progress
        self.config = load_config(hf_dir)
        self.plan = load_plan(self.config)
        require_layout(self.plan, tp, pp)
        self.ckpt = HFCheckpoint(hf_dir)
        self.maps = bind(self.plan, tp, pp)
        check_hf_sources(self.ckpt, self.maps)
        self.want = DTYPE_OPTIONS[dtype]
        self.src_dtype = {m.megatron: self.ckpt.tensors[m.hf[0]].dtype for m in self.maps}
        self.items, self.lookup = megatron_write_items(self.maps, tp, pp, self.dtype_of)
        self.sink, self.summary = ErrorSink(), Summary("hf-to-megatron", str(hf_dir), str(out_dir))
        self.counter = threading.Lock()

    def dtype_of(self, m: TensorMapping) -> torch.dtype:
        return self.want or self.src_dtype[m.megatron]

    def resolve(self, item):
        if item.type.name == "BYTE_IO":
            return extra_state_payload()
        m, c = self.lookup[(item.index.fqn, tuple(item.index.offset))]
        try:
            t = read_chunk(self.ckpt, m, c.offsets, c.sizes, self.dtype_of(m))
            check_finite(t, f"{layer_name(m)}: {m.megatron} (from {', '.join(m.hf)})", self.sink, self.strict)
        except Exception as e:  # noqa: BLE001 - reported after the rank's files are written
            self.sink.error(f"{layer_name(m)}: {m.megatron}: {type(e).__name__}: {e}")
            t = torch.zeros(c.sizes, dtype=self.dtype_of(m))
        with self.counter:
            self.summary.bytes_written += t.numel() * t.element_size()
            self.summary.tensors += 1
        if self.progress is not None:
            self.progress(t.numel() * t.element_size())
        return t

    def write_description(self, root: Path, checks: dict) -> None:
        """Everything but the data files: description, common.pt, metadata.json (last) and the tracker."""
        iteration = root / ITERATION_DIR
        description = {
            "format": "hetero_convert.megatron", "format_version": FORMAT_VERSION,
            "plan": self.plan.to_json(),
            "hf_block_configs": self.plan.hf_block_configs(),
            "megatron_block_configs": self.plan.megatron_block_configs(),
            "tensor_parallel": self.tp, "pipeline_parallel": self.pp,
            "padded_vocab_size": self.maps[0].shape[0],
            "dtype": str(self.want or sorted({str(d) for d in self.src_dtype.values()})[0]).replace("torch.", ""),
            "source": describe_source(self.hf_dir, self.plan, self.config, checks),
        }
        (iteration / DESCRIPTION_FILE).write_text(json.dumps(description, indent=1))
        torch.save({"iteration": 0, "checkpoint_version": 3.0}, iteration / "common.pt")
        # metadata.json last: without it megatron does not treat the directory as a checkpoint.
        (iteration / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
        (root / TRACKER_FILE).write_text(ITERATION_DIR)

    def finish_summary(self, t0: float, files: int) -> Summary:
        s = self.summary
        s.bytes_read = sum(self.ckpt.tensors[k].nbytes for m in self.maps for k in m.hf)
        s.warnings = self.sink.warnings
        s.seconds = time.time() - t0
        s.layout = {"tp": self.tp, "pp": self.pp, "files": files}
        return s


def hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    dtype: str = "keep",
    workers: int = 1,
    overwrite: bool = False,
    strict: bool = False,
    checksums: "bool | FileHashes" = True,
    progress: Callable[[int], None] | None = None,
    distributed: bool | None = False,
) -> Summary:
    """`checksums`: record the source files' sha256 (True), or not (False); or a `FileHashes` of them already
    under way (the CLI starts one before importing torch). `distributed`: True = split the work over the
    torch.distributed job this process is part of (see hetero_convert.distributed), None = do so when
    launched by torchrun with WORLD_SIZE > 1."""
    if distributed or (distributed is None and _launched_distributed()):
        from .distributed import hf_to_megatron_distributed

        return hf_to_megatron_distributed(hf_dir, out_dir, tp=tp, pp=pp, dtype=dtype, workers=workers,
                                          overwrite=overwrite, strict=strict, checksums=checksums,
                                          progress=progress)
    t0 = time.time()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    job = ToMegatronJob(hf_dir, out_dir, tp, pp, dtype, strict, progress)
    with staged_output(out_dir, overwrite) as tmp:
        iteration = tmp / ITERATION_DIR
        iteration.mkdir()
        hashes = checksums if isinstance(checksums, FileHashes) else FileHashes(job.ckpt.files() if checksums else [])
        try:
            write_checkpoint(iteration, job.items, job.resolve, threads=workers,
                             after_rank=lambda r: job.sink.raise_if_any())
            job.sink.raise_if_any()
            checks = hashes.results(job.ckpt.files()) if checksums else {}
        finally:
            hashes.close()
        job.write_description(tmp, checks)
    return job.finish_summary(t0, len(list((out_dir / ITERATION_DIR).glob("*.distcp"))))


def _launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# ---- Megatron -> HF ------------------------------------------------------------------------------------------


def iteration_dir(path: str | Path) -> Path:
    """Accept the checkpoint root (with the tracker file) or the iteration folder itself."""
    p = Path(path)
    tracker = p / TRACKER_FILE
    if tracker.is_file():
        it = tracker.read_text().strip()
        candidate = p / (it if it == "release" else f"iter_{int(it):07d}")
        if not candidate.is_dir():
            raise ConversionError(f"{tracker} points to {candidate.name}, which does not exist")
        return candidate
    if (p / ".metadata").is_file() or (p / "metadata.json").is_file():
        return p
    raise ConversionError(f"{p}: neither a Megatron checkpoint root ({TRACKER_FILE}) nor an iteration folder")


def read_plan_from_megatron(it_dir: Path) -> ModelPlan:
    """The model's plan: from our description if present, else rebuilt from a training run's saved args."""
    desc_path = it_dir / DESCRIPTION_FILE
    if desc_path.is_file():
        return ModelPlan.from_json(json.loads(desc_path.read_text())["plan"])
    state = read_common_state(it_dir)  # common.pt or 0.19's common_state, never unpickled with any global
    if state is not None:
        args = state.get("args") if isinstance(state, dict) else None
        encoded = getattr(args, "heterogeneous_layers_config_encoded_json", "") if args is not None else ""
        if encoded:
            # Megatron-LM persists the HF config.json it was trained from in its args.
            cfg = json.loads(encoded)
            cfg.setdefault("vocab_size", getattr(args, "vocab_size", None))
            cfg.setdefault("hidden_size", args.hidden_size)
            cfg.setdefault("num_attention_heads", args.num_attention_heads)
            cfg.setdefault("num_hidden_layers", args.num_layers)
            cfg.setdefault("tie_word_embeddings", not getattr(args, "untie_embeddings_and_output_weights", True))
            return load_plan(cfg)
    raise ConversionError(f"{it_dir}: no {DESCRIPTION_FILE} and no heterogeneous config in common.pt args: "
                          f"cannot tell which model this is")


def check_megatron_keys(reader: DCPReader, maps: list[TensorMapping]) -> None:
    stored = reader.tensor_keys()
    problems = []
    for m in maps:
        md = stored.get(m.megatron)
        if md is None:
            problems.append(f"{layer_name(m)}: missing tensor '{m.megatron}' (expected {list(m.shape)})")
            continue
        shape = tuple(md.size)
        if m.vocab_padded:  # saved at any TP: padded to a multiple of 128*TP, never fewer than the vocabulary
            ok = shape[1:] == m.shape[1:] and shape[0] >= m.vocab_rows
        else:
            ok = shape == m.shape
        if not ok:
            problems.append(f"{layer_name(m)}: '{m.megatron}' has shape {list(shape)}, the plan implies "
                            f"{list(m.shape)}")
    absent = reader.missing_bytes()
    problems += [f"{layer_name(m)}: '{m.megatron}': {absent[m.megatron]}" for m in maps if m.megatron in absent]
    known = {m.megatron for m in maps}
    leftover = sorted(k for k in stored if k not in known and not k.startswith(NON_MODEL_PREFIXES))
    problems += [f"unexpected tensor '{k}' {list(stored[k].size)}: the description has no place for it"
                 for k in leftover]
    if problems:
        raise ConversionError(f"{len(problems)} problem(s) with the Megatron checkpoint, nothing written:\n  - "
                              + "\n  - ".join(problems[:50]))


def split_to_hf(m: TensorMapping, full: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of the row arrangement: each HF tensor is its segments in source order; padding dropped."""
    pieces: list[list[tuple[int, torch.Tensor]]] = [[] for _ in m.hf]
    pos = 0
    for seg in m.segments:
        if seg.source is not None:
            pieces[seg.source].append((seg.start, full[pos:pos + seg.rows]))
        pos += seg.rows
    out = []
    for k, parts in enumerate(pieces):
        parts.sort(key=lambda p: p[0])
        t = parts[0][1] if len(parts) == 1 else torch.cat([p for _, p in parts], 0)
        assert tuple(t.shape) == m.hf_shapes[k], (m.hf[k], t.shape, m.hf_shapes[k])
        out.append(t)
    return out


def parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    s = s.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("GIB", 2**30), ("MIB", 2**20), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def shard_groups(maps: list[TensorMapping], max_bytes: int, itemsize_of) -> list[list[TensorMapping]]:
    """Consecutive mappings packed into shards of at most max_bytes (a bigger single mapping gets its own)."""
    return pack_in_order(maps, lambda m: sum(math.prod(s) for s in m.hf_shapes) * itemsize_of(m), max_bytes)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def write_hf_metadata(out: Path, plan: ModelPlan, dtype: torch.dtype, tokenizer_from: Path | None) -> None:
    from .remote_code import write_remote_code

    # A Llama that went in comes back as a Llama; everything else is written as DeciLM with its remote code.
    cfg = plan.llama_config() if plan.source_format == "llama" else None
    if cfg is None:
        cfg = plan.hf_config()
        cfg["auto_map"] = write_remote_code(out)
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {k: v for k, v in plan.special_tokens.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer_from is not None:
        copied = 0
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).is_file():
                shutil.copy2(Path(tokenizer_from) / name, out / name)
                copied += 1
        if not copied:
            raise ConversionError(f"--tokenizer-from {tokenizer_from}: no tokenizer files found there")


class ToHFJob:
    """megatron_to_hf's inputs, checked, and the safetensors shards to write: shared by the single-process and
    the distributed paths (each process builds the same job and writes its share of the shards)."""

    def __init__(self, megatron_dir, out_dir, max_shard_size, dtype: str, strict: bool,
                 progress: Callable[[int], None] | None):
        if dtype not in DTYPE_OPTIONS:
            raise ConversionError(f"--dtype must be one of {list(DTYPE_OPTIONS)}, got {dtype!r}")
        self.strict, self.progress = strict, progress
        it_dir = iteration_dir(megatron_dir)
        self.plan = read_plan_from_megatron(it_dir)
        self.reader = DCPReader(it_dir)
        self.maps = bind(self.plan)
        check_megatron_keys(self.reader, self.maps)
        self.stored = self.reader.tensor_keys()
        self.want = DTYPE_OPTIONS[dtype]
        self.shards = shard_groups(self.maps, parse_size(max_shard_size), lambda m: self.dtype_of(m).itemsize)
        n = len(self.shards)
        self.names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
                      for k in range(n)]
        self.sink, self.summary = ErrorSink(), Summary("megatron-to-hf", str(megatron_dir), str(out_dir))
        self.lock = threading.Lock()

    def dtype_of(self, m: TensorMapping) -> torch.dtype:
        return self.want or self.stored[m.megatron].properties.dtype

    def output_bytes(self) -> int:
        """Bytes of HF tensor data this job writes (vocab padding stripped, in the output dtype)."""
        return sum(math.prod(s) * self.dtype_of(m).itemsize for m in self.maps for s in m.hf_shapes)

    def stored_bytes(self, m: TensorMapping) -> int:
        md = self.stored[m.megatron]
        return math.prod(md.size) * md.properties.dtype.itemsize

    def write_tensor(self, m: TensorMapping, w: StreamingSafetensorsWriter, budget: ByteBudget | None) -> None:
        """One Megatron tensor, loaded whole (any TP it was saved at), written as its HF tensors."""
        held = budget.acquire(self.stored_bytes(m)) if budget else 0
        try:
            self._write_tensor(m, w)
        finally:
            if budget:
                budget.release(held)

    def _write_tensor(self, m: TensorMapping, w: StreamingSafetensorsWriter) -> None:
        try:
            full = self.reader.load(m.megatron)
        except Exception as e:  # a corrupt chunk: name the tensor, not only the zip reader's complaint
            raise ConversionError(f"{layer_name(m)}: cannot read '{m.megatron}': {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from e
        for key, t in zip(m.hf, split_to_hf(m, full)):
            t = t.to(self.dtype_of(m))
            check_finite(t, f"{layer_name(m)}: {key}", self.sink, self.strict)
            try:
                w.write(key, t)
            except OSError as e:  # disk full, I/O error: say which tensor and shard
                raise ConversionError(f"{layer_name(m)}: writing '{key}' to {w.path.name}: {e}") from e
            with self.lock:
                self.summary.tensors += 1
                self.summary.bytes_written += t.numel() * t.element_size()
            if self.progress is not None:
                self.progress(t.numel() * t.element_size())
        with self.lock:
            self.summary.bytes_read += full.numel() * full.element_size()

    def write_shards(self, tmp: Path, shards: list[int], workers: int) -> None:
        """Write the given shards, `workers` tensors at a time across them (a 1 GB model is one shard, so
        parallelism by shard alone would leave it single-threaded); each tensor lands at its planned offset."""
        writers: dict[int, StreamingSafetensorsWriter] = {}
        # A tensor being loaded costs twice its size (DCP's loaded chunk + the assembled tensor), so the
        # tensors in flight are capped at the largest one's size: peak ~ 2 x largest whatever --workers is.
        budget = ByteBudget(max(self.stored_bytes(m) for m in self.maps)) if workers > 1 else None
        pool = ThreadPoolExecutor(max_workers=max(1, workers))
        try:
            for k in shards:
                layout = [(key, self.dtype_of(m), shape) for m in self.shards[k]
                          for key, shape in zip(m.hf, m.hf_shapes)]
                writers[k] = StreamingSafetensorsWriter(tmp / self.names[k], layout)
            futures = [pool.submit(self.write_tensor, m, writers[k], budget) for k in shards for m in self.shards[k]]
            # The first failure, wherever it is, stops the queue: no need to finish the tensors before it.
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                f.result()
            pool.shutdown()
            for k in shards:
                writers.pop(k).close()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            for w in writers.values():
                w.abort()
            raise

    def write_metadata(self, tmp: Path, tokenizer_from) -> None:
        """Everything but the shards: the index (when sharded), config.json, generation config, remote code."""
        n = len(self.shards)
        if n > 1:
            weight_map = {key: self.names[k] for k in range(n) for m in self.shards[k] for key in m.hf}
            total = self.output_bytes()
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        out_dtype = self.want or self.stored[self.maps[0].megatron].properties.dtype
        write_hf_metadata(tmp, self.plan, out_dtype, Path(tokenizer_from) if tokenizer_from else None)

    def finish_summary(self, t0: float) -> Summary:
        self.summary.warnings = self.sink.warnings
        self.summary.seconds = time.time() - t0
        self.summary.layout = {"shards": len(self.shards)}
        return self.summary


def megatron_to_hf(
    megatron_dir: str | Path,
    out_dir: str | Path,
    max_shard_size: str | int = "5GB",
    dtype: str = "keep",
    tokenizer_from: str | Path | None = None,
    workers: int = 1,
    overwrite: bool = False,
    strict: bool = False,
    progress: Callable[[int], None] | None = None,
    distributed: bool | None = False,
) -> Summary:
    """`distributed`: as for hf_to_megatron (True, or None = when launched by torchrun with WORLD_SIZE > 1)."""
    if distributed or (distributed is None and _launched_distributed()):
        from .distributed import megatron_to_hf_distributed

        return megatron_to_hf_distributed(megatron_dir, out_dir, max_shard_size=max_shard_size, dtype=dtype,
                                          tokenizer_from=tokenizer_from, workers=workers, overwrite=overwrite,
                                          strict=strict, progress=progress)
    t0 = time.time()
    job = ToHFJob(megatron_dir, out_dir, max_shard_size, dtype, strict, progress)
    if hasattr(progress, "set_total"):  # a progress bar learns the total once the checkpoint has been read
        progress.set_total(job.output_bytes())
    with staged_output(Path(out_dir), overwrite) as tmp:
        job.write_shards(tmp, list(range(len(job.shards))), workers)
        job.sink.raise_if_any()
        job.write_metadata(tmp, tokenizer_from)
    return job.finish_summary(t0)


__all__ = ["hf_to_megatron", "megatron_to_hf", "ConversionError", "CheckpointError", "Summary"]
