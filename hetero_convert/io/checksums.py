"""sha256 of a checkpoint's source files, for the description a conversion records.

The digest is the one the Hub's LFS storage lists for each file, so a converted checkpoint can be traced to
the exact files it came from. Hashing reads every source byte once more; it runs on its own thread, and the
CLI starts it before importing torch (this module imports neither torch nor anything heavy): the start-up
is then also spent hashing, and reading the source from disk.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path

BLOCK = 8 << 20


def sha256_file(path: str | Path, cancelled: threading.Event | None = None) -> str | None:
    """The file's sha256, read through one reused buffer (no allocation per block; plain reads, so a file
    that shrinks meanwhile is hashed to its new end instead of faulting a mapping). None if `cancelled` was set
    before it finished."""
    h = hashlib.sha256()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            if cancelled is not None and cancelled.is_set():
                return None
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


class FileHashes:
    """sha256 of each given file, computed from construction on by background threads: one file per thread at
    a time, several files at once on a machine with cores to spare (sha256 runs at ~1-2 GB/s per core, so one
    thread alone would bound a 500 GB conversion at several minutes), one thread on a small machine.

    The threads are daemons and check `close()` between blocks, so a conversion that fails early exits at once
    instead of waiting for gigabytes to be hashed."""

    def __init__(self, paths: Iterable[str | Path], threads: int | None = None):
        self._paths = [Path(p) for p in paths]
        self._digests: dict[Path, str] = {}
        self._errors: dict[Path, Exception] = {}
        self._cancelled = threading.Event()
        self._next = iter(self._paths)
        self._lock = threading.Lock()
        if threads is None:
            threads = max(1, min(8, (os.cpu_count() or 1) // 4))
        self._threads = [threading.Thread(target=self._run, name=f"sha256-{k}", daemon=True)
                         for k in range(max(1, min(threads, len(self._paths))))]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while not self._cancelled.is_set():
            with self._lock:
                p = next(self._next, None)
            if p is None:
                return
            try:
                digest = sha256_file(p, self._cancelled)
            except Exception as e:  # noqa: BLE001 - re-raised by results(), in the caller's thread
                self._errors[p] = e
                continue
            if digest is None:
                return
            self._digests[p] = digest

    def results(self, paths: Iterable[str | Path]) -> dict[str, str]:
        """{file name: sha256} for `paths`, waiting for the threads; files they were not given are hashed here."""
        for t in self._threads:
            t.join()
        out = {}
        for p in map(Path, paths):
            if p in self._errors:
                raise self._errors[p]
            out[p.name] = self._digests[p] if p in self._digests else sha256_file(p)
        return out

    def close(self) -> None:
        self._cancelled.set()
