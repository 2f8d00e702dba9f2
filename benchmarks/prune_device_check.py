"""prune --device cuda against prune --device cpu, on the same parent and calibration (run on the GPU machine).

The parent is a random Llama (hidden 512, 8 layers, GQA 8/4, FFN 2048, fp32) whose embeddings and
projections are scaled so that its output distribution is far from uniform and the KL scores differ between
variants, with a byte-level BPE tokenizer trained on the calibration text (Python's pydoc topics). Both
devices score every variant of every layer; the script prints, per layer, the largest KL difference between
the two, whether the two searches chose the same plan, and the logits of the two exported models on held-out
text. The scores are fp32 on both sides, so they should agree to float rounding (reduction order differs).

    python benchmarks/prune_device_check.py --work /tmp/prune_check [--target-params 0.6]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

PARENT = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 512,
    "intermediate_size": 2048, "num_attention_heads": 8, "num_key_value_heads": 4, "num_hidden_layers": 8,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 1024, "vocab_size": 2000,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}


def texts() -> tuple[str, str]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return "\n\n".join(topics[k] for k in keys[::2]), "\n\n".join(topics[k] for k in keys[1::2][:20])


def make_parent(d: Path, calib: str) -> None:
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hetero_convert.fixtures import write_random_checkpoint

    write_random_checkpoint(PARENT, d, dtype=torch.float32, seed=7)
    path = d / "model.safetensors"
    state = load_file(path)
    for k in state:  # far from uniform outputs, attention far from uniform: scores that separate variants
        if k.endswith(("embed_tokens.weight", "lm_head.weight")):
            state[k] *= 25.0
        elif k.endswith("proj.weight"):
            state[k] *= 4.0
    save_file(state, str(path), metadata={"format": "pt"})
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=PARENT["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([calib], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>") \
        .save_pretrained(d)


def run_prune(parent: Path, out: Path, calib: Path, device: str, target: float) -> float:
    cmd = [sys.executable, "-m", "hetero_convert.cli", "prune", str(parent), str(out), "--calib", str(calib),
           "--target-params", str(target), "--device", device, "--calib-tokens", "8192", "--score-tokens", "4096",
           "--seq-len", "256", "--json", "--overwrite"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"prune --device {device} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/prune_check")
    ap.add_argument("--target-params", type=float, default=0.6)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--devices", default="cpu,cuda", help="the two devices to compare (cpu,cpu: a dry run)")
    args = ap.parse_args()
    devices = args.devices.split(",")
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check compares the cuda scoring path with the cpu one")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib_text, held_out = texts()
    (work / "calib.txt").write_text(calib_text)
    make_parent(work / "parent", calib_text)
    runs = {f"{k}-{dev}": dev for k, dev in enumerate(devices)}
    seconds = {run: run_prune(work / "parent", work / f"out_{run}", work / "calib.txt", dev, args.target_params)
               for run, dev in runs.items()}
    a, b = runs
    scores = {run: json.loads((work / f"out_{run}" / "prune_scores.json").read_text()) for run in runs}
    rows, worst = [], 0.0
    for lc, lg in zip(scores[a]["layers"], scores[b]["layers"]):
        assert [v["name"] for v in lc["variants"]] == [v["name"] for v in lg["variants"]], lc["index"]
        # relative to the KL itself, or to 1e-4 for variants that hardly change the output (rounding noise)
        diffs = [abs(x["kl"] - y["kl"]) / max(abs(x["kl"]), 1e-4) for x, y in zip(lc["variants"], lg["variants"])]
        kls = [v["kl"] for v in lc["variants"]]
        rows.append({"layer": lc["index"], "variants": len(diffs), "kl_range_cpu": [min(kls), max(kls)],
                     "max_rel_kl_diff": max(diffs)})
        worst = max(worst, max(diffs))
    cfg = {run: json.loads((work / f"out_{run}" / "config.json").read_text()) for run in runs}
    same_plan = cfg[a]["block_configs"] == cfg[b]["block_configs"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "parent")
    ids = tok(held_out, return_tensors="pt").input_ids[:, :512]
    logits = {}
    for run in runs:
        m = AutoModelForCausalLM.from_pretrained(work / f"out_{run}", trust_remote_code=True,
                                                 torch_dtype=torch.float32).eval()
        with torch.no_grad():
            logits[run] = m(ids).logits[0]
    rel = ((logits[a] - logits[b]).abs().max() / logits[a].abs().max()).item()
    top1 = (logits[a].argmax(-1) == logits[b].argmax(-1)).float().mean().item()

    print(f"| layer | variants | KL range ({a}) | max rel KL diff {a} vs {b} |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['variants']} | {r['kl_range_cpu'][0]:.3g} .. {r['kl_range_cpu'][1]:.3g} | "
              f"{r['max_rel_kl_diff']:.2e} |")
    print()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print("prune seconds: " + ", ".join(f"{r} {t:.1f}" for r, t in seconds.items()) + f" ({gpu}, torch {torch.__version__})")
    print(f"same plan chosen: {same_plan}; exported models on {ids.shape[1]} held-out tokens: "
          f"max rel logit diff {rel:.2e}, top-1 agreement {top1:.4f}")
    result = {"layers": rows, "worst_rel_kl_diff": worst, "same_plan": same_plan, "logit_rel_diff": rel,
              "top1_agreement": top1, "seconds": seconds, "device": gpu,
              "torch": torch.__version__, "target_params": args.target_params}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    ok = same_plan and worst < 1e-3 and rel < 1e-3
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
