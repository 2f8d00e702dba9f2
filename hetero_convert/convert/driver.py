"""The one conversion driver: both directions run over the processes of a torch.distributed job, and a
single process is a job of one.

Every process builds the same job (config, plan, checks: headers only, cheap) and computes the same assignment
(assign.py); each then reads its own share of the source and writes its own data files into one staging
directory that all processes see (a shared filesystem when the job spans nodes). The coordinator (rank 0)
creates that directory and, once every process has reported, writes the metadata and renames it into place.

Failure: after each phase every process contributes (error or None, result) to an all_gather, so all of them
learn together whether any failed; then the coordinator deletes the staging directory, all meet at a barrier
(so no one exits, and torchrun kills no one, before the deletion) and each raises the same `JobFailed` naming
the failed rank. A process killed outright (OOM, signal) breaks the collective instead; torchrun then stops
the others, and the coordinator's SIGTERM handler still deletes the staging directory.
HETERO_CONVERT_TIMEOUT_S sets the collectives' timeout (default 12 h: a share of a huge model takes hours).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from ..errors import JobFailed
from ..io.checksums import FileHashes
from ..io.dcp import ByteBudget, finish_metadata, write_groups
from ..io.megatron_checkpoint import ITERATION_DIR
from ..io.staging import HF, MEGATRON, Staging
from ..launch import job_store, world as launch_world
from ..packing import balance, share_of_files
from .assign import tensor_costs
from .common import Summary
from .reshard import ReshardJob
from .to_hf import ToHFJob
from .to_megatron import ToMegatronJob

class Comm:
    """The job's processes, and the two collectives the driver needs: all-gather of small objects, barrier.

    Under torchrun (or any env:// launcher) they go through the launcher's key-value store (TCPStore), which
    every process already reaches: no process group, so no gloo threads whose teardown at exit aborted a process
    now and then ("terminate called without an active exception", 1 run in 3 with 4 processes), and no group
    set-up at start. Inside a job whose process group is already initialised (a training or RL script), that
    group is used (a gloo side group when it is NCCL: objects travel on CPU). A job of one process has trivial
    collectives.

    `distributed`: True = this process is one of a torch.distributed job (started by torchrun, or inside an
    initialised one); None = so when torchrun started more than one process; False = a job of one."""

    _jobs = 0  # conversions this process ran: every process counts the same, so their store keys match

    def __init__(self, distributed: bool | None = None):
        self.group, self.store, self.owned_group = None, None, False
        self.rank, self.world = 0, 1
        env = launch_world()
        if distributed is False or (distributed is None and not (env.launched and env.size > 1)):
            return
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if dist.get_backend() != "gloo":  # e.g. NCCL in a training job: objects travel on CPU here
                self.group, self.owned_group = dist.new_group(backend="gloo"), True
            return
        self.rank, self.world = env.rank, env.size
        if self.world > 1:
            self.store = job_store()
            Comm._jobs += 1
            self.prefix = f"hetero_convert/{env.run_id}/{Comm._jobs}"
            self.rounds = 0

    def all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        if self.store is not None:
            self.rounds += 1
            key = f"{self.prefix}/{self.rounds}"
            self.store.set(f"{key}/{self.rank}", pickle.dumps(obj))
            # Our own processes' objects (each process wrote what it computed from the same inputs): plain
            # pickle is fine here, nothing of an input checkpoint is in them unchecked.
            return [pickle.loads(self.store.get(f"{key}/{r}")) for r in range(self.world)]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self):
        if self.world > 1:
            self.all_gather(None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if self.owned_group:
            dist.destroy_process_group(self.group)


def agree(comm: Comm, phase: str, fn, cleanup=None) -> list:
    """Run fn on every process, then all learn each other's outcome: the results of every rank, or, if any
    failed, the same error on every rank (after the coordinator ran `cleanup`). In a job of one process the
    error is the original one, unchanged."""
    try:
        value, error, exc = fn(), None, None
    except Exception as e:  # noqa: BLE001 - handed to every rank below
        value, error, exc = None, f"{type(e).__name__}: {e}", e
    if comm.world == 1:
        if exc is not None:
            if cleanup is not None:
                cleanup()
            raise exc
        return [value]
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


def _merge_counts(summary: Summary, parts: list[dict]) -> None:
    for key in ("chunks", "bytes_written", "bytes_read"):
        setattr(summary, key, sum(p.get(key, 0) for p in parts))
    if len(parts) > 1:  # how evenly the work was shared
        summary.layout["bytes_written_per_process"] = [p.get("bytes_written", 0) for p in parts]
    # the same warning from several processes (a note about the input every process read) is said once
    summary.warnings = list(dict.fromkeys(w for p in parts for w in p["warnings"]))


def _announce(on_read_plan: Callable[[list], None] | None, plan: Callable[[], list]) -> None:
    """Hand the read plan to whoever reads ahead along it. Reading ahead only brings reads forward: if it
    cannot start (no thread to be had, say), the conversion goes on without it rather than failing."""
    if on_read_plan is None:
        return
    try:
        on_read_plan(plan())
    except Exception:  # noqa: BLE001 - see the docstring
        pass


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1, dtype="keep", workers: int = 1,
                   overwrite: bool = False, strict: bool = False, checksums: "bool | FileHashes" = True,
                   progress: Callable[[int], None] | None = None, distributed: bool | None = None,
                   megatron_core: str = "any", on_read_plan: Callable[[list], None] | None = None) -> Summary:
    """HF checkpoint -> Megatron torch_dist checkpoint at (tp, pp), streaming; every process of a job returns
    the same Summary.

    `dtype`: None/"keep" (the source's), a torch dtype, or "bf16"/"fp16"/"fp32". `workers`: chunks converted
    concurrently per process. `checksums`: record the source files' sha256 (True), or not (False); or a
    `FileHashes` of them already under way (the CLI starts one before importing torch). `progress(nbytes)` is
    called for every chunk written. `distributed`: see `Comm`. `megatron_core`: the version that will load it,
    which decides the form of the common state ("any": both forms, loads in every supported version; "0.16",
    "0.17", "0.18": common.pt; "0.19": 0.19's common_state object only; megatron/compat.py).
    `on_read_plan(ranges)`: called once the inputs are checked, with the (file, offset, length) ranges this
    process will read, in the order it starts on them (the CLI reads ahead along them)."""
    t0 = time.time()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    with Comm(distributed) as comm, Staging(out_dir, overwrite, active=comm.rank == 0, kind=MEGATRON,
                                            sources=[hf_dir]) as stage:
        job, files, mine, hashed = None, [], [], []

        def setup():
            nonlocal job, files, mine, hashed
            job = ToMegatronJob(hf_dir, out_dir, tp, pp, dtype, strict, progress, megatron_core)
            # The same inputs on every process give the same assignment: nothing to send around.
            mine = balance(tensor_costs(job), comm.world)[comm.rank]
            files = job.ckpt.files()
            hashed = share_of_files(files, comm.rank, comm.world) if checksums else []
            if comm.rank == 0:
                (stage.begin() / ITERATION_DIR).mkdir()
                return str(stage.tmp)
            return None

        try:
            tmp = Path(agree(comm, "checking the inputs", setup, stage.cleanup)[0])
        finally:
            if isinstance(checksums, FileHashes) and job is None:
                checksums.close()
        _announce(on_read_plan, lambda: job.read_plan([job.grouped.groups[g] for g in mine]))

        def work():
            started = checksums if isinstance(checksums, FileHashes) and comm.world == 1 else None
            hashes = started or FileHashes(hashed)
            groups = job.grouped.groups
            try:
                # A tensor in flight costs the chunks it reads whole (all of them, for column chunks cut from
                # whole rows); a streamed chunk costs only its thread's block buffer.
                largest = max(job.held_bytes(g) for g in groups)
                results = write_groups(tmp / ITERATION_DIR, [groups[g] for g in mine], job.produce,
                                       job.grouped.rank_of, threads=workers,
                                       file_tag=f"p{comm.rank}_" if comm.world > 1 else "",
                                       budget=ByteBudget(largest) if workers > 1 else None, held=job.held_bytes)
                job.sink.raise_if_any()
                sums = hashes.results(hashed)
            finally:
                hashes.close()
            return {"results": results, "sha256": sums, "chunks": job.summary.chunks,
                    "bytes_written": job.summary.bytes_written, "warnings": job.sink.warnings}

        parts = agree(comm, "converting its share", work, stage.cleanup)
        results = [r for p in parts for r in p["results"]]

        def finish():
            if comm.rank == 0:
                finish_metadata(tmp / ITERATION_DIR, job.items, results, out_dir / ITERATION_DIR)
                sums = {name: h for p in parts for name, h in p["sha256"].items()}
                job.write_description(tmp, {f.name: sums[f.name] for f in files if f.name in sums})
                stage.commit()

        agree(comm, "writing the metadata", finish, stage.cleanup)
        _merge_counts(job.summary, parts)
        job.sink.warnings = job.summary.warnings
        s = job.finish_summary(t0, len({r.storage_data.relative_path for r in results}))
        s.layout["processes"] = comm.world
        return s


def megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path, max_shard_size: str | int = "5GB", dtype="keep",
                   tokenizer_from: str | Path | None = None, workers: int = 1, overwrite: bool = False,
                   strict: bool = False, progress: Callable[[int], None] | None = None,
                   distributed: bool | None = None, schema: str | None = None,
                   verify_integrity: bool = True, on_read_plan: Callable[[list], None] | None = None) -> Summary:
    """Megatron torch_dist checkpoint (saved at any TP/PP, ours or a training run's) -> HF checkpoint, streaming;
    every process of a job returns the same Summary. Options as for `hf_to_megatron`; `progress` may also have
    `set_total(nbytes)`, called once the checkpoint has been read. `schema`: the config.json written, "auto"
    (None: the source's own), "decilm", "llama", "puzzletron" or "anymodel". `verify_integrity`: when the
    folder has megatron's integrity.json, the files it lists are hashed while converting (each process a
    share) and the output is committed only if every digest matches; this reads the whole folder, optimizer
    state included. `on_read_plan`: as for `hf_to_megatron`."""
    t0 = time.time()
    out_dir = Path(out_dir)
    with Comm(distributed) as comm, Staging(out_dir, overwrite, active=comm.rank == 0, kind=HF,
                                            sources=[megatron_dir, tokenizer_from]) as stage:
        job, mine, hashed = None, [], []

        def setup():
            nonlocal job, mine, hashed
            job = ToHFJob(megatron_dir, out_dir, max_shard_size, dtype, strict, progress, tokenizer_from, schema,
                          verify_integrity)
            mine = balance(job.tensor_costs(), comm.world)[comm.rank]
            listed = job.integrity_files()
            hashed = share_of_files(listed, comm.rank, comm.world)
            if comm.rank != 0:
                return None
            job.create_files(stage.begin())  # before any process writes into them: the agreement waits for it
            return str(stage.tmp)

        tmp = Path(agree(comm, "checking the inputs", setup, stage.cleanup)[0])
        if hasattr(progress, "set_total"):  # a progress bar learns the total once the checkpoint has been read
            progress.set_total(job.total_bytes())
        _announce(on_read_plan, lambda: job.read_plan(mine))

        def work():
            hashes = FileHashes(hashed)  # on background threads, while this process converts its share
            try:
                job.write_tensors(tmp, mine, workers)
                job.sink.raise_if_any()
                sums = hashes.results(hashed)
            finally:
                hashes.close()
            return {"chunks": job.summary.chunks, "bytes_written": job.summary.bytes_written,
                    "bytes_read": job.summary.bytes_read, "warnings": job.sink.warnings, "sha256": sums}

        parts = agree(comm, "converting its share", work, stage.cleanup)

        def finish():
            if comm.rank == 0:
                job.check_integrity({name: h for p in parts for name, h in p["sha256"].items()})
                job.write_metadata(tmp)
                stage.commit()

        agree(comm, "writing the metadata", finish, stage.cleanup)
        _merge_counts(job.summary, parts)
        job.sink.warnings = job.summary.warnings
        s = job.finish_summary(t0)
        s.layout["processes"] = comm.world
        if job.integrity is not None:
            s.layout["integrity_verified_files"] = len(job.integrity)
        return s


def megatron_to_megatron(megatron_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1, dtype="keep",
                         workers: int = 1, overwrite: bool = False, strict: bool = False,
                         progress: Callable[[int], None] | None = None, distributed: bool | None = None,
                         megatron_core: str = "any") -> Summary:
    """A Megatron torch_dist checkpoint (any TP/PP) re-chunked for another (tp, pp), streaming, exactly as
    hf_to_megatron at that layout would write the same weights; every process of a job returns the same
    Summary. Options as for `hf_to_megatron`. A homogeneous run's stacked layers come out per layer."""
    t0 = time.time()
    out_dir = Path(out_dir)
    with Comm(distributed) as comm, Staging(out_dir, overwrite, active=comm.rank == 0, kind=MEGATRON,
                                            sources=[megatron_dir]) as stage:
        job, mine = None, []

        def setup():
            nonlocal job, mine
            job = ReshardJob(megatron_dir, out_dir, tp, pp, dtype, strict, progress, megatron_core)
            mine = balance(tensor_costs(job), comm.world)[comm.rank]
            if comm.rank == 0:
                (stage.begin() / ITERATION_DIR).mkdir()
                return str(stage.tmp)
            return None

        tmp = Path(agree(comm, "checking the inputs", setup, stage.cleanup)[0])
        if hasattr(progress, "set_total"):
            progress.set_total(job.total_bytes())

        def work():
            # One source tensor in flight costs it twice (DCP's read and the assembled tensor) plus its chunks.
            largest = max(job.reader.tensor_bytes(m.megatron) for m in job.maps)
            results = write_groups(tmp / ITERATION_DIR, [job.grouped.groups[g] for g in mine], job.produce,
                                   job.grouped.rank_of, threads=workers,
                                   file_tag=f"p{comm.rank}_" if comm.world > 1 else "",
                                   budget=ByteBudget(largest) if workers > 1 else None)
            job.sink.raise_if_any()
            return {"results": results, "chunks": job.summary.chunks, "bytes_written": job.summary.bytes_written,
                    "bytes_read": job.summary.bytes_read, "warnings": job.sink.warnings}

        parts = agree(comm, "converting its share", work, stage.cleanup)
        results = [r for p in parts for r in p["results"]]

        def finish():
            if comm.rank == 0:
                finish_metadata(tmp / ITERATION_DIR, job.items, results, out_dir / ITERATION_DIR)
                job.write_description(tmp)
                stage.commit()

        agree(comm, "writing the metadata", finish, stage.cleanup)
        _merge_counts(job.summary, parts)
        job.sink.warnings = job.summary.warnings
        s = job.finish_summary(t0, len({r.storage_data.relative_path for r in results}))
        s.layout["processes"] = comm.world
        return s
