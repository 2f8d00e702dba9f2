"""hf-to-megatron and megatron-to-hf split over the processes of a torch.distributed job (torchrun).

Every process builds the same job (config, plan, checks: headers only, cheap) and computes the same
assignment, so no plan has to be sent around; each then reads its own share of the source and writes its own
data files into one staging directory that all processes see (a shared filesystem is assumed when the job
spans nodes). The coordinator (rank 0) creates that directory, and once every process has reported it writes
the metadata and renames the directory into place.

Assignment balances bytes, not counts (Ultra-253B puts FFN layers of 425,984 channels next to dummy layers
with no tensors), largest first into the lightest process:
  - hf-to-megatron: the simulated Megatron ranks' plans go whole to processes, so the files are named as a
    Megatron run would name them (`__{rank}_{k}.distcp`). With fewer Megatron ranks than processes, or when
    whole ranks would leave one process more than 5% above the mean, the single chunks are spread instead,
    and process p writes its part of rank r into `__{r}_p{p}_{k}.distcp`: one file per Megatron rank is then
    impossible, and DCP finds data through `.metadata`, never by file name, so the checkpoint loads the same.
    The source checksums (recorded in the description) are split by file size.
  - megatron-to-hf: whole safetensors shards go to processes; the coordinator writes the index, config.json
    and remote code.

Failure: after each phase every process contributes (error or None, result) to an all_gather, so all of them
learn together whether any failed; then the coordinator deletes the staging directory, all meet at a barrier
(so no one exits, and torchrun kills no one, before the deletion) and each raises the same `JobFailed` naming
the failed rank. A process killed outright (OOM, signal) breaks the collective instead; torchrun then stops
the others, and the coordinator's SIGTERM handler still deletes the staging directory.

Test hook: HETERO_CONVERT_FAIL_RANK=k makes rank k raise after writing its share (files already on disk).
HETERO_CONVERT_TIMEOUT_S sets the collectives' timeout (default 12 h: a share of a huge model takes hours).
"""

from __future__ import annotations

import heapq
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .convert import (
    ITERATION_DIR, ConversionError, Summary, ToHFJob, ToMegatronJob, begin_staging, commit_staging,
    megatron_write_items, shard_groups, parse_size,
)
from .io.checksums import FileHashes
from .io.dcp import extra_state_payload, finish_metadata, write_checkpoint

FAIL_RANK_ENV = "HETERO_CONVERT_FAIL_RANK"
TIMEOUT_ENV = "HETERO_CONVERT_TIMEOUT_S"
EXTRA_STATE_BYTES = len(extra_state_payload().getbuffer())
# Whole Megatron ranks per process (Megatron's own file names) while the busiest process stays within 5% of
# the mean; beyond that, chunk by chunk.
WHOLE_RANK_SLACK = 1.05


class JobFailed(ConversionError):
    """Some process of the job failed; every process raises this same error."""


def process_env() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) outside a torchrun job."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# ---- byte-balanced assignment -----------------------------------------------------------------------------


