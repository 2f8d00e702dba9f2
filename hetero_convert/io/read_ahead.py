"""Reading a checkpoint's files into the page cache while the process is still starting.

A conversion process spends its first seconds importing torch, with the disk idle. The CLI starts a
`ReadAhead` on the files the process will read before that import and stops it when the conversion ends (on
a machine with few cores, when the import ends: `cli/process.py` says why): the bytes it reads are page-cache
hits for the conversion, whose own reads (a tensor's chunks from several files, column pieces scattered into
place) reach the disk as smaller, out-of-order requests. Stopping it after the import instead left
megatron-to-hf reading its source at half the disk's speed (docs/benchmarks.md). Several threads read blocks
of the files in the order the conversion will want them (`_Blocks`). The total is capped at a quarter of the
memory available, so reading ahead never pushes out what the conversion is using. This module imports
nothing heavy: it runs before torch is imported.
"""

from __future__ import annotations

import heapq
import os
import threading
from collections.abc import Iterable
from pathlib import Path

BLOCK = 8 << 20


def available_memory() -> int:
    """Bytes of memory available for the page cache (MemAvailable), or 0 when it cannot be told."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _read_block(fd: int, buf: memoryview, at: int) -> int:
    return os.preadv(fd, [buf], at)


class _Blocks:
    """Byte ranges of files, as blocks in the order a conversion wants them. `interleaved=False`: range after
    range (a conversion's read plan; HF shards, whose tensors a conversion reads shard after shard).
    `interleaved=True`: all ranges abreast, the next block always from the range least far through (DCP data
    files, before the plan is known: each holds its chunks in model order). Missing files are skipped."""

    def __init__(self, ranges: list[tuple[Path, int, int]], interleaved: bool):
        self.ranges = [(p, a, n) for p, a, n in ranges if n > 0]
        self.interleaved = interleaved
        self.heap = [(0.0 if interleaved else k, k, 0) for k in range(len(self.ranges))]  # (key, range, done)
        heapq.heapify(self.heap)

    @classmethod
    def of_files(cls, paths: list[Path], interleaved: bool) -> _Blocks:
        ranges = []
        for p in paths:
            try:
                ranges.append((p, 0, os.stat(p).st_size))
            except OSError:
                continue
        return cls(ranges, interleaved)

    def next(self) -> tuple[Path, int, int, int] | None:
        """(path, offset, length, range index) of the next block, or None at the end."""
        if not self.heap:
            return None
        _, k, done = heapq.heappop(self.heap)
        path, start, size = self.ranges[k]
        n = min(BLOCK, size - done)
        if done + n < size:  # the key: how far through its range (abreast), or the range's place (in turn)
            heapq.heappush(self.heap, ((done + n) / size if self.interleaved else k, k, done + n))
        return path, start + done, n, k

    def drop(self, k: int) -> None:
        """No more blocks of range k (its file ended early: it shrank since it was listed)."""
        self.heap = [e for e in self.heap if e[1] != k]
        heapq.heapify(self.heap)


class ReadAhead:
    """Read `paths` (or the byte `ranges` (path, offset, length), in their order: a conversion's read plan) on
    background threads (daemons) until `stop()`, the end, or `limit` bytes (default: a quarter of the available
    memory) in all, block by block in the order `_Blocks` gives. Read errors are ignored: the conversion reads
    the same bytes again and reports them."""

    def __init__(self, paths: Iterable[str | Path] = (), limit: int | None = None, threads: int | None = None,
                 interleaved: bool = False, ranges: list[tuple[Path, int, int]] | None = None):
        self._blocks = _Blocks(ranges, False) if ranges is not None else \
            _Blocks.of_files([Path(p) for p in paths], interleaved)
        self._left = available_memory() // 4 if limit is None else limit
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self.bytes_read = 0
        n = threads if threads is not None else min(8, os.cpu_count() or 1)
        self._threads = [threading.Thread(target=self._run, name=f"read-ahead-{k}", daemon=True)
                         for k in range(max(1, n))]
        for t in self._threads:
            t.start()

    def _next(self) -> tuple[Path, int, int, int] | None:
        with self._lock:
            block = self._blocks.next() if self._left > 0 else None
            if block is None:
                return None
            path, at, n, k = block
            n = min(n, self._left)
            self._left -= n
            return path, at, n, k

    def _run(self) -> None:
        buf = memoryview(bytearray(BLOCK))
        while not self._stopped.is_set():
            block = self._next()
            if block is None:
                return
            path, at, want, k = block
            got = 0
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    got = _read_block(fd, buf[:want], at)
                finally:
                    os.close(fd)
            except OSError:
                pass
            with self._lock:
                self.bytes_read += got
                if got < want:  # vanished or shrank: the rest of the allowance is not spent, the rest not read
                    self._left += want - got
                    self._blocks.drop(k)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    @property
    def allowance(self) -> int:
        """Bytes it may still read."""
        with self._lock:
            return self._left

    def stop(self) -> int:
        """Stop reading (between blocks; the threads are not waited for). Returns the bytes read so far."""
        self._stopped.set()
        return self.bytes_read
