"""Output that appears complete or not at all, and replaces only what this tool would write there.

Every command writes into a hidden sibling of its output directory, `.OUT.partial-HOST-PID-START`, and renames
it into place only when everything succeeded; on any failure (an exception, or SIGTERM, which torchrun sends
the surviving processes when one dies), or when the `with` block ends without a commit, the sibling is
deleted. One class serves the single-process and the distributed paths (where only the coordinator creates,
commits and cleans up).

What may be replaced (`--overwrite`, `outputs.py`): an existing OUT must already be an output of the kind
being written (a Megatron checkpoint root, a HF checkpoint directory, a prune output: `OutputKind`), holding
nothing this tool would not write there, and must not be a source of the job, contain one or lie inside one
(a new OUT may be made anywhere). A thesis, a `.git`, a home directory or the source's parent are refused with
the reason, and left as they are.

Crashes and power loss: before the rename, every file and folder in the staging folder is fsynced (the
writers have already had most of it written back while converting, `writeback.py`), and the parent folder
after it, so a published OUT never holds data that only the page cache had.

Races: a lock (`.OUT.lock` beside OUT, `flock`) is held from the check in `begin()` to the end of `commit()`,
so a second job on the same OUT is refused while the first runs; publishing is a rename that cannot replace
anything (`renameat2(RENAME_NOREPLACE)`; where the filesystem lacks it, rename(2) itself never replaces a
non-empty directory), so a directory that appeared during the run is never replaced. With `--overwrite` the
previous output is first renamed aside to `.OUT.old-HOST-PID-START-for-INODE` (the inode of the staging
folder that replaces it), checked again there (it is the exact directory that will be deleted), then the new
output renamed in, then the old one deleted.

Killed runs (`kill -9`, a node lost): the hidden folders carry their owner (host, PID and the PID's start time,
so a reused PID is not mistaken for the owner). The next run on the same OUT, holding the lock, deletes the
staging folders whose owner no longer runs and restores a previous output that a kill between the two
renames left only under its hidden name, and says so (logger `hetero_convert`, which prints to stderr).
Folders owned by another host are left alone and named: from here one cannot tell whether their owner runs.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConversionError
from .writeback import fsync_dir, fsync_tree
from .outputs import ANY, HF, MEGATRON, PRUNE, OutputKind, check_output, check_place, entries

__all__ = ["ANY", "HF", "MEGATRON", "PRUNE", "OutputKind", "Staging", "check_output", "check_place",
           "rename_noreplace"]

log = logging.getLogger("hetero_convert")


# ---- owners, locks and a rename that cannot replace -------------------------------------------------------------


def _start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks since boot; Linux), which a reused PID does not share."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname() or "host")[:64]


@dataclass(frozen=True)
class Owner:
    host: str | None  # None: a folder named by an older version (PID only, this host assumed)
    pid: int
    start: int | None

    @classmethod
    def me(cls) -> "Owner":
        return cls(_host(), os.getpid(), _start_ticks(os.getpid()) or 0)

    def tag(self) -> str:
        return f"{self.host}-{self.pid}-{self.start or 0}"

    def local(self) -> bool:
        return self.host is None or self.host == _host()

    def running(self) -> bool:
        """Whether the owner (on this host) still runs."""
        if self.start:
            return _start_ticks(self.pid) == self.start
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host or 'this host'}"


def _hidden(out: Path, what: str) -> re.Pattern:
    """`.OUT.partial-HOST-PID-START`, `.OUT.old-HOST-PID-START-for-INODE` (the inode of the staging folder
    that replaces it), and the older `.OUT.partial-PID`."""
    tail = r"-for-(?P<ino>\d+)" if what == "old" else ""
    return re.compile(rf"\.{re.escape(out.name)}\.{what}-(?:(?P<host>.+)-(?P<pid>\d+)-(?P<start>\d+){tail}|(?P<legacy>\d+))")


def _owner_of(match: re.Match) -> Owner:
    if match["legacy"] is not None:
        return Owner(None, int(match["legacy"]), None)
    return Owner(match["host"], int(match["pid"]), int(match["start"]) or None)


AT_FDCWD, RENAME_NOREPLACE = -100, 1
_libc_renameat2 = None


def _renameat2():
    """glibc's renameat2 (2.28+), or None."""
    global _libc_renameat2
    if _libc_renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _libc_renameat2 = fn
        except (AttributeError, OSError):
            _libc_renameat2 = False
    return _libc_renameat2 or None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename the directory `src` to `dst`, raising FileExistsError if `dst` exists: atomically where the
    kernel and filesystem offer RENAME_NOREPLACE. Elsewhere rename(2) itself never replaces a non-empty
    directory or a file with a directory, so at worst an *empty* directory created between the check and the
    rename is replaced, which loses nothing."""
    fn = _renameat2()
    if fn is not None:
        if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # those: this filesystem lacks the flag
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(src), None, str(dst))
    os.rename(src, dst)


class OutputLock:
    """An exclusive `flock` on `.OUT.lock` beside OUT, naming its holder inside. Released (and the file removed)
    by `release()`, or by the kernel when the holder dies."""

    def __init__(self, out: Path):
        self.out, self.path, self.fd = out, out.parent / f".{out.name}.lock", None

    def acquire(self) -> bool:
        """True when held; False when this filesystem has no locks (a warning is logged). Raises
        ConversionError when another job holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ConversionError(f"{self.out}: another hetero-convert job ({holder}) is writing this output "
                                      f"now; refused (wait for it, or choose another output)") from None
            except OSError as e:
                os.close(fd)
                log.warning(f"hetero-convert: cannot lock {self.path} ({e.strerror}): a second job on this output "
                            f"is not refused up front (the final rename still never replaces one)")
                return False
            # The previous holder removes the file when it releases: ours must still be the file at that path.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{Owner.me()}, staging {self.out.parent}/.{self.out.name}.partial-"
                              f"{Owner.me().tag()}\n".encode(), 0)
                self.fd = fd
                return True
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still holding it: a waiter then retries on a fresh file
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


