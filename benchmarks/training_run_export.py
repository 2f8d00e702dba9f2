"""megatron-to-hf of a training run's checkpoint with its distributed optimizer's state, against the same model
saved without it: the optimizer's bytes (most of the folder) are never read, so both exports cost the same.

Two checkpoints of one Llama (stacked layers, as a Megatron-LM Llama run saves them) are made by
tests/run_like_checkpoint.py under torchrun (2 processes, DP=2, gloo): one as a run saves it (model,
DistributedOptimizer state after a real Adam step, RNG, scheduler and rerun state; with megatron's
integrity.json where the installed megatron-core writes one), one with the model alone (--no-save-optim
--no-save-rng). Each export runs in its own process after the checkpoint's pages were dropped from the page cache
(and dirty pages written back); "read" is what the conversion itself read (the process's rchar around the call,
imports excluded). With a manifest, the run's export is timed again verifying it (that reads every file).

    python benchmarks/training_run_export.py --hidden 1024 --layers 8 [--repeats 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from convert import evict  # noqa: E402

from hetero_convert.launch import PACKAGE_ROOT, run_under_torchrun  # noqa: E402
from hetero_convert.megatron.compat import installed_version  # noqa: E402

EXPORT = """
import json, sys, time
from hetero_convert.convert import megatron_to_hf
def rchar():
    return int(next(l for l in open("/proc/self/io") if l.startswith("rchar:")).split()[1])
before, t = rchar(), time.perf_counter()
s = megatron_to_hf(sys.argv[1], sys.argv[2], verify_integrity=sys.argv[3] == "1", overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t, "read": rchar() - before, "written": s.bytes_written,
                  "verified": s.layout.get("integrity_verified_files", 0)}))
"""


def llama(hidden: int, layers: int, vocab: int) -> dict:
    heads = hidden // 64
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": hidden, "intermediate_size": (hidden * 11 // 4) // 256 * 256,
            "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 4), "num_hidden_layers": layers,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192, "vocab_size": vocab,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def folder_bytes(p: Path) -> tuple[int, int]:
    """(all bytes of the iteration folder, the bytes of the model's own entries)."""
    from hetero_convert.io.dcp import DCPReader
    from hetero_convert.io.megatron_checkpoint import NON_MODEL_PREFIXES

    md = DCPReader(p).metadata
    model = sum(i.length for k, i in md.storage_data.items() if not k.fqn.startswith(NON_MODEL_PREFIXES))
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file()), model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=2, help="exports per row (the fastest is reported)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="run-export-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(llama(args.hidden, args.layers, args.vocab)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": "1"}
    rows = []
    for name, extra in (("model only", ["--model-only"]), ("run (optimizer, RNG, ...)", ["--integrity"])):
        root = work / name.split()[0]
        shutil.rmtree(root, ignore_errors=True)
        run_under_torchrun([root, work / "config.json", "--kind", "llama", "--tp", 1, *extra], nproc=2, timeout=3600,
                           log_file=work / f"{root.name}.log", module="run_like_checkpoint",
                           extra_path=[str(REPO / "tests")])
        it = root / "iter_0000100"
        total, model = folder_bytes(it)
        checks = [False, True] if (it / "integrity.json").is_file() else [False]
        for verify in checks:
            best = None
            for _ in range(args.repeats):
                how = evict(it, "source")
                out = subprocess.run([sys.executable, "-c", EXPORT, str(root), str(work / "hf"), "1" if verify else "0"],
                                     capture_output=True, text=True, env=env, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                best = r if best is None or r["seconds"] < best["seconds"] else best
            rows.append({"checkpoint": name + (", integrity verified" if verify else ""),
                         "folder_MB": round(total / 1e6, 1), "model_MB": round(model / 1e6, 1),
                         "read_MB": round(best["read"] / 1e6, 1), "written_MB": round(best["written"] / 1e6, 1),
                         "seconds": round(best["seconds"], 2), "evicted": how})
    v = ".".join(map(str, installed_version() or ()))
    print(f"megatron-core {v}, Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {work}")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
