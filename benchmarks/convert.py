"""Conversion speed and memory against `cp -r`, on synthetic checkpoints with the Super-49B layer layout.

For each size (about 1, 4 and 12 GB in bf16 by default) it writes a checkpoint whose layers follow the
released Super-49B block_configs (attention-free layers, FFN widths from ffn_mult 5.25 ... 0.5) at a smaller
hidden size, then, in this order and in the same run:
  cp -r SRC                         the I/O floor for reading and writing the same bytes
  hf-to-megatron SRC (TP=1, PP=1)   for each --workers value
  megatron-to-hf MEG                for each --workers value
Each conversion runs in its own process; its peak RSS is that child's ru_maxrss. The target is a ratio to
`cp -r` of at most 1.5 with the best --workers, and peak RSS <= 512 MiB + 2 x the largest single tensor.
Before each timed step the previous output is written back and the step's source is evicted from the page
cache (`--evict source`, the default), or the whole page cache is dropped (`--evict all`, root only); the
table's `evicted` column says which.

    python benchmarks/convert.py --sizes 1,4,12 --workers 1,2,4 --workdir /tmp/hc_bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
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
    for hidden in (1024, 2048, 3072, 4096):
        heads = hidden // 128
        for layers in range(8, 81):
            cfg = scaled_super(hidden, layers, heads)
            gb = load_plan(cfg).num_parameters() * 2 / 1e9
            if gb >= target_gb:
                return cfg
    return cfg


def evict(source: Path, mode: str) -> str:
    """Make the next step read `source` from disk. Dirty pages (the previous step's output) are written back
    first either way. "source": only the source's pages are dropped (fadvise DONTNEED), so the step reads
    the checkpoint from disk while programs and libraries stay cached, as cp's own binary does. "all": the
    whole page cache is dropped (root only), which also makes the converter load ~1 GB of torch libraries
    from disk. Returns what was done."""
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


def timed_child(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,12", help="checkpoint sizes in GB")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--workdir", default="/tmp/hc_bench")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--evict", choices=("source", "all"), default="source",
                    help="before each timed step, drop the source's cached pages or the whole page cache")
    args = ap.parse_args()
    work = Path(args.workdir)
    cli = [sys.executable, "-m", "hetero_convert.cli"]
    rows = []
    for gb in [float(x) for x in args.sizes.split(",")]:
        root = work / f"{gb:g}GB"
        shutil.rmtree(root, ignore_errors=True)
        cfg = config_for_gb(gb)
        plan = load_plan(cfg)
        largest = max(torch.tensor([], dtype=torch.bfloat16).element_size() * m.numel for m in bind(plan))
        largest_hf = max(2 * s[0] * (s[1] if len(s) > 1 else 1) for m in bind(plan) for s in m.hf_shapes)
        src = write_random_checkpoint(cfg, root / "hf", fast=True, max_shard_bytes=5 * 10**9 // 2)
        size = dir_bytes(src)
        evicted = evict(src, args.evict)
        cp_s, _ = timed_child(["cp", "-r", str(src), str(root / "cp")])
        shutil.rmtree(root / "cp")
        for direction in ("hf-to-megatron", "megatron-to-hf"):
            for w in [int(x) for x in args.workers.split(",")]:
                out = root / f"out-{direction}-{w}"
                if direction == "hf-to-megatron":
                    cmd = cli + [direction, str(src), str(out), "--workers", str(w), "--json"]
                else:
                    meg = root / "out-hf-to-megatron-1"
                    cmd = cli + [direction, str(meg), str(out), "--workers", str(w), "--json"]
                evict(src if direction == "hf-to-megatron" else root / "out-hf-to-megatron-1", args.evict)
                secs, rss = timed_child(cmd)
                bound = 512 * 2**20 + 2 * max(largest, largest_hf)
                rows.append({
                    "size_GB": round(size / 1e9, 2), "direction": direction, "workers": w,
                    "seconds": round(secs, 2), "cp_seconds": round(cp_s, 2), "ratio": round(secs / cp_s, 2),
                    "peak_rss_MiB": round(rss / 2**20), "bound_MiB": round(bound / 2**20),
                    "within_bound": rss <= bound, "largest_tensor_MiB": round(max(largest, largest_hf) / 2**20),
                    "evicted": evicted,
                })
                print(json.dumps(rows[-1]), flush=True)
                if direction == "megatron-to-hf" or w != 1:
                    shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print()
    head = ["size_GB", "direction", "workers", "seconds", "cp_seconds", "ratio", "peak_rss_MiB", "bound_MiB",
            "within_bound", "largest_tensor_MiB", "evicted"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(r[h]) for h in head) + " |")
    print(f"\nmachine: {os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB;"
          f" python {sys.version.split()[0]}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    _ = resource  # ru_maxrss of children is read through os.wait4 above


if __name__ == "__main__":
    main()
