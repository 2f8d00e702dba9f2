"""Where conversion time goes: py-spy samples of both directions on a synthetic Super-layout checkpoint, as a
table of the frames that hold the most samples (own time) and the threads' share of wall time.

    python benchmarks/profile_convert.py --size 8 --tp 1,8 --workers 16 [--torchrun 8] [--modes idle,gil]

Needs `py-spy` on PATH. Each command is profiled with `py-spy record --format raw --threads --idle`, so waits on
I/O and locks show as such (frames in os.pread / write / lock acquires), not as nothing.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import config_for_gb, evict  # noqa: E402

from hetero_convert.fixtures import write_random_checkpoint  # noqa: E402


def summarize(raw: Path, top: int) -> list[tuple[str, float]]:
    """(leaf frame, share of samples) from py-spy's collapsed stacks ("a;b;c count" per line)."""
    own: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        leaf = stack.split(";")[-1]
        own[leaf.split(" (")[0] + " (" + leaf.split(" (")[-1] if " (" in leaf else leaf] += n
    return [(frame, n / max(1, total)) for frame, n in own.most_common(top)]


def profiled(name: str, cmd: list[str], source: Path, raw: Path, rate: int, mode: str) -> float:
    """Run `cmd` under py-spy (every thread, idle ones included; `gil`: only samples holding the GIL; with
    `--subprocesses`, a torchrun job's workers too), its source evicted first; the wall seconds."""
    evict(source, "source")
    flags = {"idle": ["--idle"], "gil": ["--gil"]}[mode]
    t = time.perf_counter()
    subprocess.run(["py-spy", "record", "--format", "raw", "--threads", "--subprocesses", *flags, "--rate",
                    str(rate), "--output", str(raw), "--", *cmd], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=8)
    ap.add_argument("--tp", default="8", help="TP sizes to convert to and back from (a list)")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--torchrun", type=int, default=0, help="also profile torchrun with this many processes")
    ap.add_argument("--modes", default="idle", help="idle (wall time of every thread), gil (GIL holders), or both")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--rate", type=int, default=50)
    ap.add_argument("--workdir", default="/tmp/hc_prof")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    src = write_random_checkpoint(config_for_gb(args.size), work / "hf", fast=True, max_shard_bytes=5 * 10**9 // 2)
    cli = [sys.executable, "-m", "hetero_convert.cli"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.torchrun}",
                "-m", "hetero_convert.cli"]
    for tp in [int(x) for x in args.tp.split(",")]:
        meg = work / f"meg-tp{tp}"
        steps = [("hf-to-megatron", ["hf-to-megatron", str(src), str(meg), "--tp", str(tp)], src),
                 ("megatron-to-hf", ["megatron-to-hf", str(meg), str(work / "back")], meg)]
        for name, cmd, source in steps:
            runs = [(f"workers={args.workers}", cli + cmd + ["--workers", str(args.workers), "--json"])]
            if args.torchrun:
                runs.append((f"torchrun x{args.torchrun} (workers=2)", torchrun + cmd + ["--workers", "2"]))
            for label, full in runs:
                for mode in args.modes.split(","):
                    shutil.rmtree(work / "back", ignore_errors=True)
                    if name == "hf-to-megatron" and (mode, label) != (args.modes.split(",")[0], runs[0][0]):
                        shutil.rmtree(meg, ignore_errors=True)
                    raw = Path(args.out) / f"profile-{name}-tp{tp}-{label.split()[0]}-{mode}.txt"
                    secs = profiled(name, full, source, raw, args.rate, mode)
                    print(f"\n### {name} TP={tp} {label}, {mode}: {secs:.1f} s under the profiler\n")
                    print("| frame (own samples, all threads) | share |")
                    print("|---|---|")
                    for frame, share in summarize(raw, args.top):
                        print(f"| `{frame}` | {share:.1%} |", flush=True)
        shutil.rmtree(work / "back", ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
