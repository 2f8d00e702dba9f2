"""Output that appears complete or not at all, and replaces only what this tool would write there.

Every command writes into a hidden sibling of its output directory, `.OUT.partial-HOST-PID-START`, and renames
it into place only when everything succeeded; on any failure (an exception, or SIGTERM, which torchrun sends
the surviving processes when one dies), or when the `with` block ends without a commit, the sibling is
deleted. One class serves the single-process and the distributed paths (where only the coordinator creates,
commits and cleans up).

What may be replaced (`--overwrite`): an existing OUT must already be an output of the kind being written (a
Megatron checkpoint root, a HF checkpoint directory, a prune output: `OutputKind`), holding nothing this tool
would not write there, and must not be a source of the job, contain one or lie inside one (a new OUT may be
made anywhere). A thesis, a `.git`,
a home directory or the source's parent are refused with the reason, and left as they are.

Races: a lock (`.OUT.lock` beside OUT, `flock`) is held from the check in `begin()` to the end of `commit()`,
so a second job on the same OUT is refused while the first runs; publishing is a rename that cannot replace
anything (`renameat2(RENAME_NOREPLACE)`; where the filesystem lacks it, rename(2) itself never replaces a
non-empty directory), so a directory that appeared during the run is never replaced. With `--overwrite` the
previous output is first renamed aside to `.OUT.old-HOST-PID-START-for-INODE` (the inode of the staging
folder that replaces it), checked again there (it is the exact
directory that will be deleted), then the new output renamed in, then the old one deleted.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from ..errors import ConversionError

log = logging.getLogger("hetero_convert")


# ---- what an existing OUT may be ------------------------------------------------------------------------------


def _entries(path: Path) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _shown(name: str) -> str:
    return repr(name[:80])


def _megatron_root_problem(path: Path) -> str | None:
    """None when `path` is a Megatron checkpoint root holding only what one holds (the tracker file and
    iteration folders), else why not."""
    from .megatron_checkpoint import TRACKER_FILE

    if not (path / TRACKER_FILE).is_file():
        return f"it has no {TRACKER_FILE}, so it is not a Megatron checkpoint root"
    for e in _entries(path):
        if e.name == TRACKER_FILE and e.is_file(follow_symlinks=False):
            continue
        if e.is_dir(follow_symlinks=False) and (e.name == "release" or re.fullmatch(r"iter_\d{7,}", e.name)):
            if not any(os.path.isfile(os.path.join(e.path, f)) for f in (".metadata", "metadata.json", "common.pt")):
                return f"its folder {_shown(e.name)} is not a checkpoint iteration folder"
            continue
        return f"it holds {_shown(e.name)}, which is no part of a Megatron checkpoint"
    return None


def _hf_names() -> tuple[str, ...]:
    from ..remote_code import remote_code_files
    from .hf_index import INDEX_FILE

    return ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors", INDEX_FILE,
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
            "merges.txt", "added_tokens.json", "chat_template.jinja",
            *(os.path.basename(p) for p in remote_code_files()))


PRUNE_FILES = ("prune_scores.json", "pruning_report.json")


def _files_problem(path: Path, allowed: Iterable[str], what: str) -> str | None:
    allowed = tuple(allowed)
    for e in _entries(path):
        if e.is_dir(follow_symlinks=False):
            return f"it holds the folder {_shown(e.name)}, which a {what} never holds"
        if not e.is_file(follow_symlinks=False) or not any(fnmatchcase(e.name, p) for p in allowed):
            return f"it holds {_shown(e.name)}, which hetero-convert does not write in a {what}"
    return None


def _hf_problem(path: Path, extra: tuple[str, ...] = ()) -> str | None:
    from .hf_index import INDEX_FILE

    if not (path / "config.json").is_file() or not ((path / INDEX_FILE).is_file() or any(path.glob("*.safetensors"))):
        return "it has no config.json and safetensors weights, so it is not a HF checkpoint directory"
    return _files_problem(path, _hf_names() + extra, "HF checkpoint directory")


def _prune_problem(path: Path) -> str | None:
    names = {e.name for e in _entries(path)}
    if names and names <= set(PRUNE_FILES):  # scores saved by a run whose export did not happen (yet)
        return None
    if not names & set(PRUNE_FILES):
        return f"it holds neither {PRUNE_FILES[0]} nor {PRUNE_FILES[1]}, so it is not a prune output"
    return _hf_problem(path, PRUNE_FILES)


@dataclass(frozen=True)
class OutputKind:
    """What a command writes, and so what an existing OUT must be for that command to replace it.
    `rerun_in_place`: an output of this kind may be written again without --overwrite (prune reads its own
    scores from OUT when asked to reuse them)."""

    name: str
    problem: Callable[[Path], str | None]  # None when the directory is one, else why not
    rerun_in_place: bool = False

    def __str__(self) -> str:
        return self.name


MEGATRON = OutputKind("Megatron checkpoint root", _megatron_root_problem)
HF = OutputKind("HF checkpoint directory", _hf_problem)
PRUNE = OutputKind("prune output", _prune_problem, rerun_in_place=True)
# Without a kind (callers written before kinds existed): any of them, never anything else.
ANY = OutputKind("hetero-convert output",
                 lambda p: None if any(k.problem(p) is None for k in (MEGATRON, HF, PRUNE)) else
                 "it is none of what hetero-convert writes (a Megatron checkpoint root, a HF checkpoint "
                 "directory, a prune output)")


def _relation(out: Path, source: Path) -> str | None:
    o, s = out.resolve(), source.resolve()
    if o == s or (o.exists() and s.exists() and os.path.samefile(o, s)):
        return f"it is the source {source}"
    if o in s.parents:
        return f"it contains the source {source}"
    if s in o.parents:
        return f"it lies inside the source {source}"
    return None


def check_place(out: Path, sources: Iterable[str | Path | None] = ()) -> None:
    """The part of `check_output` that looks at no content: OUT is no symbolic link, and, if it exists, no
    source, holding none and lying in none. (A new OUT may be made anywhere, even inside a source's folder:
    that changes nothing that exists.)"""
    if not os.path.lexists(out):
        return
    for src in sources:
        if src is not None:
            why = _relation(out, Path(src))
            if why:
                raise ConversionError(f"{out}: refused as the output: {why} (write the output elsewhere)")
    if out.is_symlink():
        raise ConversionError(f"{out}: refused as the output: it is a symbolic link (give the directory itself)")


def check_output(out: str | Path, kind: OutputKind = ANY, overwrite: bool = False,
                 sources: Iterable[str | Path | None] = ()) -> None:
    """Raise ConversionError unless `out` may be written by a command that writes `kind` from `sources`: if it
    exists it must not be a source, contain one or lie inside one, and must be a directory, and one that is
    empty, or (with `overwrite`, or for a kind that reruns in place) an output of `kind` holding only what
    this tool writes there. Changes nothing."""
    out = Path(out)
    check_place(out, sources)
    if not out.exists():
        return
    if not out.is_dir():
        raise ConversionError(f"{out}: exists and is not a directory")
    try:
        empty = not _entries(out)
    except OSError as e:
        raise ConversionError(f"{out}: cannot be listed ({e.strerror or e})") from None
    if empty:
        return
    why = kind.problem(out)
    if why is None and (overwrite or kind.rerun_in_place):
        return
    if overwrite:
        raise ConversionError(f"{out}: --overwrite refused: {why}; only a {kind} is replaced, so it is left "
                              f"as it is")
    if why is None:
        raise ConversionError(f"{out}: exists and is not empty (it holds a previous {kind}: --overwrite replaces it)")
    raise ConversionError(f"{out}: exists and is not empty, and --overwrite would not replace it either: {why}")


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
        self.out_dir, self.overwrite, self.active = Path(out_dir), overwrite, active
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
        for e in _entries(out.parent):
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
        if os.path.lexists(out):
            if out.is_dir() and not out.is_symlink() and not _entries(out):
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
