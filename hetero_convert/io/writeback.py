"""Getting the output onto the disk while the conversion is still running, and making it durable before it is
published.

Written data first lands in the page cache. Left alone, a node with a few hundred GB of memory holds tens of
GB of it dirty and writes it back only when the command ends (or later, at the next `sync`): the disk reads
during the conversion and writes afterwards, one phase after the other. `WRITEBACK.submit` hands finished byte
ranges of an output file to one background thread, which asks the kernel to start writing them
(`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait for the disk), so the writes overlap the reads.
`fsync_tree` then waits for what is left: the staging folder is only renamed into place once every file and
folder in it is on the disk, so a crash or power loss never leaves a published output with missing data.

Linux only; elsewhere `submit` does nothing and `fsync_tree` is plain fsync. This module imports nothing heavy.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PAGE = 4096
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


class Writeback:
    """One daemon thread that starts the write-back of submitted ranges, in order. A request names its file by
    path (the thread opens it for the call), so a writer may close its file at once and a backlog of requests
    holds no file descriptors. Failures are ignored: this only brings writes forward, and `fsync_tree` reports
    what did not reach the disk."""

    def __init__(self):
        self._fn = _sync_file_range()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, path: str | Path, offset: int, length: int) -> None:
        """Start writing back the whole pages within [offset, offset + length) of the file at `path` (the
        partial pages at either end may still change: a neighbouring write shares them)."""
        start, end = -(-offset // PAGE) * PAGE, (offset + length) // PAGE * PAGE
        if self._fn is None or end <= start:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="writeback", daemon=True)
                self._thread.start()
        self._queue.put((str(path), start, end - start))

    def handed_over(self, timeout: float | None = None) -> bool:
        """Wait until every range submitted so far has been handed to the kernel (not written: `fsync_tree`
        waits for that). False on timeout."""
        with self._lock:
            if self._thread is None:
                return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            request = self._queue.get()
            if isinstance(request, threading.Event):
                request.set()
                continue
            path, start, length = request
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                continue  # renamed or removed since: a failed job cleaned up, or a peer process committed
            try:
                self._fn(fd, start, length, _SYNC_FILE_RANGE_WRITE)
            finally:
                os.close(fd)


WRITEBACK = Writeback()


class SequentialWriteback:
    """For a file written front to back (a DCP data file): submits what was written since the last submission
    each time that reaches `every` bytes, and the rest at `close()`."""

    def __init__(self, path: str | Path, every: int = 32 << 20):
        self.path, self.every, self.done = path, every, 0

    def wrote_up_to(self, end: int) -> None:
        if end - self.done >= self.every:
            WRITEBACK.submit(self.path, self.done, end - self.done)
            self.done = end // PAGE * PAGE

    def close(self, end: int) -> None:
        if end > self.done:
            WRITEBACK.submit(self.path, self.done, end - self.done)
            self.done = end


def fsync_dir(path: str | Path) -> None:
    """fsync a folder: the names in it (a rename into it, say) are on the disk when this returns."""
    _fsync_path(str(path), True)


def _fsync_path(path: str, directory: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        # A filesystem that cannot sync this (some FUSE and network ones refuse folders): nothing more can be
        # done from here. A failed write (EIO, ENOSPC) is raised: the output is not on the disk.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | Path, threads: int = 8) -> None:
    """fsync every file under `root`, then every folder (children before parents, `root` last): the files'
    data and the names that reach them are on the disk when this returns. Files are synced by a few threads,
    as each may wait for its own remaining write-back."""
    files, dirs = [], []
    for here, subdirs, names in os.walk(root):
        dirs.append(here)
        files.extend(os.path.join(here, n) for n in names if not os.path.islink(os.path.join(here, n)))
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        list(pool.map(lambda p: _fsync_path(p, False), files))
    for d in reversed(dirs):
        _fsync_path(d, True)