def balance(costs: list[int], bins: int) -> list[list[int]]:
    """Indices of `costs` packed into `bins` bins, largest first into the lightest bin (ties: lowest index,
    so every process computes the same answer). Each bin's indices come back in ascending order."""
    heap = [(0, b) for b in range(bins)]
    out: list[list[int]] = [[] for _ in range(bins)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, b = heapq.heappop(heap)
        out[b].append(i)
        heapq.heappush(heap, (load + costs[i], b))
    return [sorted(b) for b in out]


@dataclass
class MegatronShare:
    """What one process writes in hf-to-megatron: whole Megatron ranks, or items of ranks."""

    ranks: list[int] = field(default_factory=list)
    subset: dict[int, list[int]] = field(default_factory=dict)
    read_bytes: int = 0
    write_bytes: int = 0

    @property
    def items(self) -> int:
        return sum(len(v) for v in self.subset.values())


def chunk_read_bytes(m, c, itemsize: int) -> int:
    """Source bytes a Megatron chunk needs: its real HF rows (padding reads nothing) times its columns."""
    row_bytes = math.prod(c.sizes[1:]) * itemsize
    return sum((b - a) * row_bytes for seg, a, b in m.pieces(c.offsets[0], c.offsets[0] + c.sizes[0])
               if seg.source is not None)


def item_costs(items_per_rank, lookup, src_itemsize) -> tuple[list[list[int]], list[list[int]]]:
    """Bytes read and written per write item, per Megatron rank."""
    read, write = [], []
    for items in items_per_rank:
        r, w = [], []
        for it in items:
            if it.type.name == "BYTE_IO":
                r.append(0)
                w.append(EXTRA_STATE_BYTES)
                continue
            m, c = lookup[(it.index.fqn, tuple(it.index.offset))]
            r.append(chunk_read_bytes(m, c, src_itemsize(m)))
            w.append(math.prod(c.sizes) * it.tensor_data.properties.dtype.itemsize)
        read.append(r)
        write.append(w)
    return read, write


def assign_megatron(read: list[list[int]], write: list[list[int]], processes: int) -> list[MegatronShare]:
    """Megatron ranks to processes by bytes read + written; chunk by chunk when ranks are fewer, or when whole
    ranks cannot be spread evenly (8 equal ranks over 3 processes: 3/3/2, the busiest 12% above the mean)."""
    if len(read) >= processes:
        costs = [sum(r) + sum(w) for r, w in zip(read, write)]
        bins = balance(costs, processes)
        loads = [sum(costs[r] for r in b) for b in bins]
        if max(loads) <= WHOLE_RANK_SLACK * sum(loads) / processes:
            return [MegatronShare(ranks=b, read_bytes=sum(sum(read[r]) for r in b),
                                  write_bytes=sum(sum(write[r]) for r in b)) for b in bins]
    shares = [MegatronShare() for _ in range(processes)]
    flat = [(r, i) for r in range(len(read)) for i in range(len(read[r]))]
    for p, picked in enumerate(balance([read[r][i] + write[r][i] for r, i in flat], processes)):
        for k in picked:
            r, i = flat[k]
            shares[p].subset.setdefault(r, []).append(i)
            shares[p].read_bytes += read[r][i]
            shares[p].write_bytes += write[r][i]
    return shares


def hf_shard_costs(shards, megatron_bytes, out_itemsize) -> tuple[list[int], list[int]]:
    """Bytes read (the stored Megatron tensors) and written (the HF tensors) per safetensors shard."""
    read = [sum(megatron_bytes(m) for m in shard) for shard in shards]
    write = [sum(math.prod(s) * out_itemsize(m) for m in shard for s in m.hf_shapes) for shard in shards]
    return read, write


# ---- the process group and agreeing on success ------------------------------------------------------------


class Comm:
    """The job's processes: a gloo group (fine on CPU and GPU nodes), created here unless one exists.

    Outside torchrun (world size 1) there is no group and the collectives are trivial, so the distributed
    path also runs, and is testable, in one process."""

    def __init__(self):
        self.owned, self.group = False, None
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if dist.get_backend() != "gloo":  # e.g. NCCL in a training job: objects travel on CPU here
                self.group = dist.new_group(backend="gloo")
            return
        self.rank, self.world = process_env()
        if self.world > 1:
            timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 12 * 3600)))
            dist.init_process_group("gloo", timeout=timeout)
            self.owned = True

    def all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self):
        if self.world > 1:
            dist.barrier(group=self.group)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.group is not None:
            dist.destroy_process_group(self.group)
        if self.owned:
            dist.destroy_process_group()


class Staging:
    """The coordinator's staging directory: created by `begin`, renamed by `commit`, deleted on any failure,
    including SIGTERM (what torchrun sends the survivors when a process dies)."""

    def __init__(self, comm: Comm, out_dir: Path, overwrite: bool):
        self.comm, self.out_dir, self.overwrite = comm, out_dir, overwrite
        self.tmp: Path | None = None
        self.committed = False
        self._old_handler = None

    def begin(self) -> Path:
        self.tmp = begin_staging(self.out_dir, self.overwrite)
        return self.tmp

    def commit(self):
        commit_staging(self.tmp, self.out_dir)
        self.committed = True

    def cleanup(self):
        if self.tmp is not None and not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        if self.comm.rank == 0 and threading.current_thread() is threading.main_thread():
            def on_term(signum, frame):
                raise SystemExit(128 + signum)  # unwinds through __exit__, which deletes the staging dir

            self._old_handler = signal.signal(signal.SIGTERM, on_term)
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None and self.comm.rank == 0:
            self.cleanup()
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)


def agree(comm: Comm, phase: str, fn, cleanup=None) -> list:
    """Run fn on every process, then all learn each other's outcome: the results of every rank, or, if any
    failed, the same JobFailed on every rank (after the coordinator ran `cleanup`)."""
    try:
        value, error = fn(), None
    except Exception as e:  # noqa: BLE001 - handed to every rank below
        value, error = None, f"{type(e).__name__}: {e}"
    gathered = comm.all_gather((error, value))
    failed = [(r, err) for r, (err, _) in enumerate(gathered) if err is not None]
    if failed:
        if comm.rank == 0 and cleanup is not None:
            cleanup()
        comm.barrier()  # nobody leaves (and gets the others killed by torchrun) before the cleanup is done
        r, msg = failed[0]
        also = f"\n(ranks {[f for f, _ in failed[1:]]} failed too)" if len(failed) > 1 else ""
        raise JobFailed(f"rank {r} of {comm.world} failed while {phase}: {msg}{also}")
    return [v for _, v in gathered]