# ---- staging ----------------------------------------------------------------------------------------------------


class Staging:
    """`begin()` takes the output lock, cleans up after killed runs, checks OUT may be written (`check_output`)
    and creates the hidden sibling; `commit()` publishes it (replacing an old OUT only then, and only after
    checking it again); leaving the `with` block before `commit()` deletes it. The lock is
    released when the `with` block ends.

    `kind`: what is written (MEGATRON, HF, PRUNE; ANY when not given). `sources`: the job's inputs, which OUT
    must not be, contain or lie inside."""

    def __init__(self, out_dir: str | Path, overwrite: bool, active: bool = True, kind: OutputKind = ANY,
                 sources: Iterable[str | Path | None] = ()):
        out = Path(out_dir)
        # `.` or `..` has no name to hide a sibling under: spelled out, it has one
        self.out_dir = Path(os.path.abspath(out)) if out.name in ("", ".", "..") else out
        self.overwrite, self.active = overwrite, active
        self.kind, self.sources = kind, [Path(s) for s in sources if s is not None]
        self.tmp: Path | None = None
        self.committed = False
        self.notes: list[str] = []  # what was cleaned up or restored after earlier runs
        self._lock: OutputLock | None = None
        self._old_handler = None

    def begin(self) -> Path:
        out = self.out_dir
        check_place(out, self.sources)  # before creating anything (a parent, the lock file)
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(out)
        if lock.acquire():
            self._lock = lock
        try:
            self.recover()
            check_output(out, self.kind, self.overwrite, self.sources)  # after recover(), which may restore OUT
            me = Owner.me()
            tmp = out.parent / f".{out.name}.partial-{me.tag()}"
            if tmp.exists():  # only a folder of this very process could have this name
                shutil.rmtree(tmp)
            tmp.mkdir()
        except BaseException:
            self.release()
            raise
        self.tmp = tmp
        return tmp

    def recover(self) -> None:
        """Clean up after runs on this OUT that were killed: delete their staging folders, and restore a
        previous output left under its hidden name by a kill between the two renames of --overwrite (or
        delete it, when the new output made it there). Only folders whose owner no longer runs on this host
        are touched; call with the lock held."""
        out = self.out_dir
        if not out.parent.is_dir():
            return
        me = Owner.me()
        staged, olds = _hidden(out, "partial"), _hidden(out, "old")
        for e in entries(out.parent):
            m = staged.fullmatch(e.name) or olds.fullmatch(e.name)
            if m is None or not e.is_dir(follow_symlinks=False):
                continue
            owner = _owner_of(m)
            if owner == me:
                continue
            if not owner.local():
                self._note(f"left {e.path}: written by {owner}, which cannot be checked from here; delete it "
                           f"if no job runs there")
                continue
            if owner.running():
                continue
            path = Path(e.path)
            if m.re is staged:
                shutil.rmtree(path, ignore_errors=True)
                self._note(f"removed {path}: the staging folder of a run ({owner}) that no longer runs")
            elif not os.path.lexists(out):
                rename_noreplace(path, out)
                self._note(f"restored {out} from {path.name}: the previous output, left under that name by a run "
                           f"({owner}) killed while replacing it")
            elif m["ino"] is not None and os.lstat(out).st_ino == int(m["ino"]):
                shutil.rmtree(path, ignore_errors=True)  # that run's new output made it into place
                self._note(f"removed {path}: the output a run ({owner}) replaced before it was killed")
            else:
                self._note(f"left {path}: a previous output of {out} that a run ({owner}) had renamed aside; {out} "
                           f"now holds something else, so it is kept (move it back, or delete it)")

    def _note(self, msg: str) -> None:
        self.notes.append(msg)
        log.warning(f"hetero-convert: {msg}")

    def commit(self) -> None:
        """Publish the staging folder as OUT. Never replaces what was not checked: an OUT that exists now must
        be empty (removed, then the rename refuses if anything appears meanwhile) or, with --overwrite (or
        a kind that reruns in place), pass `check_output` again, once in place and once renamed aside."""
        out, tmp = self.out_dir, self.tmp
        fsync_tree(tmp)  # on the disk before it has a name a reader would trust
        if os.path.lexists(out):
            if out.is_dir() and not out.is_symlink() and not entries(out):
                os.rmdir(out)
            else:
                self._replace(out, tmp)
                self.committed = True
                return
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise ConversionError(f"{out}: appeared while this job ran; it is not replaced, and this job's "
                                  f"output is discarded") from None
        self.committed = True
        fsync_dir(out.parent)  # the rename itself

    def _replace(self, out: Path, tmp: Path) -> None:
        try:
            check_output(out, self.kind, self.overwrite, self.sources)
        except ConversionError as e:
            raise ConversionError(f"{e} (it changed while this job ran; this job's output is discarded)") from None
        old = out.parent / f".{out.name}.old-{Owner.me().tag()}-for-{os.lstat(tmp).st_ino}"
        rename_noreplace(out, old)
        why = self.kind.problem(old)  # the very directory that will be deleted
        if why is not None:
            try:
                rename_noreplace(old, out)
            except OSError:
                raise ConversionError(f"{out}: changed while this job ran ({why}); it is kept as {old}, and "
                                      f"this job's output is discarded") from None
            raise ConversionError(f"{out}: changed while this job ran ({why}); it is left as it is, and this "
                                  f"job's output is discarded")
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise ConversionError(f"{out}: appeared again while this job replaced it; the previous output is "
                                  f"kept as {old}, and this job's output is discarded") from None
        fsync_dir(out.parent)  # the rename itself
        shutil.rmtree(old, ignore_errors=True)

    def cleanup(self) -> None:
        if self.tmp is not None and not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "Staging":
        if self.active and threading.current_thread() is threading.main_thread():
            def on_term(signum, frame):
                raise SystemExit(128 + signum)  # unwinds through __exit__, which deletes the staging dir

            self._old_handler = signal.signal(signal.SIGTERM, on_term)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.active:
                self.cleanup()  # (a no-op once committed)
        finally:
            self.release()
            if self._old_handler is not None:
                signal.signal(signal.SIGTERM, self._old_handler)
        if self.active and self.tmp is not None and _write_failure(exc):
            # A write deep inside a library (torch.save says only "unexpected pos 704 vs 598" when the disk is
            # full): name the output, and what is left of its filesystem.
            try:
                free = f"{shutil.disk_usage(self.out_dir.parent).free:,} bytes free there"
            except OSError:
                free = "free space unknown"
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().split("\n")[0]
            raise ConversionError(f"{self.out_dir}: writing the output failed ({type(exc).__name__}: {text[:200]}; "
                                  f"{free}): a full disk or quota? Nothing was written") from exc


def _write_failure(exc) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)
    return isinstance(exc, RuntimeError) and "inline_container" in str(exc) and "PytorchStreamReader" not in str(exc)
