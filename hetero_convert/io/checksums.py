"""sha256 of a checkpoint's source files, for the description a conversion records.

The digest is the one the Hub's LFS storage lists for each file, so a converted checkpoint can be traced to
the exact files it came from. Hashing reads every source byte once more; it runs on its own thread, and the
CLI starts it before importing torch (this module imports neither torch nor anything heavy): the ~1.7 s of
start-up on one core is then spent hashing, and reading the source from disk, on the other.
"""

from __future__ import annotations

import hashlib
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
    """sha256 of each given file, computed in order on one background thread from construction on.

    The thread is a daemon and checks `close()` between blocks, so a conversion that fails early exits at
    once instead of waiting for gigabytes to be hashed."""

    def __init__(self, paths: Iterable[str | Path]):
        self._paths = [Path(p) for p in paths]
        self._digests: dict[Path, str] = {}
        self._errors: dict[Path, Exception] = {}
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for p in self._paths:
            try:
                digest = sha256_file(p, self._cancelled)
            except Exception as e:  # noqa: BLE001 - re-raised by results(), in the caller's thread
                self._errors[p] = e
                continue
            if digest is None:
                return
            self._digests[p] = digest

    def results(self, paths: Iterable[str | Path]) -> dict[str, str]:
        """{file name: sha256} for `paths`, waiting for the thread; files it was not given are hashed here."""
        self._thread.join()
        out = {}
        for p in map(Path, paths):
            if p in self._errors:
                raise self._errors[p]
            out[p.name] = self._digests[p] if p in self._digests else sha256_file(p)
        return out

    def close(self) -> None:
        self._cancelled.set()
