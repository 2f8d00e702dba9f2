"""Wall time of `prune` at its defaults on one GPU: a SmolLM2-135M-shaped parent and an 8B Llama-layout parent.

    python3 benchmarks/prune_timing.py [--device cuda] [--models smollm2,llama8b] [--work /tmp/prune_timing]
                                       [--json OUT.json]

Time depends on the shapes, not on the weight values, so both parents are synthetic: random bf16 weights
(normal, std 0.02; norms 1) written as one safetensors shard per layer, and a byte-level BPE tokenizer (8192
tokens) trained on the calibration mix, so the real tokenisation of the default calibration text is part of the
measurement. Each parent is pruned exactly as the CLI does it with only --target-params 0.8 (the defaults:
16384 calibration tokens, 768 held back for scoring, the default calibration mix, bf16 scoring forwards on a
GPU), then pruned again at 0.6 with --reuse-scores. The parent is streamed: each layer is read from the
checkpoint once per sweep; only embeddings, final norm and head stay resident.

Prints a table (and writes JSON): seconds of each stage, the whole call, peak GPU memory, and the size of the
fit store.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hetero_convert.plan import load_plan
from hetero_convert.pruning import PruneOptions, prune
from hetero_convert.pruning.calibration import default_texts
from hetero_convert.pruning.fits import FITS_DIR
from hetero_convert.pruning.progress import LineProgress

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192, "vocab_size": 128256,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}


def smollm2_config() -> dict:
    cfg = json.loads((ROOT / "benchmarks/prune_configs/parent.json").read_text())
    return cfg | {"torch_dtype": "bfloat16"}


@torch.no_grad()
def write_parent(config: dict, out: Path, device: str) -> float:
    """Random bf16 weights of `config`'s shapes, one shard per layer (made on the device: fast)."""
    from safetensors.torch import save_file

    from hetero_convert.mappings import bind

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    plan = load_plan(config)
    gen = torch.Generator(device=device).manual_seed(0)
    shards: dict[str, dict] = {}
    for m in bind(plan):
        for key, shape in zip(m.hf, m.hf_shapes):
            part = key.split(".")[2] if key.startswith("model.layers.") else "globals"
            shards.setdefault(part, {})[key] = shape
    names = {part: f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k, part in enumerate(shards)}
    weight_map = {}
    for part, keys in shards.items():
        tensors = {}
        for key, shape in keys.items():
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            tensors[key] = t.cpu()
            weight_map[key] = names[part]
        save_file(tensors, str(out / names[part]), metadata={"format": "pt"})
    total = sum((out / n).stat().st_size for n in names.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return time.time() - t0


def write_tokenizer(out: Path, texts: dict[str, str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts.values()), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>") \
        .save_pretrained(out)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_model(name: str, config: dict, work: Path, device: str, texts: dict) -> dict:
    src, out = work / f"{name}-parent", work / f"{name}-pruned"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    write_s = write_parent(config, src, device)
    write_tokenizer(src, texts)
    print(f"[{name}] synthetic parent written in {write_s:.1f} s ({dir_bytes(src) / 1e9:.1f} GB)", flush=True)
    row = {"model": name, "parent_GB": round(dir_bytes(src) / 1e9, 2), "write_parent_s": round(write_s, 1)}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    report = prune(src, out, None, target="params", fraction=0.8, options=PruneOptions(device=device),
                   progress=LineProgress(min_interval=5.0))
    row["prune_s"] = round(time.time() - t0, 1)
    row["stages_s"] = report["seconds"]
    row["fits_GB"] = round(dir_bytes(out / FITS_DIR) / 1e9, 2)
    row["peak_gpu_GB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.startswith("cuda") else None
    row["kept_non_embedding"] = round(report["ratios"]["non_embedding_params"], 3)
    t0 = time.time()
    report = prune(src, out, None, target="params", fraction=0.6, options=PruneOptions(device=device),
                   reuse_scores=True, progress=LineProgress(min_interval=5.0))
    row["reuse_s"] = round(time.time() - t0, 1)
    row["reuse_stages_s"] = report["seconds"]
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    print(f"[{name}] {json.dumps(row)}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="smollm2,llama8b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/prune_timing"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    texts = default_texts()
    tiny = LLAMA_8B | {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 8192}  # a smoke test
    configs = {"smollm2": smollm2_config(), "llama8b": LLAMA_8B, "tiny": tiny}
    out = args.json or (Path(os.environ["OUT"]) / "prune_timing.json" if os.environ.get("OUT") else None)
    rows = []
    for m in args.models.split(","):
        rows.append(run_model(m, configs[m], args.work, args.device, texts))
        if out:  # after every model: a run cut short still leaves what it measured
            out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    env = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
           "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"\n{env}")
    print("| parent | size | prune --target-params 0.8 (s) | calibration / scoring / export (s) | "
          "--reuse-scores 0.6 (s) | peak GPU | fit store |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        s = r["stages_s"]
        print(f"| {r['model']} | {r['parent_GB']} GB | {r['prune_s']} | {s.get('calibration')} / {s.get('scoring')} / "
              f"{s.get('export')} | {r['reuse_s']} | {r['peak_gpu_GB']} GiB | {r['fits_GB']} GB |")
    if out:
        out.write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
