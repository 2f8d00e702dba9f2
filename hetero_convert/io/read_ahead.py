"""Reading a checkpoint's files into the page cache while the process is still starting.

A conversion process spends its first seconds importing torch, with the disk idle. The CLI starts a
`ReadAhead` on the files the process will read before that import and stops it when the conversion ends (on
a machine with few cores, when the import ends: `cli/process.py` says why): the bytes it reads are page-cache
hits for the conversion, whose own reads (a tensor's chunks from several files,
column pieces scattered into place) reach the disk as smaller, out-of-order requests. Stopping it after the import
instead left megatron-to-hf reading its source at half the disk's speed (docs/benchmarks.md). Each thread reads one file at a time from its start
(the order a conversion reads a data file in, roughly: tensors are stored in model order), every file of
the process's share at once when there are threads enough. The total is capped at a quarter of the memory
available, so reading ahead never pushes out what the conversion is using. This module imports nothing
heavy: it runs before torch is imported.
"""

from __future__ import annotations

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


class ReadAhead:
    """Read `paths` on background threads (daemons) until `stop()`, the end of the files, or `limit` bytes
    (default: a quarter of the available memory) in all. Read errors are ignored: the conversion reads the
    same bytes again and reports them."""

    def __init__(self, paths: Iterable[str | Path], limit: int | None = None, threads: int | None = None):
        self._paths = iter([Path(p) for p in paths])
        self._left = available_memory() // 4 if limit is None else limit
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self.bytes_read = 0
        n = threads if threads is not None else min(8, os.cpu_count() or 1)
        self._threads = [threading.Thread(target=self._run, name=f"read-ahead-{k}", daemon=True)
                         for k in range(max(1, n))]
        for t in self._threads:
            t.start()

    def _take(self, n: int) -> int:
        with self._lock:
            n = min(n, self._left)
            self._left -= n
            return n

    def _run(self) -> None:
        buf = bytearray(BLOCK)
        while not self._stopped.is_set():
            with self._lock:
                path = next(self._paths, None)
            if path is None:
                return
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                at, size = 0, os.fstat(fd).st_size
                while at < size and not self._stopped.is_set():
                    want = self._take(min(BLOCK, size - at))
                    if want == 0:
                        return
                    got = _read_block(fd, memoryview(buf)[:want], at)
                    with self._lock:
                        self.bytes_read += got
                        self._left += want - got  # a file that shrank: the rest of the allowance is not spent
                    if got < want:
                        break
                    at += got
            except OSError:
                pass
            finally:
                os.close(fd)

    def stop(self) -> int:
        """Stop reading (between blocks; the threads are not waited for). Returns the bytes read so far."""
        self._stopped.set()
        return self.bytes_read
