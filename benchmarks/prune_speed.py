"""Prefill and decode throughput of a parent and its pruned models, with our HF DeciLM model, on a GPU.

    python benchmarks/prune_speed.py PARENT_DIR PRUNED_DIR [PRUNED_DIR ...] \
        [--batch 1] [--prompt 2048] [--decode 256] [--dtype bf16] [--device cuda] [--json OUT.json]

Every model, the parent included, runs through `hetero_convert.hf.DeciLMForCausalLM` (a Llama parent is
loaded as a homogeneous DeciLM; the tensor names are the same), with SDPA attention, so the numbers compare
layer shapes and not two implementations.

prefill: one forward over [batch, prompt] random tokens without a cache; tokens/s = batch x prompt / time.
decode:  after a prefill that fills the cache, `--decode` single-token steps (greedy, fed back); tokens/s =
         batch x steps / time of the steps alone.
Each measurement is the median of `--repeats` runs after one warm-up; CUDA is synchronised around each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def load(path: Path, dtype: torch.dtype, device: str):
    from hetero_convert.hf import DeciLMConfig, DeciLMForCausalLM
    from hetero_convert.pruning.parent import source_config
    from hetero_convert.plan import load_plan

    plan = load_plan(source_config(path))
    config = DeciLMConfig(**plan.hf_config())
    model = DeciLMForCausalLM.from_pretrained(path, config=config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), plan


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    sync(device)
    return time.perf_counter() - t


@torch.no_grad()
def decode_seconds(model, ids: torch.Tensor, steps: int, device: str) -> float:
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):  # the cache object is updated in place by every attention layer
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    sync(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="parent first, then pruned checkpoints")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    from hetero_convert.pruning.search import model_cost

    rows = []
    for path in args.models:
        model, plan = load(path, dtype, args.device)
        ids = torch.randint(0, plan.vocab_size, (args.batch, args.prompt), device=args.device,
                            generator=torch.Generator(device=args.device).manual_seed(0))
        prefill_seconds(model, ids, args.device)  # warm-up (kernels, allocator)
        decode_seconds(model, ids[:, :64], 4, args.device)
        pre = statistics.median(prefill_seconds(model, ids, args.device) for _ in range(args.repeats))
        dec = statistics.median(decode_seconds(model, ids, args.decode, args.device) for _ in range(args.repeats))
        rows.append({
            "model": str(path), "params": plan.num_parameters(),
            "non_embedding_params": plan.num_parameters(include_embeddings=False),
            "kv_bytes_per_token": model_cost(plan, "kv_cache"),
            "prefill_tok_s": args.batch * args.prompt / pre, "decode_tok_s": args.batch * args.decode / dec,
        })
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    base = rows[0]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"{device_name}, {args.dtype}, batch {args.batch}, prompt {args.prompt}, decode {args.decode} steps")
    print("| model | non-emb params | KV B/token | prefill tok/s | decode tok/s | prefill x | decode x |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {Path(r['model']).name} | {r['non_embedding_params'] / 1e6:.1f}M | {r['kv_bytes_per_token']:,} | "
              f"{r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.0f} | {r['prefill_tok_s'] / base['prefill_tok_s']:.2f} | "
              f"{r['decode_tok_s'] / base['decode_tok_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
