"""Process-wide settings for a conversion command: set once by the CLI, after its imports, never by the
library (they change how the whole process allocates and collects)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os


def release_freed_memory() -> bool:
    """Make glibc give freed tensor buffers back to the OS.

    glibc serves allocations below a *dynamic* threshold (raised up to 32 MiB as large blocks are freed)
    from per-thread arenas, and keeps what is freed there. With several writer threads passing 1-32 MiB
    chunks, that retained memory added ~700 MB at 12 GB (peak 2029 -> 1544 MiB for hf-to-megatron and
    2210 -> 1789 MiB for megatron-to-hf with --workers 4, about the same speed). A fixed 1 MiB mmap threshold
    makes every larger buffer its own mapping, returned when freed. Returns False where it does not apply
    (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 20))
    except (OSError, AttributeError):
        return False


def settle_process_for_streaming(workers: int = 1) -> None:
    """- glibc's mmap threshold pinned: see `release_freed_memory`.
    - `gc.freeze()`: the ~10^6 objects that importing torch and DCP creates never become garbage, yet every
      full collection during the run, and the interpreter's teardown, walked them (6-9% of a 1 GB run's CPU
      samples were in the collector, and exit took 0.6 s instead of 0.2 s).
    - intra-op threads: half the node's cores per writer thread of all its processes (the other half reads,
      writes and hashes), so one on 2 cores, and one for each of torchrun's 8 processes on 16 cores. Conversion
      moves bytes; beyond dtype casts it does no arithmetic worth splitting, and an OpenMP team per small copy
      or min/max spun ~9% of the CPU samples on 2 cores. Counting each process as if it had the node to itself
      gave 8 processes on 16 cores 8 threads each: 64 spinning teams, which took 145 s of CPU (against 16 s for
      one process doing the same work) and, with a min/max per 4 MiB block, slowed the conversion by a third.
    """
    import torch

    release_freed_memory()
    gc.freeze()
    torch.set_num_threads(intra_op_threads(workers))


def intra_op_threads(workers: int) -> int:
    """torch's intra-op threads for a process with `workers` writer threads: see above."""
    return max(1, (os.cpu_count() or 1) // (2 * max(1, workers) * local_processes()))


def local_processes() -> int:
    """The processes of this job on this node (torchrun's LOCAL_WORLD_SIZE; 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    except ValueError:
        return 1


# Reading ahead for the whole conversion pays where cores are plentiful and the disk sets the pace (32 cores:
# megatron-to-hf read its source twice as fast), and costs where the conversion is CPU-bound (2 cores: the extra
# copy of every byte through the read-ahead's buffer made megatron-to-hf of 4 GB 1.3-2x slower). Below this,
# it reads only while torch is imported.
READ_AHEAD_THROUGH_CORES = 8


class ReadAheadShare:
    """This process's share of `files` read into the page cache, from its construction (before torch is
    imported) to `imported()` on a small machine, or to `done()` (the conversion's end) on a large one.

    `interleaved`: the files are read abreast (DCP data files), else one after another (HF shards); see
    `read_ahead._Blocks`. `hashed`: the process is also hashing these files from the start, which reads them
    too. On a small machine that is read-ahead enough. On a large one the hashing threads (a few, each reading
    a block, then hashing it) read at 0.5-1.3 GB/s while torch is imported, where 8 readers take 1.8 GB/s from
    the same NVMe disk (docs/benchmarks.md, run 11): there both run."""

    def __init__(self, files, rank: int, size: int, hashed: bool = False, interleaved: bool = False):
        from ..io.read_ahead import ReadAhead, available_memory
        from ..packing import share_of_files

        self.through = (os.cpu_count() or 1) >= READ_AHEAD_THROUGH_CORES
        # The read-ahead's allowance (a quarter of the available memory) is the node's: under torchrun each of
        # the node's processes gets its part of it.
        self.reader = ReadAhead(share_of_files(files, rank, size) if self.through or not hashed else [],
                                limit=available_memory() // 4 // local_processes(), interleaved=interleaved)

    def imported(self) -> None:
        if not self.through:
            self.reader.stop()

    def follow(self, plan) -> None:
        """The conversion knows what it will read, in order (`plan`: (path, offset, length) ranges): from now on
        read ahead exactly that, where reading on pays. Reading the files themselves, in whatever order, left
        megatron-to-hf from TP=8 waiting on its first tensor (the embedding, whose chunks start eight of the
        sixty-four files) while the rest was read, and writing almost nothing until everything had been
        (docs/benchmarks.md, run 13)."""
        from ..io.read_ahead import ReadAhead

        if plan and self.through and not self.reader.stopped:
            self.reader.stop()
            # what is left of the allowance; a range listed twice (a stacked chunk holding several layers is
            # read for each) is read ahead once
            self.reader = ReadAhead(ranges=list(dict.fromkeys(plan)), limit=self.reader.allowance)

    def done(self) -> None:
        self.reader.stop()
