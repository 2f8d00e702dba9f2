"""Conversion speed and memory against copying the same bytes, on synthetic checkpoints with the Super-49B
layer layout (attention-free layers, FFN widths from ffn_mult 5.25 ... 0.5) at a smaller hidden size.

For each size, in this order and in the same run (each step in its own process, the step's source evicted
from the page cache first, and dirty pages written back):
  cp -r SRC                          the single-stream copy floor
  parallel copy (--copy-procs N)     the same bytes copied by N processes at once (dd byte ranges): the floor on
                                     a many-core machine with a fast disk
  hf-to-megatron  at every --tp, every --workers, and under torchrun with every --torchrun process count
  megatron-to-hf  from the checkpoint written at each --tp, likewise
  megatron-to-megatron  (with --reshard) from the TP=1 checkpoint to each other --tp
  start-up: a whole conversion of a 1 MB checkpoint (the fixed cost: interpreter, imports, teardown), and
                                     in parts: the interpreter alone, torch's import, the converter's imports,
                                     torchrun starting processes that do nothing
Each step's timeline: first_disk_read (process start to the first byte read from the disk: start-up as issue 14
defines it), source_read (99% of the source read from the disk), exit (the process's end; the rest of
`seconds` is the sync of what it left unwritten).
Peak RSS is the child's ru_maxrss (the largest process of a torchrun job); the memory bound is 512 MiB +
2 x the largest tensor. The table gives each step's seconds and its ratio to both copy floors.

    python benchmarks/convert.py --sizes 4,12 --tp 1 --workers 1,2
    python benchmarks/convert.py --sizes 20 --tp 1,8 --workers 8,16 --torchrun 8 --copy-procs 8 --reshard
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from hetero_convert.fixtures import write_random_checkpoint
from hetero_convert.mappings import bind
from hetero_convert.plan import load_plan

SUPER = Path(__file__).resolve().parents[1] / "fixtures" / "released" / "Llama-3_3-Nemotron-Super-49B-v1.json"


def scaled_super(hidden: int, layers: int, heads: int) -> dict:
    """Super-49B's layer pattern (first `layers` blocks) at a smaller hidden size, same vocab."""
    cfg = json.loads(SUPER.read_text())
    blocks = cfg["block_configs"][:layers]
    for b in blocks:
        if b["attention"]["n_heads_in_group"] is not None:
            b["attention"]["n_heads_in_group"] = heads // 8  # keep 8 KV heads
    cfg.update(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers, block_configs=blocks)
    return cfg


def config_for_gb(target_gb: float) -> dict:
    """Pick hidden size and layer count so the bf16 checkpoint is about target_gb."""
    for hidden in (1024, 2048, 3072, 4096, 8192):
        heads = hidden // 128
        for layers in range(8, 81):
            cfg = scaled_super(hidden, layers, heads)
            if load_plan(cfg).num_parameters() * 2 / 1e9 >= target_gb:
                return cfg
    return cfg


def evict(source: Path, mode: str) -> str:
    """Make the next step read `source` from disk. Dirty pages (the previous step's output) are written back
    first either way. "source": only the source's pages are dropped (fadvise DONTNEED), so programs and
    libraries stay cached, as cp's own binary does. "all": the whole page cache is dropped (root only)."""
    os.sync()
    if mode == "all":
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "all"
        except OSError:
            pass
    for f in source.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "source"


def _tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc/<pid>/task/<tid>/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _block_stats(path: Path) -> list[Path]:
    """The `stat` files of the disk(s) under `path`: its own device's (a partition's, say), or, where that has
    none (overlay, tmpfs), every physical disk's."""
    st = os.stat(path)
    own = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat")
    if own.is_file():
        return [own]
    return [d / "stat" for d in Path("/sys/block").glob("*") if (d / "device").exists() and (d / "stat").is_file()]


