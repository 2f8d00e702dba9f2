"""`verify` at real size: the calibrated rule on Ultra-kind and 51B-kind models, injected bugs, an ~8B model.

    python benchmarks/verify_at_size.py --device cuda --out $OUT          # the device run (device_verify.sh)
    python benchmarks/verify_at_size.py --device cpu --hidden 1024 --no-big  # the CPU numbers of docs/parity.md

What it does, in one process (megatron-core runs in torchrun jobs it starts, one per dtype and layout):
1. Synthetic bf16 checkpoints with Ultra-253B's layer kinds (dummy layers, attention-free layers, FFN-fusion
   widths of ffn_mult 39 and 36.5625, llama3 factor 16) and Nemotron-51B's (linear-replacement attention and
   FFN, no-op attention, 8/4/2/1 KV heads, factor 8), 24 layers, 16 heads, vocab 32000, at each --hidden;
   each converted once with hf-to-megatron (loaded at every layout: DCP reshards on load).
2. Four injected bugs per hidden size, each converted into its own Megatron checkpoint and judged (at TP=PP=1,
   in --bug-dtypes) against the correct HF model: gate/up swapped (Ultra-kind layer 9), K/V swapped (51B-kind layer 13, 4 KV heads),
   linear-replacement attention transposed (51B-kind layer 11), llama3 factor 16 -> 8 in the Megatron
   description (Ultra-kind; its first attention layer is 0).
3. The HF side layer-streamed (hetero_convert/reference.py) in fp64 + every dtype in one pass per model; the
   Megatron side at every layout the GPU count allows (1x1; 2x1 and 1x2 with 2 GPUs).
4. With --big: an ~8B model with Super-49B's 80-layer layout at hidden 3072, its HF side streamed in a
   subprocess whose peak GPU and host memory are measured, next to the same figures for the whole model
   loaded by from_pretrained in fp32 (what verify did before), also in a subprocess.
Prints the tables; with --out (default $OUT) writes OUT/verify_at_size.json (every row, with per-layer distances)
and OUT/verify_at_size.md after every stage. A stage starts only if its estimated time still ends within --limit
seconds (560: the device allows 10 minutes a command); what is skipped is listed.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hetero_convert.convert import hf_to_megatron  # noqa: E402
from hetero_convert.io.megatron_checkpoint import iteration_dir, read_plan as read_plan_from_megatron  # noqa: E402
from hetero_convert.fixtures import write_random_checkpoint  # noqa: E402
from hetero_convert.io.hf_reader import HFCheckpoint  # noqa: E402
from hetero_convert.plan import load_plan  # noqa: E402
from hetero_convert.reference import reference_forward  # noqa: E402
from hetero_convert.parity import make_inputs, megatron_forward, report_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUPER = ROOT / "fixtures" / "released" / "Llama-3_3-Nemotron-Super-49B-v1.json"
T0 = time.time()


def blk(group=None, mult=None, attn="gqa", ffn="swiglu") -> dict:
    return {"attention": {"n_heads_in_group": group if attn == "gqa" else None, "no_op": attn == "none",
                          "replace_with_linear": attn == "linear"},
            "ffn": {"ffn_mult": mult if ffn == "swiglu" else None, "no_op": ffn == "none",
                    "replace_with_linear": ffn == "linear"}}


DUMMY = blk(attn="none", ffn="none")
# Ultra-253B's kinds: half the layers dummy, attention-free layers with a plain or a very wide (FFN-fusion) MLP,
# 8 KV heads everywhere (16 heads / group 2).
ULTRA = [blk(2, 2.4375), DUMMY, blk(2, 4.875), DUMMY, blk(attn="none", mult=39.0), DUMMY, blk(2, 2.4375), DUMMY,
         blk(2, 4.875), blk(2, 2.4375), DUMMY, blk(attn="none", mult=36.5625), DUMMY, blk(2, 1.95), DUMMY,
         blk(2, 4.875), blk(attn="none", mult=2.4375), DUMMY, blk(2, 2.4375), DUMMY, blk(2, 4.875), DUMMY,
         blk(2, 0.975), blk(2, 2.4375)]
# Nemotron-51B's kinds: linear-replacement and removed attention, 8/4/2/1 KV heads (groups 2/4/8/16 of 16
# heads), a linear-replacement FFN, FFN widths from ffn_mult 0.5 to 5.25.
B51 = [blk(2, 2.625), blk(4, 5.25), blk(attn="linear", mult=2.625), blk(8, 5.25), blk(attn="none", mult=1.3125),
       blk(attn="linear", mult=3.28125), blk(16, 5.25), blk(2, ffn="linear"), blk(4, 2.625),
       blk(attn="linear", mult=5.25), blk(attn="none", mult=2.625), blk(attn="linear", mult=3.28125),
       blk(2, 5.25), blk(4, 2.625), blk(8, 1.3125), blk(attn="linear", mult=5.25), blk(attn="none", mult=0.5),
       blk(2, 5.25), blk(16, 2.625), blk(attn="linear", mult=2.625), blk(4, 5.25), blk(attn="none", mult=1.3125),
       blk(2, 3.28125), blk(2, 5.25)]
KINDS = {"ultra": (ULTRA, 16.0), "51b": (B51, 8.0)}
# (kind, what, layer it is in). The rope bug shows first in the first attention layer.
BUGS = [("ultra", "gate/up swapped", 9), ("51b", "K/V swapped", 13), ("51b", "linear attention transposed", 11),
        ("ultra", "rope factor 16 -> 8", 0)]


def model_config(hidden: int, heads: int, blocks: list, rope_factor: float, vocab: int = 32000) -> dict:
    return {
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "hidden_act": "silu",
        "hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": len(blocks),
        "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "rope_scaling": {"factor": rope_factor, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "block_configs": blocks,
    }


def super8b_config(hidden: int = 3072) -> dict:
    """Super-49B's released 80-layer layout, head_dim 128 and 8 KV heads as in Super, vocab 128256. At hidden
    3072 (24 heads): ~7.7B parameters. A smaller hidden only serves to smoke-test this script."""
    heads = hidden // 128
    blocks = json.loads(SUPER.read_text())["block_configs"]
    for b in blocks:
        if b["attention"]["n_heads_in_group"] is not None:
            b["attention"]["n_heads_in_group"] = heads // min(8, heads)
    return model_config(hidden, heads, blocks, 8.0, vocab=128256)


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# ---- checkpoints --------------------------------------------------------------------------------------------


def write_model(cfg: dict, out: Path, rng_device: str) -> Path:
    if not (out / "config.json").is_file():
        write_random_checkpoint(cfg, out, seed=1, dtype=torch.bfloat16, max_shard_bytes=256 << 20, device=rng_device)
    return out


def convert(src: Path, dst: Path) -> Path:
    if not (dst / "latest_checkpointed_iteration.txt").is_file():
        hf_to_megatron(src, dst, tp=1, pp=1, workers=min(8, os.cpu_count() or 1), overwrite=True, checksums=False)
    return dst


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of src whose shards holding the edited tensors are rewritten; the other shards are hard links."""
    from safetensors.torch import load_file, save_file

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    where = {k: t.file.name for k, t in HFCheckpoint(src).tensors.items()}
    targets = set(edit.keys)
    for shard in sorted(set(where.values())):
        names = [k for k, s in where.items() if s == shard]
        if not targets & set(names):
            os.link(src / shard, dst / shard)
            continue
        tensors = load_file(src / shard)
        edit(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, dst / shard, metadata={"format": "pt"})
    return dst


