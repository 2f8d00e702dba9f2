"""Processes: whether this one was started by torchrun (the one probe every module asks), and starting a
torchrun job of our own (`run_under_torchrun`), as verify does for the Megatron side.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Where the package lives, so that a torchrun child can import it even when it is not pip-installed.
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place in a torch.distributed job, as its launcher's environment (env://) states it;
    rank 0 of a world of one when no launcher set it."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (or another env:// launcher), even with one process
    run_id: str | None = None  # the same on every process of the job

    @property
    def coordinator(self) -> bool:
        return self.rank == 0


def world() -> World:
    env = os.environ
    if not all(k in env for k in _ENV_KEYS):
        return World()
    run_id = env.get("TORCHELASTIC_RUN_ID") or f"{env['MASTER_ADDR']}-{env['MASTER_PORT']}"
    return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), True, run_id)


_STORE = None


def job_store():
    """A client of this torch.distributed job's key-value store (TCPStore at MASTER_ADDR:MASTER_PORT): torchrun's
    agent hosts it (TORCHELASTIC_USE_AGENT_STORE); other env:// launchers leave it to rank 0. Every process of the
    job reaches it, so small objects can be exchanged without a process group (and its threads). The timeout is
    HETERO_CONVERT_TIMEOUT_S (default 12 h: a peer may be busy converting its share of a huge model)."""
    global _STORE
    if _STORE is None:
        import datetime

        import torch.distributed as dist

        env = world()
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        timeout = datetime.timedelta(seconds=float(os.environ.get("HETERO_CONVERT_TIMEOUT_S", 12 * 3600)))
        _STORE = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=env.size,
                               is_master=not agent and env.rank == 0, timeout=timeout, wait_for_workers=False)
    return _STORE


_SHARED: dict[str, int] = {}


def share_from_coordinator(obj, key: str):
    """Rank 0's `obj` on every process of the job (all call it, with the same key, in the same order)."""
    import pickle

    env = world()
    if env.size == 1:
        return obj
    _SHARED[key] = _SHARED.get(key, 0) + 1
    store, full = job_store(), f"hetero_convert/{env.run_id}/{key}/{_SHARED[key]}"
    if env.coordinator:
        store.set(full, pickle.dumps(obj))
        return obj
    return pickle.loads(store.get(full))  # written by our own rank 0


def _log_excerpt(path: Path, chars: int = 6000) -> str:
    """The first worker traceback (the root cause; torchrun's own traceback that follows only says that a
    child failed), then the end of the log."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    tail = "\n".join(lines[-25:])
    start = next((i for i, l in enumerate(lines) if "Traceback (most recent call last)" in l), None)
    if start is None:
        return tail[-chars:]
    # torchrun prefixes a worker's lines with "[rankN]: "; the traceback ends where that prefix stops, or
    # (unprefixed) at its first unindented line, the exception message.
    prefix = lines[start][: lines[start].index("Traceback")]
    block = [lines[start]]
    for line in lines[start + 1:]:
        body = line[len(prefix):]
        if not line.startswith(prefix):
            break
        block.append(line)
        if not prefix and body and not body[0].isspace():
            break
    cause = "\n".join(block[-40:])
    return f"{cause}\n[...]\n{tail}"[-chars:]


def first_error(path: Path) -> str | None:
    """The exception line of the first worker traceback in a torchrun log (its rank prefix removed), or None."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    start = next((i for i, l in enumerate(lines) if "Traceback (most recent call last)" in l), None)
    if start is None:
        return None
    prefix = lines[start][: lines[start].index("Traceback")]
    for line in lines[start + 1:]:
        body = line[len(prefix):] if line.startswith(prefix) else line
        if body and not body[0].isspace():
            return body.strip()[:500]
    return None


def run_under_torchrun(args: Sequence, nproc: int, timeout: float = 600.0, log_file: str | Path | None = None,
                       env: dict | None = None, module: str = "hetero_convert.megatron.worker",
                       extra_path: Sequence[str] = (), python: str = sys.executable) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m <module> *args`, with this interpreter
    or `python` (another environment's, e.g. another megatron-core version's).

    Output goes to a file, not a pipe: megatron's dist-checkpoint save leaves a spawned Manager process
    that holds inherited pipe ends open, so reading a pipe to EOF can wait forever. The run gets its own
    process group, so a timeout kills torchrun *and* its workers. Raises RuntimeError with the log's tail
    on failure or timeout; the CompletedProcess carries the log text as `stdout`. `extra_path` folders are
    put on the workers' PYTHONPATH after the package's own root.
    """
    if log_file is None:
        fd, name = tempfile.mkstemp(prefix="mcore_torchrun_", suffix=".log")
        os.close(fd)
        log_file = name
    log_path = Path(log_file)
    cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *map(str, args)]
    run_env = dict(os.environ if env is None else env)
    run_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (PACKAGE_ROOT, *extra_path, run_env.get("PYTHONPATH")) if p)
    # One thread per rank: the ranks already share the cores (torchrun sets this too, but only with a
    # warning, and not for a single process).
    run_env.setdefault("OMP_NUM_THREADS", "1" if nproc > 1 else str(os.cpu_count() or 1))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=run_env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # The group id is torchrun's own pid (new session): this reaches exactly the processes we started.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"torchrun timed out after {timeout:.0f}s: {' '.join(cmd)}\n"
                               f"--- log tail ({log_path}) ---\n{_log_excerpt(log_path)}") from None
    if rc != 0:
        raise RuntimeError(f"torchrun failed with exit code {rc}: {' '.join(cmd)}\n"
                           f"--- log tail ({log_path}) ---\n{_log_excerpt(log_path)}")
    return subprocess.CompletedProcess(cmd, rc, stdout=log_path.read_text(errors="replace"), stderr=None)
