"""Everything the CLI prints: tables and one-line reports, from the data the library returns."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

# A terminal wraps at its width; anything else (a log, a pipe, a CI job) gets whole lines and whole tables, so
# nothing is cut mid-word or mid-path. rich assumes 80 columns when it cannot ask a terminal.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 1000)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 1000)


def human(n: float, unit: str = "") -> str:
    for suffix, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    for suffix, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"


def print_inspect(d: dict, path) -> None:
    t = Table(title=f"{path}  ({d['source_format']}, {d['num_layers']} layers)")
    quant = d.get("quantization")
    for col in ("layer", "attention", "KV heads", "FFN", "width", "params", "stage") + (("weights",) if quant else ()):
        t.add_column(col, justify="right" if col in ("layer", "KV heads", "width", "params", "stage") else "left")
    for l in d["layers"]:
        t.add_row(str(l["layer"]), l["attention"], str(l["kv_heads"] or "-"), l["ffn"], str(l["ffn_width"] or "-"),
                  human(l["parameters"]), str(l["stage"]) if l["stage"] is not None else "-",
                  *((l["weights"],) if quant else ()))
    console.print(t)
    if quant:
        kv = f"KV cache {quant['kv_cache_quant_algo']}" if quant["kv_cache_quant_algo"] else "KV cache unquantized"
        console.print(f"quantization: {quant['producer']} {quant['quant_algo']} ({kv}; unquantized: "
                      f"{', '.join(quant['exclude_modules']) or 'nothing'}): stored {human_bytes(quant['stored_bytes'])}"
                      f", dequantized to {quant['dequantized_dtype']} {human_bytes(quant['dequantized_bytes'])}",
                      highlight=False)
    c = d["counts"]
    console.print(
        f"parameters: [bold]{human(d['parameters'])}[/] ({d['parameters']:,}); non-embedding "
        f"{human(d['non_embedding_parameters'])}; KV cache {human_bytes(d['kv_cache_bytes_per_token_bf16'])}"
        f"/token (bf16)\nlayers: {c['gqa_attention']} GQA, {c['linear_attention']} linear-attention, "
        f"{c['no_attention']} attention-free; {c['swiglu_ffn']} SwiGLU, {c['linear_ffn']} linear-FFN, "
        f"{c['no_ffn']} FFN-free; {c['dummy_layers']} dummy", highlight=False)
    lay, tp, pp = d["layout"], d["layout"]["tp"], d["layout"]["pp"]
    if lay["ok"]:
        extra = ""
        if lay["num_layers_in_first_pipeline_stage"] is not None:
            extra = (f" (megatron: --num-layers-in-first-pipeline-stage {lay['num_layers_in_first_pipeline_stage']}"
                     f" --num-layers-in-last-pipeline-stage {lay['num_layers_in_last_pipeline_stage']})")
        console.print(f"layout TP={tp} PP={pp}: [green]ok[/]; padded vocab {lay['padded_vocab_size']}; layers per "
                      f"stage {lay['layers_per_stage']}{extra}", highlight=False)
    else:
        console.print(f"layout TP={tp} PP={pp}: [red]not possible[/] ({len(lay['violations'])} problems)")
        for line in lay["problems"]:
            console.print(f"  - {line}", highlight=False)
    console.print(f"TP sizes possible (up to 8): {d['feasible_tp'] or 'none'}", highlight=False)
    if d["pipeline_options"]:
        console.print("balanced pipeline splits: " + "; ".join(
            f"PP={o['pp']} {o['layers_per_stage']} (heaviest stage {o['max_over_mean']:.2f}x the mean)"
            for o in d["pipeline_options"]), highlight=False)


def print_spec(rows: list[dict], tp: int, pp: int, te: bool) -> None:
    t = Table(title=f"megatron-core layer specs ({'TE' if te else 'local'}), TP={tp} PP={pp}")
    for col in ("layer", "stage", "input_layernorm", "self_attention", "pre_mlp_layernorm", "mlp", "groups", "ffn"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["layer"]), str(r["stage"]), r["input_layernorm"], r["self_attention"], r["pre_mlp_layernorm"],
                  r["mlp"], str(r["num_query_groups"] or "-"), str(r["ffn_hidden_size"] or "-"))
    console.print(t)


def print_summary(s, as_json: bool) -> None:
    if as_json:
        print(json.dumps(s.as_dict(), indent=1))
        return
    for w in s.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    rate = s.bytes_written / max(s.seconds, 1e-9)
    console.print(f"{s.direction}: {s.tensors} tensors ({s.chunks} chunks), {human_bytes(s.bytes_written)} written "
                  f"in {s.seconds:.1f}s ({human_bytes(rate)}/s) -> {s.output}", highlight=False)
    if s.layout.get("integrity_verified_files"):
        console.print(f"integrity.json: the sha256 of all {s.layout['integrity_verified_files']} files it lists match",
                      highlight=False)


def print_plan_conversion(d: dict) -> None:
    t = Table(title=f"{d['direction']} over {d['processes']} processes, TP={d['tp']} PP={d['pp']}: split by "
                    f"{d['granularity']}")
    for col in ("rank", "assigned", "reads", "writes"):
        t.add_column(col, justify="left" if col == "assigned" else "right")
    for r in d["per_rank"]:
        what = f"{r['tensors']} tensors" + (", all their chunks" if d["direction"] == "hf-to-megatron" else "")
        t.add_row(str(r["rank"]), what, human_bytes(r["read_bytes"]), human_bytes(r["write_bytes"]))
    console.print(t)
    console.print(f"total: reads {human_bytes(d['total_read_bytes'])}, writes {human_bytes(d['total_write_bytes'])} "
                  f"({d['source_dtype']} -> {d['output_dtype']}); busiest process / mean = {d['max_over_mean']:.2f}",
                  highlight=False)


def print_prune_report(r: dict, out: Path) -> None:
    t = Table(title=f"{out}: {r['target']['kind']} <= {r['target']['fraction']:g} of the parent")
    for col in ("layer", "attention", "FFN", "result", "KL score", "params", "KV B/token"):
        t.add_column(col, justify="left" if col in ("attention", "FFN", "result") else "right")
    for l in r["layers"]:
        changed = l["attention"] != "keep" or l["ffn"] != "keep"
        style = "bold" if changed else None
        t.add_row(str(l["index"]), l["attention"], l["ffn"], l["describe"], f"{l['score']:.4f}", human(l["params"]),
                  str(l["kv_cache_bytes_per_token"]), style=style)
    console.print(t)
    p, q = r["parent"], r["pruned"]
    console.print(
        f"non-embedding params {human(p['non_embedding_params'])} -> {human(q['non_embedding_params'])} "
        f"({r['ratios']['non_embedding_params']:.3f}); KV cache {human_bytes(p['kv_cache_bytes_per_token'])} -> "
        f"{human_bytes(q['kv_cache_bytes_per_token'])}/token ({r['ratios']['kv_cache_bytes_per_token']:.3f}); "
        f"FLOPs/token {human(p['flops_per_token'])} -> {human(q['flops_per_token'])} "
        f"({r['ratios']['flops_per_token']:.3f})", highlight=False)
    s = r["search"]
    console.print(f"predicted summed {s['score']} {s['predicted_summed_score']:.4f} "
                  f"({'exact' if s['exact'] else 'costs rounded up to ' + str(s['cost_unit'])}); "
                  f"scores {'reused' if r['scores_reused'] else 'measured'}; report in {out}/pruning_report.json"
                  + (f"; Megatron checkpoint in {r['megatron']['path']}" if r.get("megatron") else ""),
                  highlight=False)
