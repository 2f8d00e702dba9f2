"""Where conversion time goes: py-spy samples of both directions on a synthetic Super-layout checkpoint, as a
table of the frames that hold the most samples (own time) and the threads' share of wall time.

    python benchmarks/profile_convert.py --size 8 --tp 8 --workers 16 [--workdir /tmp/hc_prof]

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=8)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--rate", type=int, default=50)
    ap.add_argument("--workdir", default="/tmp/hc_prof")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    src = write_random_checkpoint(config_for_gb(args.size), work / "hf", fast=True, max_shard_bytes=5 * 10**9 // 2)
    cli = [sys.executable, "-m", "hetero_convert.cli"]
    steps = [("hf-to-megatron", cli + ["hf-to-megatron", str(src), str(work / "meg"), "--tp", str(args.tp),
                                       "--workers", str(args.workers), "--json"], src),
             ("megatron-to-hf", cli + ["megatron-to-hf", str(work / "meg"), str(work / "back"), "--workers",
                                       str(args.workers), "--json"], work / "meg")]
    for name, cmd, source in steps:
        evict(source, "source")
        raw = Path(args.out) / f"profile-{name}-tp{args.tp}.txt"
        t = time.perf_counter()
        subprocess.run(["py-spy", "record", "--format", "raw", "--threads", "--idle", "--rate", str(args.rate),
                        "--output", str(raw), "--", *cmd], check=True, stdout=subprocess.DEVNULL)
        secs = time.perf_counter() - t
        print(f"\n### {name} TP={args.tp} workers={args.workers}: {secs:.1f} s under the profiler\n")
        print("| frame (own samples, all threads) | share |")
        print("|---|---|")
        for frame, share in summarize(raw, args.top):
            print(f"| `{frame}` | {share:.1%} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
