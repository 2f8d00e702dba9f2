"""The `hetero-convert` command line.

Heavy imports (torch, megatron-core, transformers) happen inside the commands that need them, so that
`inspect` answers on a full-size config in well under a second.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Move heterogeneous (Nemotron-NAS / DeciLM) checkpoints between HuggingFace and Megatron-Core.")
console = Console()
err = Console(stderr=True)


def fail(msg: str, code: int = 1):
    err.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


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


# ---- inspect ------------------------------------------------------------------------------------------------


def inspect_data(path: Path, tp: int, pp: int) -> dict:
    from .layout import check_layout, feasible_layouts
    from .plan import load_plan

    plan = load_plan(path)
    report = check_layout(plan, tp, pp)
    split = report.split
    layers = []
    for layer in plan.layers:
        p = plan.layer_parameters(layer)
        layers.append({
            "layer": layer.index,
            "attention": layer.attention.kind,
            "kv_heads": layer.attention.num_kv_heads,
            "ffn": layer.ffn.kind,
            "ffn_width": layer.ffn.width,
            "parameters": p["total"],
            "stage": split.stage_of_layer(layer.index) if split else None,
        })
    return {
        "source": str(path),
        "source_format": plan.source_format,
        "num_layers": plan.num_layers,
        "hidden_size": plan.hidden_size,
        "num_attention_heads": plan.num_attention_heads,
        "head_dim": plan.head_dim,
        "vocab_size": plan.vocab_size,
        "tie_word_embeddings": plan.tie_word_embeddings,
        "rope_theta": plan.rope_theta,
        "rope_scaling": plan.rope_scaling,
        "parameters": plan.num_parameters(),
        "non_embedding_parameters": plan.num_parameters(include_embeddings=False),
        "kv_cache_bytes_per_token_bf16": plan.kv_cache_bytes_per_token(2),
        "counts": {
            "gqa_attention": sum(l.attention.kind == "gqa" for l in plan.layers),
            "linear_attention": sum(l.attention.kind == "linear" for l in plan.layers),
            "no_attention": sum(l.attention.kind == "none" for l in plan.layers),
            "swiglu_ffn": sum(l.ffn.kind == "swiglu" for l in plan.layers),
            "linear_ffn": sum(l.ffn.kind == "linear" for l in plan.layers),
            "no_ffn": sum(l.ffn.kind == "none" for l in plan.layers),
            "dummy_layers": sum(l.is_dummy for l in plan.layers),
        },
        "layers": layers,
        "layout": {
            "tp": tp, "pp": pp, "ok": report.ok,
            "padded_vocab_size": report.padded_vocab_size,
            "violations": [{"layer": v.layer, "tensor": v.tensor, "reason": v.reason} for v in report.violations],
            "layers_per_stage": split.layers_per_stage if split else None,
            "params_per_stage": split.params_per_stage if split else None,
            "num_layers_in_first_pipeline_stage": split.num_layers_in_first_pipeline_stage if split else None,
            "num_layers_in_last_pipeline_stage": split.num_layers_in_last_pipeline_stage if split else None,
        },
        "feasible_tp": sorted({t for t, _ in feasible_layouts(plan, max_gpus=8)}),
    }


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A checkpoint directory or a config.json"),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size to check"),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel size to check"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables"),
):
    """Per-layer table, parameter and KV-cache counts, and whether a TP/PP layout is possible."""
    from .plan import PlanError

    try:
        d = inspect_data(path, tp, pp)
    except PlanError as e:
        fail(str(e))
    if as_json:
        print(json.dumps(d, indent=1))
        raise typer.Exit(0 if d["layout"]["ok"] else 2)
    t = Table(title=f"{path}  ({d['source_format']}, {d['num_layers']} layers)")
    for col in ("layer", "attention", "KV heads", "FFN", "width", "params", "stage"):
        t.add_column(col, justify="right" if col in ("layer", "KV heads", "width", "params", "stage") else "left")
    for l in d["layers"]:
        t.add_row(str(l["layer"]), l["attention"], str(l["kv_heads"] or "-"), l["ffn"], str(l["ffn_width"] or "-"),
                  human(l["parameters"]), str(l["stage"]) if l["stage"] is not None else "-")
    console.print(t)
    c = d["counts"]
    console.print(
        f"parameters: [bold]{d['parameters'] / 1e9:.2f}B[/] ({d['parameters']:,}); non-embedding "
        f"{d['non_embedding_parameters'] / 1e9:.2f}B; KV cache {human_bytes(d['kv_cache_bytes_per_token_bf16'])}"
        f"/token (bf16)\nlayers: {c['gqa_attention']} GQA, {c['linear_attention']} linear-attention, "
        f"{c['no_attention']} attention-free; {c['swiglu_ffn']} SwiGLU, {c['linear_ffn']} linear-FFN, "
        f"{c['no_ffn']} FFN-free; {c['dummy_layers']} dummy", highlight=False)
    lay = d["layout"]
    if lay["ok"]:
        extra = ""
        if lay["num_layers_in_first_pipeline_stage"] is not None:
            extra = (f" (megatron: --num-layers-in-first-pipeline-stage {lay['num_layers_in_first_pipeline_stage']}"
                     f" --num-layers-in-last-pipeline-stage {lay['num_layers_in_last_pipeline_stage']})")
        console.print(f"layout TP={tp} PP={pp}: [green]ok[/]; padded vocab {lay['padded_vocab_size']}; layers per "
                      f"stage {lay['layers_per_stage']}{extra}", highlight=False)
    else:
        console.print(f"layout TP={tp} PP={pp}: [red]not possible[/] ({len(lay['violations'])} problems)")
        for v in lay["violations"]:
            where = f"layer {v['layer']}" if v["layer"] is not None else "model"
            console.print(f"  - {where}: {v['tensor']}: {v['reason']}", highlight=False)
    console.print(f"TP sizes possible (up to 8): {d['feasible_tp']}", highlight=False)
    if not lay["ok"]:
        raise typer.Exit(2)


@app.command()
def spec(
    path: Path = typer.Argument(..., help="A checkpoint directory or a config.json"),
    tp: int = typer.Option(1, "--tp"),
    pp: int = typer.Option(1, "--pp"),
    te: bool = typer.Option(False, "--te/--local", help="Transformer Engine spec, or megatron-core's local spec"),
    as_json: bool = typer.Option(False, "--json"),
):
    """The per-layer Megatron module classes, built by megatron-core itself (no weights allocated)."""
    import warnings

    warnings.filterwarnings("ignore")
    from .layout import LayoutError
    from .plan import PlanError, load_plan
    from .spec import spec_table, te_available

    if te and not te_available():
        fail("--te needs transformer-engine, which is not importable here (use --local)")
    try:
        rows = spec_table(load_plan(path), tp, pp, use_te=te)
    except (PlanError, LayoutError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    t = Table(title=f"megatron-core layer specs ({'TE' if te else 'local'}), TP={tp} PP={pp}")
    for col in ("layer", "stage", "input_layernorm", "self_attention", "pre_mlp_layernorm", "mlp", "groups", "ffn"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["layer"]), str(r["stage"]), r["input_layernorm"], r["self_attention"], r["pre_mlp_layernorm"],
                  r["mlp"], str(r["num_query_groups"] or "-"), str(r["ffn_hidden_size"] or "-"))
    console.print(t)


# ---- conversion ---------------------------------------------------------------------------------------------


class Progress:
    """A bytes/s progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        if self.enabled:
            from rich.progress import (BarColumn, DownloadColumn, Progress as P, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.p = P("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                       TransferSpeedColumn(), TimeRemainingColumn(), console=err)
            self.task = self.p.add_task(label, total=total)

    def __enter__(self):
        if self.enabled:
            self.p.start()
        return self

    def set_total(self, total: int) -> None:
        if self.enabled:
            self.p.update(self.task, total=total)

    def __call__(self, n: int):
        if self.enabled:
            self.p.advance(self.task, n)

    def __exit__(self, *exc):
        if self.enabled:
            self.p.stop()


def report_summary(s, as_json: bool):
    if as_json:
        print(json.dumps(s.as_dict(), indent=1))
        return
    for w in s.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    rate = s.bytes_written / max(s.seconds, 1e-9)
    console.print(f"{s.direction}: {s.tensors} tensors, {human_bytes(s.bytes_written)} written in {s.seconds:.1f}s "
                  f"({human_bytes(rate)}/s) -> {s.output}", highlight=False)


DISTRIBUTED_HELP = ("Split the work over the processes of a torchrun job (default: when WORLD_SIZE > 1); "
                    "output on a filesystem every process sees")


def coordinator() -> bool:
    """Under torchrun only rank 0 prints the summary (every process returns the same one)."""
    return os.environ.get("RANK", "0") == "0"


def fail_job(e: Exception):
    """Every process of a failed distributed job raises the same error: rank 0 alone prints it."""
    if type(e).__name__ == "JobFailed" and not coordinator():
        raise typer.Exit(1)
    fail(str(e))


@app.command("hf-to-megatron")
def hf_to_megatron_cmd(
    hf_dir: Path = typer.Argument(..., help="HF checkpoint directory (config.json + safetensors)"),
    out_dir: Path = typer.Argument(..., help="Megatron checkpoint directory to create"),
    tp: int = typer.Option(1, "--tp", help="Chunk the data as a run at this tensor-parallel size would"),
    pp: int = typer.Option(1, "--pp", help="... and at this pipeline-parallel size"),
    dtype: str = typer.Option("keep", "--dtype", help="keep | bf16 | fp16 | fp32"),
    workers: int = typer.Option(1, "--workers", help="Tensors converted concurrently"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT_DIR"),
    strict: bool = typer.Option(False, "--strict", help="Refuse NaN/Inf weights instead of warning"),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary"),
    distributed: Optional[bool] = typer.Option(None, "--distributed/--no-distributed", help=DISTRIBUTED_HELP),
):
    """Convert a HF checkpoint into a Megatron torch_dist checkpoint, streaming."""
    from .io.checksums import FileHashes
    from .io.hf_index import CheckpointError, shard_files

    # Hash the source (and so read it from disk) while torch and DCP are being imported: that start-up takes
    # ~1.7 s on one core. Under torchrun each process hashes its own share instead (distributed.py).
    single = not distributed and os.environ.get("WORLD_SIZE", "1") == "1"
    try:
        names = shard_files(hf_dir)[1] if single else []
    except CheckpointError:
        names = []  # reported, with the rest of the checks, by the converter
    hashes = FileHashes(hf_dir / n for n in names)
    from .convert import ConversionError, hf_to_megatron, settle_process_for_streaming
    from .io.hf_reader import HFCheckpoint
    from .layout import LayoutError
    from .plan import PlanError

    settle_process_for_streaming(workers)  # bounded RSS, no collector or OpenMP overhead (see its docstring)
    try:
        total = HFCheckpoint(hf_dir).total_bytes()
        # Under torchrun a process sees only its own share: no bar that would stop at 1/N.
        with Progress(total, "hf-to-megatron", not as_json and os.environ.get("WORLD_SIZE", "1") == "1") as prog:
            s = hf_to_megatron(hf_dir, out_dir, tp=tp, pp=pp, dtype=dtype, workers=workers, overwrite=overwrite,
                               strict=strict, checksums=hashes if single else True, progress=prog,
                               distributed=distributed)
    except (ConversionError, CheckpointError, PlanError, LayoutError) as e:
        hashes.close()
        fail_job(e)
    if coordinator():
        report_summary(s, as_json)


@app.command("megatron-to-hf")
def megatron_to_hf_cmd(
    megatron_dir: Path = typer.Argument(..., help="Megatron torch_dist checkpoint (root or iteration folder)"),
    out_dir: Path = typer.Argument(..., help="HF checkpoint directory to create"),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size"),
    dtype: str = typer.Option("keep", "--dtype", help="keep | bf16 | fp16 | fp32"),
    tokenizer_from: Optional[Path] = typer.Option(None, "--tokenizer-from", help="Copy tokenizer files from here"),
    workers: int = typer.Option(1, "--workers", help="Tensors converted concurrently"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    strict: bool = typer.Option(False, "--strict", help="Refuse NaN/Inf weights instead of warning"),
    as_json: bool = typer.Option(False, "--json"),
    distributed: Optional[bool] = typer.Option(None, "--distributed/--no-distributed", help=DISTRIBUTED_HELP),
):
    """Convert a Megatron torch_dist checkpoint (any TP/PP) into a HF DeciLM checkpoint, streaming."""
    from .convert import ConversionError, megatron_to_hf, settle_process_for_streaming
    from .plan import PlanError

    settle_process_for_streaming(workers)  # bounded RSS, no collector or OpenMP overhead (see its docstring)
    try:
        with Progress(0, "megatron-to-hf", not as_json and os.environ.get("WORLD_SIZE", "1") == "1") as prog:
            s = megatron_to_hf(megatron_dir, out_dir, max_shard_size=max_shard_size, dtype=dtype,
                               tokenizer_from=tokenizer_from, workers=workers, overwrite=overwrite, strict=strict,
                               progress=prog, distributed=distributed)
    except (ConversionError, PlanError, FileNotFoundError) as e:
        fail_job(e)
    if coordinator():
        report_summary(s, as_json)


# ---- verify -------------------------------------------------------------------------------------------------


@app.command()
def verify(
    hf: Path = typer.Option(..., "--hf", help="HF checkpoint directory (the reference)"),
    megatron: Path = typer.Option(..., "--megatron", help="Megatron torch_dist checkpoint to check"),
    tp: int = typer.Option(1, "--tp"),
    pp: int = typer.Option(1, "--pp"),
    device: str = typer.Option("cpu", "--device", help="cuda | cpu (megatron-core on CPU with gloo)"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line (uses the tokenizer)"),
    batch: int = typer.Option(2, "--batch", help="Random prompts: batch size (rows of different lengths)"),
    seq_len: int = typer.Option(32, "--seq-len", help="Random prompts: longest row"),
    seed: int = typer.Option(0, "--seed"),
    max_rel_diff: Optional[float] = typer.Option(None, "--max-rel-diff", help="Override: max |diff| / max |logit|"),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Override: minimum top-1 agreement"),
    max_mean_kl: Optional[float] = typer.Option(None, "--max-mean-kl", help="Override: maximum mean KL"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON here"),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Scratch folder (needed when run under torchrun)"),
    layers: bool = typer.Option(False, "--layers", help="Always print the per-layer table"),
):
    """Compare the logits of the HF model and the real Megatron model at every position; exit 1 on failure."""
    import os
    import warnings

    warnings.filterwarnings("ignore")
    from .verify import print_report, verify as run_verify

    overrides = {k: v for k, v in (("max_rel_diff", max_rel_diff), ("min_top1", min_top1),
                                   ("max_mean_kl", max_mean_kl)) if v is not None}
    if workdir is None and "TORCHELASTIC_RUN_ID" in os.environ:
        import tempfile

        workdir = Path(tempfile.gettempdir()) / f"hetero-convert-verify-{os.environ['TORCHELASTIC_RUN_ID']}"
    try:
        report = run_verify(hf, megatron, tp=tp, pp=pp, device=device, dtype=dtype, prompts=prompts, batch=batch,
                            seq_len=seq_len, seed=seed, thresholds=overrides, workdir=workdir)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        fail(str(e))
    if report is None:  # a non-zero rank under the user's torchrun
        return
    print_report(report, console, show_layers=layers)
    if json_out:
        json_out.write_text(json.dumps(report.as_dict(), indent=1))
    raise typer.Exit(0 if report.ok else 1)


# ---- demo ---------------------------------------------------------------------------------------------------


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where to write (default: a temporary folder)"),
    tp: int = typer.Option(2, "--tp"),
    pp: int = typer.Option(2, "--pp"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Also compare HF and Megatron logits on CPU"),
):
    """Build the bundled tiny heterogeneous checkpoint, convert it to Megatron and back, check it is exact."""
    import tempfile

    from .demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        ok = run_demo(Path(workdir) if workdir else Path(tmp), tp, pp, console, verify)
    raise typer.Exit(0 if ok else 1)


# ---- plan-convert -------------------------------------------------------------------------------------------


@app.command("plan-convert")
def plan_convert(
    path: Path = typer.Argument(..., help="A config.json or HF checkpoint directory (no weights needed)"),
    ranks: int = typer.Option(..., "--ranks", help="Processes of the torchrun job (nodes x processes per node)"),
    tp: int = typer.Option(1, "--tp", help="Megatron tensor-parallel size"),
    pp: int = typer.Option(1, "--pp", help="Megatron pipeline-parallel size (hf-to-megatron)"),
    direction: str = typer.Option("hf-to-megatron", "--direction", help="hf-to-megatron | megatron-to-hf"),
    dtype: str = typer.Option("keep", "--dtype", help="Output dtype: keep | bf16 | fp16 | fp32"),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="HF shard size (megatron-to-hf)"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Which process of a distributed conversion does what, and the bytes each reads and writes."""
    from .convert import ConversionError
    from .distributed import plan_conversion
    from .layout import LayoutError
    from .plan import PlanError

    try:
        d = plan_conversion(path, ranks, tp=tp, pp=pp, direction=direction, dtype=dtype,
                            max_shard_size=max_shard_size)
    except (ConversionError, PlanError, LayoutError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(d, indent=1))
        return
    t = Table(title=f"{direction} over {ranks} processes, TP={tp} PP={pp}: split by {d['granularity']}")
    for col in ("rank", "assigned", "reads", "writes"):
        t.add_column(col, justify="left" if col == "assigned" else "right")
    for r in d["per_rank"]:
        if "shards" in r:
            what = f"shards {_ranges(r['shards'])}"
        elif "megatron_ranks" in r:
            what = f"Megatron ranks {_ranges(r['megatron_ranks'])}"
        else:
            what = "chunks of Megatron ranks " + ", ".join(f"{k}:{n}" for k, n in r["chunks_of_megatron_ranks"].items())
        t.add_row(str(r["rank"]), what, human_bytes(r["read_bytes"]), human_bytes(r["write_bytes"]))
    console.print(t)
    console.print(f"total: reads {human_bytes(d['total_read_bytes'])}, writes {human_bytes(d['total_write_bytes'])} "
                  f"({d['source_dtype']} -> {d['output_dtype']}); busiest process / mean = {d['max_over_mean']:.2f}",
                  highlight=False)
    if direction == "megatron-to-hf" and d["max_over_mean"] > 1.2:
        console.print("(a whole shard is the unit of work here: a smaller --max-shard-size balances finer)")


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5': a 512-rank assignment stays one line."""
    out, start = [], None
    for k, x in enumerate(xs):
        if start is None:
            start = x
        if k + 1 == len(xs) or xs[k + 1] != x + 1:
            out.append(f"{start}-{x}" if x != start else f"{x}")
            start = None
    return ",".join(out) or "-"


# ---- prune --------------------------------------------------------------------------------------------------


@app.command()
def prune(
    src: Path = typer.Argument(..., help="HF Llama or DeciLM checkpoint to prune"),
    out: Path = typer.Argument(..., help="Directory for the pruned DeciLM checkpoint (and prune_scores.json)"),
    calib: Optional[list[Path]] = typer.Option(None, "--calib", help="Calibration text file (plain text); repeat "
                                               "for a mix of domains. Default: a mix made from Python's own docs, "
                                               "docstrings and sources"),
    calib_tokens: int = typer.Option(16384, "--calib-tokens", help="Calibration tokens: fit + held-back scoring"),
    score_tokens: int = typer.Option(768, "--score-tokens", help="Of those, held back from the fits and used to "
                                     "score every variant"),
    seq_len: int = typer.Option(256, "--seq-len", help="Calibration sequence length"),
    target_params: Optional[float] = typer.Option(None, "--target-params", help="Fraction of non-embedding params"),
    target_kv_cache: Optional[float] = typer.Option(None, "--target-kv-cache", help="Fraction of KV-cache bytes/token"),
    target_flops: Optional[float] = typer.Option(None, "--target-flops", help="Fraction of FLOPs/token"),
    flops_context: int = typer.Option(4096, "--flops-context", help="Sequence length assumed by --target-flops"),
    ffn_widths: Optional[str] = typer.Option(None, "--ffn-widths", help="Comma-separated FFN widths to try "
                                             "(multiples of 256; default: the format's widths, at most 8)"),
    reuse_scores: bool = typer.Option(False, "--reuse-scores", help="Search again with OUT/prune_scores.json"),
    scores_from: Optional[Path] = typer.Option(None, "--scores-from", help="Reuse scores (and fits) from this "
                                               "file or directory"),
    keep_fits: bool = typer.Option(True, "--keep-fits/--drop-fits", help="Keep OUT/prune_fits (every variant's "
                                   "fitted tensors) so --reuse-scores needs no calibration pass"),
    megatron: Optional[Path] = typer.Option(None, "--megatron", help="Also write a Megatron checkpoint here"),
    tp: int = typer.Option(1, "--tp"),
    pp: int = typer.Option(1, "--pp"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    compute_dtype: Optional[str] = typer.Option(None, "--compute-dtype",
                                                help="fp32 | bf16 for the scoring forwards (default: bf16 on cuda "
                                                     "and on CPUs with native bf16, else fp32)"),
    batch_size: int = typer.Option(4, "--batch-size", help="Calibration sequences per forward"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output (warnings still go to the report)"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
):
    """Prune into a smaller heterogeneous DeciLM model: per-layer variants scored by KL, exact knapsack search."""
    import warnings

    warnings.filterwarnings("ignore")
    from .convert import ConversionError
    from .layout import LayoutError
    from .plan import PlanError
    from .prune import PruneError, PruneOptions
    from .prune.progress import make_progress

    targets = {k: v for k, v in (("params", target_params), ("kv_cache", target_kv_cache),
                                 ("flops", target_flops)) if v is not None}
    if len(targets) != 1:
        fail("give exactly one of --target-params, --target-kv-cache, --target-flops")
    (target, fraction), = targets.items()
    if not 0 < fraction <= 1:
        fail(f"--target-{target.replace('_', '-')} {fraction:g}: the target is a fraction of the parent, in (0, 1]")
    for path in calib or []:
        if not path.is_file():
            fail(f"--calib {path}: no such file")
    try:
        widths = [int(w) for w in ffn_widths.split(",")] if ffn_widths else None
    except ValueError:
        fail(f"--ffn-widths {ffn_widths!r}: expected comma-separated integers")
    options = PruneOptions(calib_tokens=calib_tokens, score_tokens=score_tokens, seq_len=seq_len,
                           batch_size=batch_size, device=device, compute_dtype=compute_dtype, ffn_widths=widths,
                           flops_context=flops_context, keep_fits=keep_fits)
    texts = {f"{k}:{p.name}": p.read_text(encoding="utf-8", errors="replace") for k, p in enumerate(calib)} \
        if calib else None
    try:
        with make_progress(quiet, err) as progress:
            from .prune import prune as run_prune

            report = run_prune(src, out, texts, target=target, fraction=fraction, options=options,
                               reuse_scores=reuse_scores, scores_from=scores_from, megatron=megatron, tp=tp, pp=pp,
                               overwrite=overwrite, progress=progress)
    except (PruneError, PlanError, LayoutError, ConversionError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(report, indent=1))
        return
    print_prune_report(report, out)


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


if __name__ == "__main__":
    app()