def fail_here_for_test(rank: int) -> None:
    if os.environ.get(FAIL_RANK_ENV) == str(rank):
        raise RuntimeError(f"injected failure on rank {rank} ({FAIL_RANK_ENV}={rank})")


def _merge_counts(summary: Summary, parts: list[dict]) -> None:
    summary.tensors = sum(p["tensors"] for p in parts)
    summary.bytes_written = sum(p["bytes_written"] for p in parts)
    summary.warnings = [w for p in parts for w in p["warnings"]]


# ---- the two directions -----------------------------------------------------------------------------------


def hf_to_megatron_distributed(hf_dir, out_dir, tp=1, pp=1, dtype="keep", workers=1, overwrite=False,
                               strict=False, checksums=True, progress=None) -> Summary:
    """hf_to_megatron over every process of the job; every process returns the same Summary."""
    t0 = time.time()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    with Comm() as comm, Staging(comm, out_dir, overwrite) as stage:
        job, share, files, mine = None, None, [], []

        def setup():
            nonlocal job, share, files, mine
            job = ToMegatronJob(hf_dir, out_dir, tp, pp, dtype, strict, progress)
            # The same inputs on every process give the same assignment: nothing to send around.
            read, write = item_costs(job.items, job.lookup, lambda m: job.src_dtype[m.megatron].itemsize)
            share = assign_megatron(read, write, comm.world)[comm.rank]
            files = job.ckpt.files()
            mine = balance([f.stat().st_size for f in files], comm.world)[comm.rank] if checksums else []
            if comm.rank == 0:
                (stage.begin() / ITERATION_DIR).mkdir()
                return str(stage.tmp)
            return None

        tmp = Path(agree(comm, "checking the inputs", setup, stage.cleanup)[0])

        def work():
            hashes = FileHashes(files[i] for i in mine)
            try:
                _, results = write_checkpoint(tmp / ITERATION_DIR, job.items, job.resolve, threads=workers,
                                              after_rank=lambda r: job.sink.raise_if_any(), ranks=share.ranks,
                                              subset=share.subset, file_tag=f"p{comm.rank}_",
                                              write_metadata=False)
                job.sink.raise_if_any()
                sums = hashes.results(files[i] for i in mine)
            finally:
                hashes.close()
            fail_here_for_test(comm.rank)
            return {"results": results, "sha256": sums, "tensors": job.summary.tensors,
                    "bytes_written": job.summary.bytes_written, "warnings": job.sink.warnings}

        parts = agree(comm, "converting its share", work, stage.cleanup)
        results = [res for p in parts for res in p["results"]]

        def finish():
            if comm.rank == 0:
                finish_metadata(tmp / ITERATION_DIR, job.items, results)
                sums = {name: h for p in parts for name, h in p["sha256"].items()}
                job.write_description(tmp, {f.name: sums[f.name] for f in files if f.name in sums})
                stage.commit()

        agree(comm, "writing the metadata", finish, stage.cleanup)
        _merge_counts(job.summary, parts)
        job.sink.warnings = job.summary.warnings
        s = job.finish_summary(t0, len({wr.storage_data.relative_path for res in results for wr in res}))
        s.layout["processes"] = comm.world
        return s


