"""Wall time and peak RSS per rank of hf-to-megatron / megatron-to-hf under torchrun, next to `cp -r`.

    python benchmarks/convert_distributed.py [--workdir /tmp/hc_bench/distributed] [--ranks 1 2 4] [--tp 2 --pp 2]

Writes a ~8.8 GB bf16 checkpoint with Super-49B's layer layout (its 80 block_configs: 31 attention-free
layers, FFN widths from 0.5x to 5.25x) scaled down to hidden 2304 / 48 heads, into WORKDIR/src. Each
measurement drops the page cache first where the kernel lets us (`sync; echo 3 > /proc/sys/vm/drop_caches`,
reported per row; it is machine-wide, so it also cools the cache of anything else running), so the source is
read from disk. "wall" is the launcher's wall time including torchrun start-up; "+sync" adds flushing the
written data to disk, which the converter leaves to the kernel.
Every rank is this very file run with --worker under torchrun: it converts through the library (distributed
when WORLD_SIZE > 1, the unchanged single-process path otherwise) and reports its ru_maxrss to a JSON file
the launcher collects. What this script writes under WORKDIR (src, copy, meg-*, hf-*, reports) is deleted at
the end unless --keep; nothing else there is touched (other benchmarks share /tmp/hc_bench).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SUPER_49B = Path(__file__).resolve().parents[1] / "fixtures" / "released" / "Llama-3_3-Nemotron-Super-49B-v1.json"


def bench_config(hidden: int, heads: int) -> dict:
    cfg = copy.deepcopy(json.loads(SUPER_49B.read_text()))
    cfg["hidden_size"], cfg["num_attention_heads"] = hidden, heads  # ffn_mult and KV groups are relative
    return cfg


# ---- one rank (run by torchrun) -----------------------------------------------------------------------------


def worker(a) -> None:
    from hetero_convert.cli.process import settle_process_for_streaming
    from hetero_convert.convert import hf_to_megatron, megatron_to_hf

    settle_process_for_streaming(a.threads)  # what the CLI does before converting
    t0 = time.time()
    if a.direction == "hf-to-megatron":
        s = hf_to_megatron(a.src, a.out, tp=a.tp, pp=a.pp, workers=a.threads, distributed=None)
    else:
        s = megatron_to_hf(a.src, a.out, max_shard_size=a.max_shard_size, workers=a.threads, distributed=None)
    rank = int(os.environ.get("RANK", "0"))
    use = resource.getrusage(resource.RUSAGE_SELF)
    # ru_maxrss is in KiB on Linux; it counts the mmap'ed source pages a rank touched, too.
    report = {"rank": rank, "seconds": time.time() - t0, "bytes_written": s.bytes_written,
              "max_rss_mb": use.ru_maxrss / 1024, "cpu_s": use.ru_utime + use.ru_stime}
    Path(a.report_dir, f"rank{rank}.json").write_text(json.dumps(report))


# ---- the launcher ------------------------------------------------------------------------------------------


def cached_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def drop_caches() -> str:
    """'yes' when the page cache was dropped (and by how much), 'no (why)' otherwise."""
    subprocess.run(["sync"], check=True)
    before = cached_mb()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        return f"no ({e.strerror})"
    return f"yes ({before / 1024:.1f}->{cached_mb() / 1024:.1f} GiB)"


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(seconds of the command, seconds of the sync after it)."""
    t0 = time.time()
    r = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    t1 = time.time()
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    subprocess.run(["sync"], check=True)
    return t1 - t0, time.time() - t1


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def warm(src: Path) -> str:
    for f in sorted(src.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    return "no (source read into the cache first)"


def run_conversion(a, direction: str, src: Path, out: Path, ranks: int, threads: int, cold: bool = True) -> dict:
    reports = Path(a.workdir) / "reports"
    shutil.rmtree(reports, ignore_errors=True)
    reports.mkdir()
    dropped = drop_caches() if cold else warm(src)
    load = os.getloadavg()[0]  # other work on the machine shows here: the rates assume the cores are ours
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           __file__, "--worker", "--direction", direction, "--src", str(src), "--out", str(out),
           "--tp", str(a.tp), "--pp", str(a.pp), "--threads", str(threads), "--report-dir", str(reports),
           "--max-shard-size", a.max_shard_size]
    wall, sync = timed(cmd, {"OMP_NUM_THREADS": "1"})
    per = sorted((json.loads(f.read_text()) for f in reports.glob("rank*.json")), key=lambda r: r["rank"])
    return {"what": direction, "ranks": ranks, "threads": threads, "wall_s": wall, "sync_s": sync,
            "bytes": dir_bytes(out), "max_rss_mb": [round(r["max_rss_mb"]) for r in per],
            "rank_s": [round(r["seconds"], 1) for r in per], "cpu_s": [round(r["cpu_s"], 1) for r in per],
            "caches_dropped": dropped, "load": load}