def _disk_counters(files: list[Path]) -> tuple:
    """(read I/Os, sectors read, write I/Os, sectors written) summed over `files`, and each one's ms busy
    (Documentation/block/stat.rst)."""
    total, busy = [0] * 4, []
    for f in files:
        v = [int(x) for x in f.read_text().split()]
        for k, i in enumerate((0, 2, 4, 6)):
            total[k] += v[i]
        busy.append(v[9])
    return (*total, tuple(busy))


class DiskReads:
    """Bytes a process tree has read from the disk (read_bytes of /proc/<pid>/io: page-cache hits do not count),
    polled every few milliseconds on a thread: when the first byte came from the disk (start-up, as the converter
    reads only its source from disk: programs and libraries stay cached) and when nearly all of the source had.
    With `disk` (the stat files of the disk the step reads and writes), also what the disk itself did during the
    step: bytes read and written, the share of the time it was busy, the mean request sizes, and a series of
    (seconds, read MB/s, write MB/s) every 0.5 s."""

    def __init__(self, pid: int, t0: float, source_bytes: int, disk: list[Path] | None = None,
                 children_only: bool = False):
        self.pid, self.t0, self.target = pid, t0, 0.99 * source_bytes
        # children_only: `pid` is this benchmark itself (the parallel copy's dd processes are its children); its
        # own count also grows by each child's when that is reaped, which would count the child twice
        self.children_only = children_only
        self.first = self.most = None
        self._seen: dict[int, int] = {}
        self.disk = disk or []
        self.series: list[tuple] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample_disk(self, now: float) -> None:
        if self.disk and (not self.series or now - self.series[-1][0] >= 0.5):
            self.series.append((now, *_disk_counters(self.disk)))

    def _run(self) -> None:
        self._sample_disk(time.perf_counter() - self.t0)
        while not self._stop.is_set():
            for p in _tree(self.pid):
                if self.children_only and p == self.pid:
                    continue
                try:
                    with open(f"/proc/{p}/io") as f:
                        self._seen[p] = max(self._seen.get(p, 0), int(f.read().split("read_bytes:")[1].split()[0]))
                except (OSError, IndexError, ValueError):
                    pass
            total, now = sum(self._seen.values()), time.perf_counter() - self.t0
            if self.first is None and total > 0:
                self.first = now
            if self.most is None and total >= self.target > 0:
                self.most = now
            self._sample_disk(now)
            self._stop.wait(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.disk:
            self.series.append((time.perf_counter() - self.t0, *_disk_counters(self.disk)))

    def disk_summary(self) -> dict:
        if len(self.series) < 2:
            return {}
        (t0, r0, rs0, w0, ws0, b0), (t1, r1, rs1, w1, ws1, b1) = self.series[0], self.series[-1]
        mb = 512 / 1e6
        steps = [(round(b[0], 1), round((b[2] - a[2]) * mb / (b[0] - a[0])), round((b[4] - a[4]) * mb / (b[0] - a[0])))
                 for a, b in zip(self.series, self.series[1:]) if b[0] > a[0]]
        return {"disk_read_GB": round((rs1 - rs0) * 512 / 1e9, 2), "disk_write_GB": round((ws1 - ws0) * 512 / 1e9, 2),
                "disk_busy": round(max(b - a for a, b in zip(b0, b1)) / 1e3 / max(t1 - t0, 1e-9), 2),  # the busiest
                "read_req_KiB": round((rs1 - rs0) / 2 / max(1, r1 - r0)),
                "write_req_KiB": round((ws1 - ws0) / 2 / max(1, w1 - w0)), "disk_MBps": steps}


# Linux reports a child's peak RSS as at least that of the process it was forked from, as it was when the child
# called exec (the kernel keeps the old memory's high-water mark across exec). This benchmark holds ~1 GB after
# writing a checkpoint, so every step is started by a small process of its own (a fresh interpreter with nothing
# imported), and reports the step's own peak.
_SPAWNER = r"""
import json, os, subprocess, sys
for line in sys.stdin:
    job = json.loads(line)
    try:
        with open(job["stderr"], "wb") as err:
            p = subprocess.Popen(job["cmd"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                 env=job["env"], cwd=job["cwd"])
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        continue
    print(json.dumps({"pid": p.pid}), flush=True)
    _, status, usage = os.wait4(p.pid, 0)
    print(json.dumps({"status": status, "maxrss_KiB": usage.ru_maxrss}), flush=True)
"""
_spawner: subprocess.Popen | None = None


def _spawn(cmd: list[str], env: dict | None, cwd: str | None, stderr: str) -> tuple[int, callable]:
    """Start `cmd` from the spawner: its pid, and a function that waits for it and returns (status, peak RSS KiB)."""
    global _spawner
    if _spawner is None:
        _spawner = subprocess.Popen([sys.executable, "-S", "-c", _SPAWNER], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, bufsize=1)
    _spawner.stdin.write(json.dumps({"cmd": cmd, "env": dict(env if env is not None else os.environ),
                                     "cwd": cwd, "stderr": stderr}) + "\n")
    started = json.loads(_spawner.stdout.readline())
    if "error" in started:
        raise RuntimeError(f"{' '.join(cmd)} could not start: {started['error']}")
    pid = started["pid"]

    def wait() -> tuple[int, int]:
        done = json.loads(_spawner.stdout.readline())
        return done["status"], done["maxrss_KiB"]
    return pid, wait


def timed_child(cmd: list[str], env: dict | None = None, cwd: str | None = None,
                source_bytes: int = 0, disk: list[Path] | None = None) -> tuple[float, int, dict]:
    """Wall seconds (until the output is on disk: the sync is part of the step), the largest peak RSS (bytes) of
    the child and its descendants, and the step's timeline: `exit` (the process's own end), the rest being the
    sync of what it left in the page cache, and with `source_bytes`, `first_disk_read` (process start to the first
    byte read from the disk) and `source_read` (to 99% of the source's bytes read from the disk); with `disk`,
    what the disk did until the sync ended (DiskReads)."""
    stderr = f"/tmp/hc_bench_stderr_{os.getpid()}"
    t = time.perf_counter()
    pid, wait = _spawn(cmd, env, cwd, stderr)
    reads = DiskReads(pid, t, source_bytes, disk) if source_bytes else None
    status, maxrss_kib = wait()
    ended = time.perf_counter() - t
    os.sync()
    elapsed = time.perf_counter() - t
    if reads:
        reads.stop()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {Path(stderr).read_bytes().decode(errors='replace')[-3000:]}")
    timeline = {"exit": round(ended, 2)}
    if reads:
        timeline.update(first_disk_read=reads.first and round(reads.first, 2),
                        source_read=reads.most and round(reads.most, 2), **reads.disk_summary())
    # Linux reports the largest of the child and of the descendants it reaped (a torchrun job's workers, whose
    # own peak starts at the launcher's, as theirs is exec'd from it).
    return elapsed, maxrss_kib * 1024, timeline


def parallel_copy(src: Path, dst: Path, procs: int, disk: list[Path] | None = None) -> tuple[float, dict]:
    """Copy every file of src to dst with `procs` dd processes at once, each a contiguous byte range of the
    whole (files split where the ranges fall): the same bytes as cp -r, N streams. Seconds in all (the sync
    included), and the timeline as `timed_child` gives it (`exit`: the last dd's end)."""
    files = sorted(f for f in src.rglob("*") if f.is_file())
    total = sum(f.stat().st_size for f in files)
    per = -(-total // procs)
    jobs, start = [], 0
    for f in files:
        size, pos = f.stat().st_size, 0
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as fh:
            fh.truncate(size)
        while pos < size:
            n = min(size - pos, per - (start % per))
            jobs.append(["dd", f"if={f}", f"of={out}", "bs=4M", "iflag=skip_bytes,count_bytes",
                         "oflag=seek_bytes", f"skip={pos}", f"seek={pos}", f"count={n}", "conv=notrunc",
                         "status=none"])
            pos += n
            start += n
    t = time.perf_counter()
    reads = DiskReads(os.getpid(), t, total, disk, children_only=True)
    with ThreadPoolExecutor(max_workers=procs) as pool:
        for rc in pool.map(lambda c: subprocess.run(c).returncode, jobs):
            assert rc == 0
    copied = time.perf_counter() - t
    os.sync()
    elapsed = time.perf_counter() - t
    reads.stop()
    return elapsed, {"exit": round(copied, 2), "first_disk_read": reads.first and round(reads.first, 2),
                     "source_read": reads.most and round(reads.most, 2), **reads.disk_summary()}


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,12", help="checkpoint sizes in GB")
    ap.add_argument("--tp", default="1", help="Megatron TP sizes to convert to and from")
    ap.add_argument("--workers", default="1,2,4", help="--workers values (any list)")
    ap.add_argument("--torchrun", default="", help="process counts to also run under torchrun (one node)")
    ap.add_argument("--torchrun-workers", type=int, default=0,
                    help="--workers of each torchrun process (0: the largest --workers split over the processes)")
    ap.add_argument("--copy-procs", type=int, default=8, help="processes of the parallel-copy floor")
    ap.add_argument("--reshard", action="store_true", help="also time megatron-to-megatron from TP=1")
    ap.add_argument("--no-checksums", action="store_true", help="hf-to-megatron without hashing the source")
    ap.add_argument("--compare-with", default=None, metavar="DIR",
                    help="a source tree of another version (its hetero_convert/, mappings/, fixtures/): also time its "
                         "hf-to-megatron and megatron-to-hf (of this version's checkpoint) at each --tp with the "
                         "largest --workers, right after this version's")
    ap.add_argument("--directions", default="hf-to-megatron,megatron-to-hf", help="which conversions to time")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time each conversion (single process and torchrun) this many times, in rounds")
    ap.add_argument("--workdir", default="/tmp/hc_bench")
    ap.add_argument("--evict", choices=("source", "all"), default="source")
    ap.add_argument("--json-out", default=os.environ.get("OUT") and str(Path(os.environ["OUT"]) / "convert.jsonl"))
    args = ap.parse_args()
    work = Path(args.workdir)
    cli = [sys.executable, "-m", "hetero_convert.cli"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    rows: list[dict] = []
    sink = open(args.json_out, "a") if args.json_out else None

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if sink:
            sink.write(json.dumps(row) + "\n")
            sink.flush()

    # Start-up, in parts (best of 3, warm): the interpreter, torch's import, the converter's imports.
    for what, code in (("python", "pass"), ("import torch", "import torch"),
                       ("import the converter", "import hetero_convert.convert.driver, hetero_convert.cli")):
        best = min(timed_child([sys.executable, "-c", code])[0] for _ in range(3))
        record({"size_GB": 0, "step": f"start-up part: {what}", "seconds": round(best, 2)})
    for n in ints(args.torchrun):  # torchrun's own cost, which its rows below include: launcher, rendezvous, exits
        best = min(timed_child(torchrun + [f"--nproc-per-node={n}", "--no-python", "true"])[0] for _ in range(3))
        record({"size_GB": 0, "step": f"start-up part: torchrun x{n} running `true`", "seconds": round(best, 2)})
    # Start-up: the whole run on a ~1 MB checkpoint, both directions.
    tiny = write_random_checkpoint("tiny-llama", work / "startup" / "hf")
    for direction, src in (("hf-to-megatron", tiny), ("megatron-to-hf", work / "startup" / "meg")):
        out = work / "startup" / ("meg" if direction == "hf-to-megatron" else "back")
        shutil.rmtree(out, ignore_errors=True)
        evict(src, "source")
        secs, rss, timeline = timed_child(cli + [direction, str(src), str(out), "--json"], source_bytes=dir_bytes(src))
        record({"size_GB": 0.001, "step": f"start-up {direction}", "seconds": round(secs, 2),
                "peak_rss_MiB": round(rss / 2**20), **timeline})
    shutil.rmtree(work / "startup", ignore_errors=True)

    for gb in [float(x) for x in args.sizes.split(",")]:
        root = work / f"{gb:g}GB"
        shutil.rmtree(root, ignore_errors=True)
        cfg = config_for_gb(gb)
        plan = load_plan(cfg)
        largest = max(2 * m.numel for m in bind(plan, tp=max(ints(args.tp))))
        bound = 512 * 2**20 + 2 * largest
        t = time.perf_counter()
        src = write_random_checkpoint(cfg, root / "hf", fast=True, max_shard_bytes=5 * 10**9 // 2)
        size = dir_bytes(src)
        print(f"# {size / 1e9:.1f} GB written in {time.perf_counter() - t:.0f}s: hidden {plan.hidden_size}, "
              f"{plan.num_layers} layers", flush=True)
        disk = _block_stats(root)
        evicted = evict(src, args.evict)
        cp_s, _, cp_timeline = timed_child(["cp", "-r", str(src), str(root / "cp")], source_bytes=size, disk=disk)
        shutil.rmtree(root / "cp")
        evict(src, args.evict)
        par_s, par_timeline = parallel_copy(src, root / "pcp", args.copy_procs, disk)
        shutil.rmtree(root / "pcp")
        record({"size_GB": round(size / 1e9, 2), "step": "cp -r", "seconds": round(cp_s, 2), **cp_timeline})
        record({"size_GB": round(size / 1e9, 2), "step": f"parallel copy x{args.copy_procs}",
                "seconds": round(par_s, 2), **par_timeline})

        def step(name: str, cmd: list[str], source: Path, out: Path, keep: bool = False, other: str | None = None):
            shutil.rmtree(out, ignore_errors=True)
            evict(source, args.evict)
            env = {**os.environ, "OMP_NUM_THREADS": "1"} if cmd[:3] == torchrun[:3] else dict(os.environ)
            if other:  # the other version's package first, and not the current directory's
                env["PYTHONPATH"] = other
            secs, rss, timeline = timed_child(cmd, env=env, cwd=other, source_bytes=dir_bytes(source), disk=disk)
            record({"size_GB": round(size / 1e9, 2), "step": name, "seconds": round(secs, 2), **timeline,
                    "vs_cp": round(secs / cp_s, 2), "vs_parallel_copy": round(secs / par_s, 2),
                    "peak_rss_MiB": round(rss / 2**20), "bound_MiB": round(bound / 2**20),
                    "within_bound": rss <= bound, "evicted": evicted})
            if not keep:
                shutil.rmtree(out, ignore_errors=True)

        megs = {}
        nohash = ["--no-checksums"] if args.no_checksums else []
        tag = " no checksums" if args.no_checksums else ""
        other, wmax = args.compare_with and str(Path(args.compare_with).resolve()), max(ints(args.workers))
        directions = args.directions.split(",")

        def per_process(n: int) -> int:  # the same threads in all, however many processes share them
            return args.torchrun_workers or max(1, wmax // n)

        def megatron_source(tp: int) -> None:
            """The TP checkpoint a later step reads, written by this version where hf-to-megatron left none."""
            if not megs[tp].exists():
                step(f"hf-to-megatron TP={tp} workers={wmax} (the source of what follows)", cli + [
                     "hf-to-megatron", str(src), str(megs[tp]), "--tp", str(tp), "--workers", str(wmax), "--json"],
                     src, megs[tp], keep=True)
        for tp in ints(args.tp):
            megs[tp] = root / f"meg-tp{tp}"
            if "hf-to-megatron" not in directions:
                continue
            for r in range(args.repeat):  # repeats alternate with the other version's: drift hits both alike
                again = f" (run {r + 1})" if args.repeat > 1 else ""
                for k, w in enumerate(ints(args.workers)):
                    # the first one is kept as megatron-to-hf's source, if that is timed
                    first = k == 0 and r == 0 and "megatron-to-hf" in directions
                    out = megs[tp] if first else root / "out"
                    step(f"hf-to-megatron TP={tp} workers={w}{tag}{again}", cli + ["hf-to-megatron", str(src),
                         str(out), "--tp", str(tp), "--workers", str(w), "--json", *nohash], src, out, keep=out == megs[tp])
                if other:
                    out = root / "old-out"
                    step(f"other version: hf-to-megatron TP={tp} workers={wmax}{tag}{again}", cli + [
                         "hf-to-megatron", str(src), str(out), "--tp", str(tp), "--workers", str(wmax), "--json",
                         *nohash], src, out, other=other)
                for n in ints(args.torchrun):  # in the same round as the single processes they are set against
                    for version, label in [(None, "")] + ([(other, "other version: ")] if other else []):
                        step(f"{label}hf-to-megatron TP={tp} torchrun x{n} (workers={per_process(n)}){tag}{again}",
                             torchrun + [f"--nproc-per-node={n}", "-m", "hetero_convert.cli", "hf-to-megatron",
                                         str(src), str(root / "out"), "--tp", str(tp), "--workers",
                                         str(per_process(n)), *nohash],
                             src, root / "out", other=version)
        for tp in ints(args.tp):
            if "megatron-to-hf" not in directions:
                continue
            megatron_source(tp)
            for r in range(args.repeat):
                again = f" (run {r + 1})" if args.repeat > 1 else ""
                for w in ints(args.workers):
                    step(f"megatron-to-hf from TP={tp} workers={w}{again}", cli + ["megatron-to-hf", str(megs[tp]),
                         str(root / "out"), "--workers", str(w), "--json"], megs[tp], root / "out")
                if other:  # the other version's conversion of the same Megatron checkpoint
                    step(f"other version: megatron-to-hf from TP={tp} workers={wmax}{again}", cli + [
                         "megatron-to-hf", str(megs[tp]), str(root / "out"), "--workers", str(wmax), "--json"],
                         megs[tp], root / "out", other=other)
                for n in ints(args.torchrun):
                    for version, label in [(None, "")] + ([(other, "other version: ")] if other else []):
                        step(f"{label}megatron-to-hf from TP={tp} torchrun x{n} (workers={per_process(n)}){again}",
                             torchrun + [f"--nproc-per-node={n}", "-m", "hetero_convert.cli", "megatron-to-hf",
                                         str(megs[tp]), str(root / "out"), "--workers", str(per_process(n))],
                             megs[tp], root / "out", other=version)
            if not (args.reshard and tp == 1):  # a small disk holds one TP's checkpoint at a time
                shutil.rmtree(megs[tp], ignore_errors=True)
        if args.reshard and 1 in megs:
            megatron_source(1)
            for tp in [t for t in ints(args.tp) if t != 1]:
                w = max(ints(args.workers))
                step(f"megatron-to-megatron TP=1 -> TP={tp} workers={w}", cli + ["megatron-to-megatron",
                     str(megs[1]), str(root / "out"), "--tp", str(tp), "--workers", str(w), "--json"], megs[1],
                     root / "out")
        shutil.rmtree(root, ignore_errors=True)

    print()
    head = ["size_GB", "step", "seconds", "first_disk_read", "source_read", "exit", "vs_cp", "vs_parallel_copy",
            "disk_read_GB", "disk_write_GB", "disk_busy", "read_req_KiB", "write_req_KiB", "peak_rss_MiB",
            "bound_MiB", "within_bound"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(r.get(h, "")) for h in head) + " |")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"\nmachine: {os.cpu_count()} cores, {mem:.0f} GiB; python {sys.version.split()[0]}; torch "
          f"{torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; evict={args.evict}")


if __name__ == "__main__":
    main()