def megatron_to_hf_distributed(megatron_dir, out_dir, max_shard_size="5GB", dtype="keep", tokenizer_from=None,
                               workers=1, overwrite=False, strict=False, progress=None) -> Summary:
    """megatron_to_hf over every process of the job; every process returns the same Summary."""
    t0 = time.time()
    out_dir = Path(out_dir)
    with Comm() as comm, Staging(comm, out_dir, overwrite) as stage:
        job, mine = None, []

        def setup():
            nonlocal job, mine
            job = ToHFJob(megatron_dir, out_dir, max_shard_size, dtype, strict, progress)
            stored = job.stored
            read, write = hf_shard_costs(job.shards, lambda m: math.prod(stored[m.megatron].size) *
                                         stored[m.megatron].properties.dtype.itemsize,
                                         lambda m: job.dtype_of(m).itemsize)
            mine = balance([r + w for r, w in zip(read, write)], comm.world)[comm.rank]
            return str(stage.begin()) if comm.rank == 0 else None

        tmp = Path(agree(comm, "checking the inputs", setup, stage.cleanup)[0])

        def work():
            job.write_shards(tmp, mine, workers)
            job.sink.raise_if_any()
            fail_here_for_test(comm.rank)
            return {"tensors": job.summary.tensors, "bytes_written": job.summary.bytes_written,
                    "bytes_read": job.summary.bytes_read, "warnings": job.sink.warnings}

        parts = agree(comm, "converting its share", work, stage.cleanup)

        def finish():
            if comm.rank == 0:
                job.write_metadata(tmp, tokenizer_from)
                stage.commit()

        agree(comm, "writing the metadata", finish, stage.cleanup)
        _merge_counts(job.summary, parts)
        job.summary.bytes_read = sum(p["bytes_read"] for p in parts)
        job.sink.warnings = job.summary.warnings
        s = job.finish_summary(t0)
        s.layout["processes"] = comm.world
        return s


# ---- planning without weights (hetero-convert plan-convert) -----------------------------------------------

CONFIG_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def plan_conversion(path, processes: int, tp: int = 1, pp: int = 1, direction: str = "hf-to-megatron",
                    dtype: str = "keep", max_shard_size="5GB") -> dict:
    """Per-process assignment and bytes read/written, from a config alone (full-size models, no weights).

    The source dtype is the config's torch_dtype (bf16 if absent); the Megatron side is taken at TP/PP
    (for megatron-to-hf, TP only changes the stored vocabulary padding)."""
    from .convert import DTYPE_OPTIONS
    from .layout import require_layout
    from .mappings import bind
    from .plan import load_config, load_plan

    if processes < 1:
        raise ConversionError("--ranks must be at least 1")
    if dtype not in DTYPE_OPTIONS:
        raise ConversionError(f"--dtype must be one of {list(DTYPE_OPTIONS)}, got {dtype!r}")
    config = load_config(path)
    plan = load_plan(config)
    require_layout(plan, tp, pp)
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    src = CONFIG_DTYPES.get(name)
    if src is None:
        raise ConversionError(f"config torch_dtype {name!r} is not one of {list(CONFIG_DTYPES)}")
    out = DTYPE_OPTIONS[dtype] or src
    report = {"source": str(path), "direction": direction, "processes": processes, "tp": tp, "pp": pp,
              "source_dtype": str(src).replace("torch.", ""), "output_dtype": str(out).replace("torch.", "")}
    per = []
    if direction == "hf-to-megatron":
        maps = bind(plan, tp, pp)
        items, lookup = megatron_write_items(maps, tp, pp, lambda m: out)
        read, write = item_costs(items, lookup, lambda m: src.itemsize)
        shares = assign_megatron(read, write, processes)
        report["granularity"] = "chunk" if any(s.subset for s in shares) else "megatron-rank"
        report["megatron_ranks"] = len(items)
        for p, s in enumerate(shares):
            row = {"rank": p, "read_bytes": s.read_bytes, "write_bytes": s.write_bytes}
            if s.subset:
                row["chunks_of_megatron_ranks"] = {str(r): len(v) for r, v in sorted(s.subset.items())}
            else:
                row["megatron_ranks"] = s.ranks
            per.append(row)
    elif direction == "megatron-to-hf":
        stored = {m.megatron: m for m in bind(plan, tp, 1)}  # stored shapes: vocab padded for this TP
        maps = bind(plan)
        shards = shard_groups(maps, parse_size(max_shard_size), lambda m: out.itemsize)
        read, write = hf_shard_costs(shards, lambda m: math.prod(stored[m.megatron].shape) * src.itemsize,
                                     lambda m: out.itemsize)
        report["granularity"] = "safetensors-shard"
        report["shards"] = len(shards)
        for p, picked in enumerate(balance([r + w for r, w in zip(read, write)], processes)):
            per.append({"rank": p, "shards": [k + 1 for k in picked], "read_bytes": sum(read[k] for k in picked),
                        "write_bytes": sum(write[k] for k in picked)})
    else:
        raise ConversionError(f"--direction must be hf-to-megatron or megatron-to-hf, got {direction!r}")
    report["per_rank"] = per
    report["total_read_bytes"] = sum(r["read_bytes"] for r in per)
    report["total_write_bytes"] = sum(r["write_bytes"] for r in per)
    loads = [r["read_bytes"] + r["write_bytes"] for r in per]
    report["max_over_mean"] = max(loads) / (sum(loads) / len(loads)) if sum(loads) else 1.0
    return report