def run_cp(a, src: Path, dst: Path) -> dict:
    dropped = drop_caches()
    load = os.getloadavg()[0]
    wall, sync = timed(["cp", "-r", str(src), str(dst)])
    return {"what": "cp -r", "ranks": 1, "threads": 1, "wall_s": wall, "sync_s": sync, "bytes": dir_bytes(dst),
            "max_rss_mb": [], "rank_s": [], "cpu_s": [], "caches_dropped": dropped, "load": load}


def table(rows: list[dict]) -> str:
    head = ("| what | ranks x threads | wall s | wall+sync s | GB written | GB/s (wall+sync) | per rank MB/s "
            "| peak RSS per rank MB | seconds in rank | CPU s per rank | MB per CPU s | load before | "
            "page cache dropped |\n|" + "---|" * 13)
    lines = [head]
    for r in rows:
        total = r["wall_s"] + r["sync_s"]
        rate = r["bytes"] / total
        per_cpu = f"{r['bytes'] / sum(r['cpu_s']) / 1e6:.0f}" if r["cpu_s"] else "-"
        lines.append(f"| {r['what']} | {r['ranks']} x {r['threads']} | {r['wall_s']:.1f} | {total:.1f} | "
                     f"{r['bytes'] / 1e9:.2f} | {rate / 1e9:.2f} | {rate / r['ranks'] / 1e6:.0f} | "
                     f"{', '.join(map(str, r['max_rss_mb'])) or '-'} | {', '.join(map(str, r['rank_s'])) or '-'} | "
                     f"{', '.join(map(str, r['cpu_s'])) or '-'} | {per_cpu} | {r['load']:.1f} | "
                     f"{r['caches_dropped']} |")
    return "\n".join(lines)


def runs(a) -> list[tuple[int, int, bool]]:
    """(ranks, threads per rank, cold cache): every rank count, then one process with more threads, then one
    process with the source already in the page cache (telling disk-bound from CPU-bound)."""
    out = [(n, 1, True) for n in a.ranks]
    if a.threads_row > 1:
        out.append((1, a.threads_row, True))
    return out + [(1, 1, False)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/hc_bench/distributed")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--hidden", type=int, default=2304)
    p.add_argument("--heads", type=int, default=48)
    p.add_argument("--directions", nargs="+", default=["hf-to-megatron", "megatron-to-hf"])
    p.add_argument("--max-shard-size", default="1GB", help="HF shards written by megatron-to-hf: the unit of work "
                   "there, so several per rank")
    p.add_argument("--threads-row", type=int, default=2, help="Also time one process with this many threads")
    p.add_argument("--keep", action="store_true", help="Keep what this script wrote (default: delete it at the end)")
    # worker mode (under torchrun)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--direction", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--report-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    from hetero_convert.fixtures import write_random_checkpoint

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    try:
        if not (src / "config.json").is_file():
            t0 = time.time()
            write_random_checkpoint(bench_config(a.hidden, a.heads), src, seed=0, max_shard_bytes=5 * 10**9 // 10,
                                    fast=True)
            print(f"generated {dir_bytes(src) / 1e9:.2f} GB in {time.time() - t0:.0f}s -> {src}", flush=True)
        rows = [run_cp(a, src, work / "copy")]
        shutil.rmtree(work / "copy")
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        meg = work / "meg-reference"
        if "hf-to-megatron" in a.directions or "megatron-to-hf" in a.directions:
            for n, threads, cold in runs(a):
                out = work / f"meg-{n}"
                rows.append(run_conversion(a, "hf-to-megatron", src, out, n, threads, cold))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
                if not meg.exists():
                    out.rename(meg)  # the source of the other direction
                else:
                    shutil.rmtree(out)
        if "megatron-to-hf" in a.directions:
            for n, threads, cold in runs(a):
                out = work / f"hf-{n}"
                rows.append(run_conversion(a, "megatron-to-hf", meg, out, n, threads, cold))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
                shutil.rmtree(out)
        print()
        print(f"source: {dir_bytes(src) / 1e9:.2f} GB bf16, Super-49B layout at hidden {a.hidden}/{a.heads} heads; "
              f"Megatron side TP={a.tp} PP={a.pp}; {os.cpu_count()} CPUs")
        print(table(rows))
    finally:
        if not a.keep:
            for name in ["src", "copy", "reports", "meg-reference"] + [f"{d}-{n}" for d in ("meg", "hf")
                                                                       for n in a.ranks + [1]]:
                shutil.rmtree(work / name, ignore_errors=True)
            if work.is_dir() and not any(work.iterdir()):
                work.rmdir()


if __name__ == "__main__":
    main()