class Swap:
    def __init__(self, a: str, b: str):
        self.keys = (a, b)

    def __call__(self, t):
        a, b = self.keys
        t[a], t[b] = t[b].clone(), t[a].clone()


class Transpose:
    def __init__(self, key: str):
        self.keys = (key,)

    def __call__(self, t):
        t[self.keys[0]] = t[self.keys[0]].t().contiguous()


def make_bug(what: str, layer: int, hf: Path, meg: Path, work: Path) -> Path:
    """A Megatron checkpoint carrying the bug (HF stays correct: it is what verify compares against)."""
    p = f"model.layers.{layer}."
    if what == "rope factor 16 -> 8":
        out = work / "meg"
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(meg, out, copy_function=os.link)  # the same weights: hard links
        desc = iteration_dir(out) / "hetero_convert.json"
        d = json.loads(desc.read_text())
        assert d["plan"]["rope_scaling"]["factor"] == 16.0
        d["plan"]["rope_scaling"]["factor"] = 8.0
        desc.unlink()  # a new file, not a write through the link into the correct checkpoint
        desc.write_text(json.dumps(d))
        return out
    edit = {"gate/up swapped": Swap(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
            "K/V swapped": Swap(p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"),
            "linear attention transposed": Transpose(p + "self_attn.linear_attn.weight")}[what]
    bad = edited_copy(hf, work / "hf", edit)
    return convert(bad, work / "meg")


# ---- memory of the HF side: run in a subprocess so that its peak is its own ------------------------------------


def measure(mode: str, hf: Path, inputs: Path, save: Path, device: str) -> None:
    data = torch.load(inputs)
    t = time.time()
    if device == "cuda":
        torch.cuda.init()
        base = torch.cuda.memory_allocated()
    if mode == "streamed":
        out = reference_forward(hf, data["input_ids"], data["attention_mask"], ("fp64", "fp32", "bf16"), device)
        torch.save({d: {"logits": o.logits, "hidden": o.hidden} for d, o in out.items()}, save)
    else:  # what verify did before: the whole model from from_pretrained, moved to the device
        from transformers import AutoModelForCausalLM

        import hetero_convert.hf  # noqa: F401

        model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32, attn_implementation="sdpa",
                                                     trust_remote_code=False)
        model = model.to(device).eval()
        with torch.no_grad():
            logits = model(input_ids=data["input_ids"].to(device), attention_mask=data["attention_mask"].to(device),
                           use_cache=False).logits.float().cpu()
        torch.save({"fp32": {"logits": logits}}, save)
    res = {"mode": mode, "seconds": round(time.time() - t, 1),
           "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "peak_gpu_gib": (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else None}
    print("MEASURE " + json.dumps(res), flush=True)


def run_measure(mode: str, hf: Path, inputs: Path, save: Path, device: str) -> dict:
    cmd = [sys.executable, __file__, "--measure", mode, "--hf", str(hf), "--inputs", str(inputs), "--save", str(save),
           "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)))
    line = next((l for l in proc.stdout.splitlines() if l.startswith("MEASURE ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{mode} measurement failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("MEASURE "):])


# ---- rows and tables ----------------------------------------------------------------------------------------


def row_of(r, case: dict, tp: int, pp: int, seconds: float) -> dict:
    m, th = r.metrics, r.thresholds
    return {**case, "dtype": r.dtype, "tp": tp, "pp": pp, "positions": r.positions, "ok": r.ok,
            "first_bad_layer": r.first_bad_layer, "hf_rel": m["hf_fp64_max_rel_diff"],
            "meg_rel": m["megatron_fp64_max_rel_diff"], "bound_rel": th["max_rel_diff"],
            "hf_kl": m["hf_fp64_kl_mean"], "meg_kl": m["megatron_fp64_kl_mean"], "bound_kl": th["max_mean_kl"],
            "meg_top1_decisive": m["megatron_fp64_top1_decisive"], "decisive_fraction": m["decisive_fraction"],
            "direct_rel": m["direct_max_rel_diff"], "max_layer_ratio": m["max_layer_ratio"],
            "layers": [[l.layer, l.hf_rel, l.megatron_rel] for l in r.layers], "failures": r.failures,
            "megatron_seconds": round(seconds, 1)}


def verdict(row: dict) -> str:
    if row["bug"] is None:
        return "pass (correct)" if row["ok"] else "FALSE FAILURE"
    if row["ok"]:
        return "missed"
    return "caught, right layer" if row["first_bad_layer"] == row["bug_layer"] else \
        f"caught, WRONG layer {row['first_bad_layer']}"


def table(rows: list[dict]) -> str:
    """One row per (model, dtype, layout, bug). "rel": max |X - fp64| / max |fp64 logit|; "KL": mean KL(fp64 || X);
    "direct": max |HF-X - Megatron-X| / max |logit| (what the fixed 1e-5 fp32 rule used to bound)."""
    head = ["model", "hidden", "dtype", "TP", "PP", "bug", "HF-X rel", "Meg-X rel", "bound", "HF-X KL", "Meg-X KL",
            "KL bound", "direct", "worst layer ratio", "first bad layer", "verdict"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["kind"], r["hidden"], r["dtype"], r["tp"], r["pp"], r["bug"] or "-", f"{r['hf_rel']:.3g}",
                 f"{r['meg_rel']:.3g}", f"{r['bound_rel']:.3g}", f"{r['hf_kl']:.3g}", f"{r['meg_kl']:.3g}",
                 f"{r['bound_kl']:.3g}", f"{r['direct_rel']:.3g}", f"{r['max_layer_ratio']:.3g}",
                 "-" if r["first_bad_layer"] is None else r["first_bad_layer"], verdict(r)]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


# ---- the run ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", default="1024,2048", help="hidden sizes of the Ultra-/51B-kind models ('' for none)")
    ap.add_argument("--kinds", default="ultra,51b")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--layouts", default="auto", help="TPxPP list, or auto: 1x1, plus 2x1,1x2 with 2 devices")
    ap.add_argument("--bug-dtypes", default="fp32", help="dtypes the bugs are judged in (at TP=PP=1)")
    ap.add_argument("--no-bugs", action="store_true")
    ap.add_argument("--big", dest="big", action="store_true", default=None, help="the ~8B model (default on GPU)")
    ap.add_argument("--no-big", dest="big", action="store_false")
    ap.add_argument("--big-dtypes", default="fp32")
    ap.add_argument("--big-hidden", type=int, default=3072, help=argparse.SUPPRESS)  # smaller: a smoke test
    ap.add_argument("--no-whole", action="store_true", help="--big: skip the whole-model memory figure")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--limit", type=float, default=560.0,
                    help="seconds by which the run must be done: a stage starts only if its estimate fits")
    ap.add_argument("--work", default="/tmp/verify_at_size")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--measure", choices=["streamed", "whole"], help=argparse.SUPPRESS)
    ap.add_argument("--hf", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        return measure(args.measure, Path(args.hf), Path(args.inputs), Path(args.save), args.device)

    import transformers

    gpu = args.device == "cuda"
    n_dev = torch.cuda.device_count() if gpu else 2
    layouts = ([(1, 1)] + ([(2, 1), (1, 2)] if n_dev >= 2 else [])) if args.layouts == "auto" else \
        [tuple(int(x) for x in l.split("x")) for l in args.layouts.split(",")]
    big = gpu if args.big is None else args.big
    dtypes = args.dtypes.split(",")
    bug_dtypes = [] if args.no_bugs else args.bug_dtypes.split(",")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    mcore = __import__("megatron.core", fromlist=["__version__"]).__version__
    env = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "devices": n_dev, "torch": torch.__version__,
           "transformers": transformers.__version__, "megatron_core": mcore, "date": time.strftime("%Y-%m-%d"),
           "cpus": os.cpu_count(), "commit": git_commit()}
    log(f"env {json.dumps(env)}; layouts {layouts}")
    rng = "cuda" if gpu else "cpu"
    result = {"env": env, "layouts": layouts, "rows": [], "skipped": []}
    save = Results(Path(args.out) if args.out else None, result)

    # 1-2. checkpoints, conversions, bugs
    cases = []  # dicts: kind, hidden, params, bug, bug_layer, hf (the correct HF model), meg
    for hidden in [int(h) for h in args.hidden.split(",") if h]:
        for kind in args.kinds.split(","):
            blocks, factor = KINDS[kind]
            hf = write_model(model_config(hidden, 16, blocks, factor), work / f"{kind}-{hidden}-hf", rng)
            meg = convert(hf, work / f"{kind}-{hidden}-meg")
            plan = load_plan(hf)
            good = {"kind": kind, "hidden": hidden, "params": plan.num_parameters(), "bug": None,
                    "bug_layer": None, "hf": hf, "meg": meg}
            cases.append(good)
            log(f"{kind} hidden {hidden}: {plan.num_parameters() / 1e9:.2f}B parameters, converted")
            for bkind, what, layer in (BUGS if bug_dtypes else []):
                if bkind == kind:
                    bad = make_bug(what, layer, hf, meg, work / f"{kind}-{hidden}-bug{layer}")
                    cases.append({**good, "bug": what, "bug_layer": layer, "meg": bad})
                    log(f"  bug '{what}' in layer {layer}: converted")

    # 3. the inputs, and the HF side (fp64 + every dtype, one streamed pass per model)
    ids, mask, source = make_inputs(None, 32000, None, args.batch, args.seq_len, 0)
    result["inputs"] = source
    refs = {}
    for c in cases:
        if c["bug"] is None:
            t = time.time()
            refs[c["hf"]] = reference_forward(c["hf"], ids, mask, ("fp64", *dtypes), args.device)
            log(f"HF {c['kind']}-{c['hidden']} streamed in fp64+{'+'.join(dtypes)}: {time.time() - t:.1f}s")
    if gpu:
        torch.cuda.empty_cache()  # the GPU is the Megatron ranks' from here on

    # 4. Megatron: TP=PP=1 first (with the bugs), then the other layouts
    def megatron_stage(dtype, tp, pp, run):
        if not run:
            return
        if not fits(args, STAGE_SECONDS["megatron"] * (2 if len(run) > 6 else 1)):
            result["skipped"].append(f"{dtype} TP={tp} PP={pp}: no time left")
            log(f"skipped {dtype} TP={tp} PP={pp}: it would not end within --limit {args.limit:.0f}s")
            return
        t = time.time()
        got = megatron_forward([(read_plan_from_megatron(iteration_dir(c["meg"])), iteration_dir(c["meg"]))
                                for c in run], ids, mask, tp, pp, dtype, args.device, work / f"run-{dtype}-{tp}x{pp}")
        secs = time.time() - t
        for c, g in zip(run, got):
            r = report_for(c["hf"], c["meg"], load_plan(c["hf"]), refs[c["hf"]], g, mask, dtype, tp, pp, args.device,
                           source)
            result["rows"].append(row_of(r, {k: (str(v) if isinstance(v, Path) else v) for k, v in c.items()},
                                         tp, pp, secs / len(run)))
        log(f"Megatron {dtype} TP={tp} PP={pp}: {len(run)} checkpoints in {secs:.1f}s")
        save()

    for dtype in dtypes:
        megatron_stage(dtype, 1, 1, [c for c in cases if c["bug"] is None or dtype in bug_dtypes])
    for c in cases:  # the bugs' checkpoints are done with: free the disk for the ~8B model
        if c["bug"] is not None:
            shutil.rmtree(Path(c["meg"]).parent, ignore_errors=True)

    # 5. the ~8B model, then the other layouts, then the whole-model memory figure (each if time is left)
    if big:
        if not fits(args, STAGE_SECONDS["big"]):
            result["skipped"].append("the ~8B model: no time left")
            log(f"skipped the ~8B model: it would not end within --limit {args.limit:.0f}s")
        else:
            result["big"] = run_big(args, work, ids, mask, source, rng, save)
    for tp, pp in layouts:
        if (tp, pp) != (1, 1):
            for dtype in dtypes:
                megatron_stage(dtype, tp, pp, [c for c in cases if c["bug"] is None])
    if result["rows"]:
        print(table(result["rows"]), flush=True)
    if "big" in result and not args.no_whole:
        if not fits(args, STAGE_SECONDS["whole"]):
            result["skipped"].append("the ~8B model's whole-model memory figure: no time left")
        else:
            whole_memory(args, work, mask, result["big"])
    save()
    rows = result["rows"] + result.get("big", {}).get("rows", [])
    bad = [r for r in rows if verdict(r) not in ("pass (correct)", "caught, right layer")]
    log(f"done: {len(rows)} rows, {len(bad)} not as expected, {len(result['skipped'])} stage(s) skipped"
        + "".join(f"\n  {r['kind']}-{r['hidden']} {r['dtype']} {r['tp']}x{r['pp']} {r['bug']}: {verdict(r)}"
                  for r in bad))


# Upper estimates of a stage's wall time on one H200 host (page cache warm), so that a run ends within --limit.
STAGE_SECONDS = {"megatron": 45, "big": 240, "whole": 90}


def fits(args, seconds: float) -> bool:
    return time.time() - T0 + seconds <= args.limit


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or None
    except OSError:
        return None


class Results:
    """Writes OUT/verify_at_size.{json,md} after every stage, so a run cut short keeps what it measured."""

    def __init__(self, out: Path | None, result: dict):
        self.out, self.result = out, result

    def __call__(self) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        r = self.result
        (self.out / "verify_at_size.json").write_text(json.dumps(r, indent=1, default=str))
        md = table(r["rows"]) + ("\n\n" + big_table(r["big"]) if "big" in r else "")
        md += "".join(f"\n\nskipped: {s}" for s in r["skipped"])
        (self.out / "verify_at_size.md").write_text(md + "\n")


def run_big(args, work: Path, ids, mask, source, rng, save) -> dict:
    cfg = super8b_config(args.big_hidden)
    t = time.time()
    hf = write_model(cfg, work / "super8b-hf", rng)
    plan = load_plan(hf)
    log(f"super8b: {plan.num_parameters() / 1e9:.2f}B parameters written in {time.time() - t:.1f}s")
    t = time.time()
    meg = convert(hf, work / "super8b-meg")
    log(f"super8b converted in {time.time() - t:.1f}s")
    inputs = work / "super8b-inputs.pt"
    torch.save({"input_ids": ids, "attention_mask": mask}, inputs)
    big = {"rows": [], "memory": {"computed_whole_gib": {
        d: plan.num_parameters() * n / 2**30 for d, n in (("fp64", 8), ("fp32", 4), ("bf16", 2))}}}
    mem = big["memory"]
    mem["streamed"] = run_measure("streamed", hf, inputs, work / "super8b-ref.pt", args.device)
    log(f"super8b HF streamed (fp64+fp32+bf16): {mem['streamed']}")
    from hetero_convert.reference import StreamOutput

    saved = torch.load(work / "super8b-ref.pt")
    ref = {d: StreamOutput(v["logits"], v["hidden"]) for d, v in saved.items()}
    for dtype in args.big_dtypes.split(","):
        t = time.time()
        got = megatron_forward([(read_plan_from_megatron(iteration_dir(meg)), iteration_dir(meg))], ids, mask, 1, 1,
                               dtype, args.device, work / f"run-super8b-{dtype}")[0]
        r = report_for(hf, meg, plan, ref, got, mask, dtype, 1, 1, args.device, source)
        big["rows"].append(row_of(r, {"kind": "super8b", "hidden": plan.hidden_size, "params": plan.num_parameters(),
                                      "bug": None, "bug_layer": None}, 1, 1, time.time() - t))
        log(f"super8b Megatron {dtype}: {'PASS' if r.ok else 'FAIL ' + '; '.join(r.failures)}")
    save.result["big"] = big
    save()
    print(big_table(big), flush=True)
    return big


def whole_memory(args, work: Path, mask, big: dict) -> None:
    """The HF side as verify ran it before: the whole model from from_pretrained in fp32, on the device."""
    mem = big["memory"]
    mem["whole_fp32"] = run_measure("whole", work / "super8b-hf", work / "super8b-inputs.pt", work / "super8b-whole.pt",
                                    args.device)
    whole = torch.load(work / "super8b-whole.pt")["fp32"]["logits"]
    streamed = torch.load(work / "super8b-ref.pt")["fp32"]["logits"]
    keep = mask.bool()
    mem["whole_fp32"]["max_abs_diff_vs_streamed_fp32"] = (whole[keep] - streamed[keep]).abs().max().item()
    log(f"super8b HF whole model fp32: {mem['whole_fp32']}")
    print(big_table(big), flush=True)


def big_table(big: dict) -> str:
    mem = big["memory"]
    lines = [table(big["rows"]), "",
             "| HF side of the ~8B model | peak GPU (GiB) | peak host RSS (GiB) | seconds |", "|---|---|---|---|"]
    for key, label in (("streamed", "layer-streamed, fp64 + fp32 + bf16 in one pass"),
                       ("whole_fp32", "whole model, from_pretrained fp32 (previous verify)")):
        if key in mem:
            m = mem[key]
            gpu = "-" if m["peak_gpu_gib"] is None else f"{m['peak_gpu_gib']:.2f}"
            lines.append(f"| {label} | {gpu} | {m['peak_host_rss_gib']:.2f} | {m['seconds']} |")
    c = mem["computed_whole_gib"]
    lines.append(f"| whole model, weights alone (computed) fp64 / fp32 / bf16 | {c['fp64']:.1f} / {c['fp32']:.1f} / "
                 f"{c['bf16']:.1f} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
