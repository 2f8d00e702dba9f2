"""hf-to-megatron from ModelOpt FP8 and NVFP4 checkpoints, next to the same model in bf16: seconds, bytes read
and written, and peak RSS against the memory bound (dequantization happens per chunk, in blocks).

For each size (the bf16 model's GB, Super-49B's layer pattern at a smaller hidden size, as benchmarks/convert.py
builds it), three sources of the same weights: bf16, ModelOpt FP8 (KV-cache scales included) and ModelOpt
NVFP4, written by hetero_convert.fixtures_modelopt in ModelOpt's layout. Each conversion runs in its own
process, its source evicted from the page cache first; peak RSS is the child's ru_maxrss. The bound is the
one benchmarks/convert.py checks: 512 MiB + 2 x the largest tensor (bf16, as the quantized ones are written).

    python benchmarks/quantized.py --sizes 1 --workers 1,2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hetero_convert.mappings import bind
from hetero_convert.plan import load_plan

_spec = importlib.util.spec_from_file_location("bench_convert", Path(__file__).with_name("convert.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1", help="bf16 checkpoint sizes in GB")
    ap.add_argument("--workers", default="1,2", help="--workers values")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/hc_bench_quant")
    ap.add_argument("--json-out", default=os.environ.get("OUT") and str(Path(os.environ["OUT"]) / "quantized.jsonl"))
    args = ap.parse_args()
    work = Path(args.workdir)
    cli = [sys.executable, "-m", "hetero_convert.cli"]
    sink = open(args.json_out, "a") if args.json_out else None
    rows = []
    for gb in [float(x) for x in args.sizes.split(",")]:
        root = work / f"{gb:g}GB"
        shutil.rmtree(root, ignore_errors=True)
        cfg = bench.config_for_gb(gb)
        plan = load_plan(cfg)
        largest = max(2 * m.numel for m in bind(plan, tp=args.tp))
        bound = 512 * 2**20 + 2 * largest
        sources = {}
        root.mkdir(parents=True)
        (root / "config.json").write_text(json.dumps(cfg))
        for name, call in (("bf16", "write_random_checkpoint(cfg, out, max_shard_bytes=2 * 10**9)"),
                           ("FP8", "write_modelopt_checkpoint(cfg, out, 'FP8', max_shard_bytes=2 * 10**9)"),
                           ("NVFP4", "write_modelopt_checkpoint(cfg, out, 'NVFP4', kv_cache=None, "
                                     "max_shard_bytes=2 * 10**9)")):
            # In a process of its own: a child forked from a large parent would report the parent's RSS as
            # its peak (Linux keeps the high-water mark across exec).
            t = time.perf_counter()
            code = (f"import json; from hetero_convert.fixtures import write_random_checkpoint; "
                    f"from hetero_convert.fixtures_modelopt import write_modelopt_checkpoint; "
                    f"cfg = json.load(open({str(root / 'config.json')!r})); out = {str(root / name)!r}; {call}")
            subprocess.run([sys.executable, "-c", code], check=True)
            sources[name] = root / name
            print(f"# {name}: {bench.dir_bytes(sources[name]) / 1e9:.2f} GB written in {time.perf_counter() - t:.0f}s "
                  f"(hidden {plan.hidden_size}, {plan.num_layers} layers)", flush=True)
        for name, src in sources.items():
            # The reader alone, page cache warm, one thread: what dequantizing costs per byte produced.
            code = (f"import time, torch; torch.set_num_threads(1); from hetero_convert.io.quantized import "
                    f"open_checkpoint; c = open_checkpoint({str(src)!r}); t = time.perf_counter(); "
                    f"n = sum(c.read(k).numel() * 2 for k in c.tensors); print(n / (time.perf_counter() - t) / 1e9)")
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)  # warm the page cache
            gbs = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                       text=True).stdout)
            row = {"size_GB": gb, "source": name, "step": "read (warm cache, 1 thread)", "GB_per_s": round(gbs, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if sink:
                sink.write(json.dumps(row) + "\n")
        for workers in [int(w) for w in args.workers.split(",")]:
            for name, src in sources.items():
                out = root / f"meg-{name}"
                shutil.rmtree(out, ignore_errors=True)
                bench.evict(src, "source")
                secs, rss = bench.timed_child(cli + ["hf-to-megatron", str(src), str(out), "--tp", str(args.tp),
                                                     "--workers", str(workers), "--json"])
                row = {"size_GB": gb, "source": name, "workers": workers, "tp": args.tp,
                       "read_GB": round(bench.dir_bytes(src) / 1e9, 3), "written_GB": round(bench.dir_bytes(out) / 1e9, 3),
                       "seconds": round(secs, 2), "written_GB_per_s": round(bench.dir_bytes(out) / 1e9 / secs, 3),
                       "peak_rss_MiB": round(rss / 2**20), "bound_MiB": round(bound / 2**20),
                       "within_bound": rss <= bound}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if sink:
                    sink.write(json.dumps(row) + "\n")
                shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'size':>5} {'source':>6} {'workers':>7} {'read GB':>8} {'written GB':>10} {'s':>7} {'GB/s out':>8} "
          f"{'RSS MiB':>8} {'bound':>6}")
    for r in rows:
        if "step" in r:
            continue
        print(f"{r['size_GB']:>5g} {r['source']:>6} {r['workers']:>7} {r['read_GB']:>8.2f} {r['written_GB']:>10.2f} "
              f"{r['seconds']:>7.1f} {r['written_GB_per_s']:>8.2f} {r['peak_rss_MiB']:>8} {r['bound_MiB']:>6}")

    for r in rows:
        if "step" in r:
            print(f"{r['size_GB']:>5g} {r['source']:>6} reader alone ({r['step']}): {r['GB_per_s']:.2f} GB/s of "
                  f"dequantized tensors")


if __name__ == "__main__":
    main()
