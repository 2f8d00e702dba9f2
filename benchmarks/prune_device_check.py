"""prune --device cuda against prune --device cpu, on the same parent and calibration (run on the GPU machine).

The parent is a random Llama (hidden 512, 8 layers, GQA 8/4, FFN 2048, fp32) whose embeddings are scaled
so that its output distribution is far from uniform and the KL scores differ between variants, with a
byte-level BPE tokenizer trained on the calibration text (Python's pydoc topics). Three runs score every
variant of every layer: CPU in fp32, the GPU in fp32, and the GPU in bf16 (its default). The script prints,
per layer, the largest KL difference of each GPU run from the CPU one, whether the searches chose the same
plan, and the logits of the exported models on held-out text. The fp32 pair runs the same computation, so it
must agree to float rounding (reduction order differs); that is the pass condition.

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

    write_random_checkpoint(PARENT, d, dtype=torch.float32, seed=7, max_shard_bytes=10**10)
    path = d / "model.safetensors"
    state = load_file(path)
    # Embeddings x10: output entropy ~2.1 nats of 7.6 (uniform), so KL separates the variants. Larger factors
    # make the random model chaotic (x25 embeddings with x4 projections: KL 13-38 nats per layer variant),
    # where float rounding alone moves scores by percents and no device comparison means anything.
    for k in state:
        if k.endswith(("embed_tokens.weight", "lm_head.weight")):
            state[k] *= 10.0
    save_file(state, str(path), metadata={"format": "pt"})
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=PARENT["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([calib], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>") \
        .save_pretrained(d)


def run_prune(parent: Path, out: Path, calib: Path, device: str, dtype: str, target: float) -> float:
    cmd = [sys.executable, "-m", "hetero_convert.cli", "prune", str(parent), str(out), "--calib", str(calib),
           "--target-params", str(target), "--device", device, "--compute-dtype", dtype, "--calib-tokens", "8192",
           "--score-tokens", "4096", "--seq-len", "256", "--json", "--overwrite"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"prune --device {device} --compute-dtype {dtype} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def compare(work: Path, a: str, b: str, ids: torch.Tensor) -> dict:
    """Per-layer KL differences of two runs' scores, whether they chose the same plan, and the logits of the
    two exported models."""
    from transformers import AutoModelForCausalLM

    scores = {r: json.loads((work / f"out_{r}" / "prune_scores.json").read_text()) for r in (a, b)}
    layers = []
    for la, lb in zip(scores[a]["layers"], scores[b]["layers"]):
        assert [v["name"] for v in la["variants"]] == [v["name"] for v in lb["variants"]], la["index"]
        # relative to the KL itself, or to 1e-4 for variants that hardly change the output (rounding noise)
        diffs = [abs(x["kl"] - y["kl"]) / max(abs(x["kl"]), 1e-4) for x, y in zip(la["variants"], lb["variants"])]
        kls = [v["kl"] for v in la["variants"]]
        layers.append({"layer": la["index"], "variants": len(diffs), "kl_min": min(kls), "kl_max": max(kls),
                       "max_rel_kl_diff": max(diffs)})
    cfg = {r: json.loads((work / f"out_{r}" / "config.json").read_text()) for r in (a, b)}
    logits = {}
    for r in (a, b):
        m = AutoModelForCausalLM.from_pretrained(work / f"out_{r}", trust_remote_code=True,
                                                 dtype=torch.float32).eval()
        with torch.no_grad():
            logits[r] = m(ids).logits[0]
    return {"pair": f"{a} vs {b}", "layers": layers, "worst_rel_kl_diff": max(x["max_rel_kl_diff"] for x in layers),
            "same_plan": cfg[a]["block_configs"] == cfg[b]["block_configs"],
            "logit_rel_diff": ((logits[a] - logits[b]).abs().max() / logits[a].abs().max()).item(),
            "top1_agreement": (logits[a].argmax(-1) == logits[b].argmax(-1)).float().mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/prune_check")
    ap.add_argument("--target-params", type=float, default=0.6)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--gpu", default="cuda", help="the device to compare with cpu (cpu: a dry run)")
    args = ap.parse_args()
    if args.gpu == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check compares the cuda scoring path with the cpu one")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib_text, held_out = texts()
    (work / "calib.txt").write_text(calib_text)
    make_parent(work / "parent", calib_text)
    runs = {"cpu-fp32": ("cpu", "fp32"), f"{args.gpu}-fp32": (args.gpu, "fp32"), f"{args.gpu}-bf16": (args.gpu, "bf16")}
    seconds = {r: run_prune(work / "parent", work / f"out_{r}", work / "calib.txt", dev, dt, args.target_params)
               for r, (dev, dt) in runs.items()}
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(work / "parent")(held_out, return_tensors="pt").input_ids[:, :512]
    exact = compare(work, "cpu-fp32", f"{args.gpu}-fp32", ids)
    bf16 = compare(work, "cpu-fp32", f"{args.gpu}-bf16", ids)

    print(f"| layer | variants | KL range (cpu-fp32) | max rel KL diff, {exact['pair']} | max rel KL diff, {bf16['pair']} |")
    print("|---|---|---|---|---|")
    for x, y in zip(exact["layers"], bf16["layers"]):
        print(f"| {x['layer']} | {x['variants']} | {x['kl_min']:.3g} .. {x['kl_max']:.3g} | {x['max_rel_kl_diff']:.2e} "
              f"| {y['max_rel_kl_diff']:.2e} |")
    print()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print("prune seconds: " + ", ".join(f"{r} {t:.1f}" for r, t in seconds.items()) + f" ({gpu}, torch {torch.__version__})")
    for c in (exact, bf16):
        print(f"{c['pair']}: same plan chosen: {c['same_plan']}; exported models on {ids.shape[1]} held-out tokens: "
              f"max rel logit diff {c['logit_rel_diff']:.2e}, top-1 agreement {c['top1_agreement']:.4f}")
    result = {"fp32": exact, "bf16": bf16, "seconds": seconds, "device": gpu, "torch": torch.__version__,
              "target_params": args.target_params}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    # The pass condition is on the fp32 pair only: same computation on two devices, so rounding-level
    # agreement. bf16 is reported: it is the GPU default for speed, and choosing the same plan is what matters.
    ok = exact["same_plan"] and exact["worst_rel_kl_diff"] < 1e-3 and exact["logit_rel_diff"] < 1e-3
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
