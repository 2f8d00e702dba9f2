"""The `hetero-convert` command line: each command parses its options, calls the library, and renders.

Heavy imports (torch, megatron-core, transformers) happen inside the commands that need them, so that
`inspect` answers on a full-size config in well under a second. Whatever escapes a command is printed as one
line (`failures.py`: refusals, known foreign errors, and bugs, whose traceback `--debug` shows).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import HeteroConvertError, JobFailed
from ..launch import world
from .failures import Commands, debugging, print_error
from .render import console, err, print_inspect, print_plan_conversion, print_prune_report, \
    print_spec, print_summary

app = typer.Typer(cls=Commands, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
                  help="Move heterogeneous (Nemotron-NAS / DeciLM) checkpoints between HuggingFace and Megatron-Core, "
                       "prove the move was exact, and prune them into new heterogeneous shapes.")
DTYPE_CHOICES = "keep|bf16|fp16|fp32"


def _version(value: bool):
    if value:
        from .. import __version__

        print(f"hetero-convert {__version__}")
        raise typer.Exit(0)


# Commands that run megatron-core or write checkpoints for it: they say, at start-up, when the installed
# megatron-core is outside the tested range (prune does when given --megatron).
MEGATRON_COMMANDS = {"spec", "hf-to-megatron", "megatron-to-megatron", "verify", "demo"}


@app.callback()
def main(ctx: typer.Context,
         version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                      help="Print the version and exit"),
         debug: bool = typer.Option(False, "--debug", help="Show the traceback of a failure (a bug report needs "
                                                           "it) instead of one line")):
    """Move heterogeneous (Nemotron-NAS / DeciLM) checkpoints between HuggingFace and Megatron-Core, prove the
    move was exact, and prune them into new heterogeneous shapes. `hetero-convert COMMAND -h` explains each."""
    if ctx.invoked_subcommand in MEGATRON_COMMANDS:
        warn_megatron_version()


def warn_megatron_version() -> None:
    """One stderr line, from rank 0 only, when megatron-core is missing or outside the tested range (read from
    its distribution metadata: megatron itself is not imported)."""
    from ..megatron.compat import version_warning

    msg = version_warning()
    if msg and world().coordinator:
        err.print(f"[yellow]warning:[/] {msg}", highlight=False)


def fail(msg: str, code: int = 1):
    if debugging() and sys.exc_info()[1] is not None:  # called while handling a refusal: --debug shows where
        raise sys.exc_info()[1]
    print_error(msg)
    raise typer.Exit(code)


def fail_job(e: Exception):
    """Every process of a failed distributed job raises the same error: the coordinator alone prints it."""
    if isinstance(e, JobFailed) and not world().coordinator:
        raise typer.Exit(1)
    fail(str(e))


# ---- inspect / spec -----------------------------------------------------------------------------------------


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A config.json, or a HF or Megatron checkpoint directory"),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size to check"),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel size to check"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables"),
):
    """Per-layer table, parameter and KV-cache counts, and whether a TP/PP layout is possible."""
    from ..describe import describe_path

    try:
        d = describe_path(path, tp, pp)
    except HeteroConvertError as e:
        fail(str(e))
    if as_json:
        print(json.dumps(d, indent=1))
    else:
        print_inspect(d, path)
    if not d["layout"]["ok"]:
        raise typer.Exit(2)


@app.command()
def spec(
    path: Path = typer.Argument(..., help="A config.json, or a HF or Megatron checkpoint directory"),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size the specs are built for"),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel size the specs are built for"),
    te: bool = typer.Option(False, "--te/--local", help="Transformer Engine spec, or megatron-core's local spec"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
):
    """The per-layer Megatron module classes, built by megatron-core itself (no weights allocated)."""
    import warnings

    warnings.filterwarnings("ignore")
    from ..describe import load_model_plan
    from ..spec import spec_table, te_available

    if te and not te_available():
        fail("--te needs transformer-engine, which is not importable here (use --local)")
    try:
        rows = spec_table(load_model_plan(path), tp, pp, use_te=te)
    except HeteroConvertError as e:
        fail(str(e))
    if as_json:
        print(json.dumps(rows, indent=1))
    else:
        print_spec(rows, tp, pp, te)


# ---- conversion ---------------------------------------------------------------------------------------------

OVERWRITE_HELP = ("Replace OUT_DIR if it holds a previous output of this command (never a source, a folder "
                  "holding one, or a directory of anything else)")
DISTRIBUTED_HELP = ("Split the work over the processes of a torchrun job (default: when torchrun started more "
                    "than one); output on a filesystem every process sees")
MEGATRON_CORE_HELP = ("The megatron-core that will load the output: any (loads in 0.16 .. 0.19: common.pt and 0.19's "
                      "common_state object), 0.16 | 0.17 | 0.18 (common.pt only), 0.19 (common_state only, as 0.19 "
                      "itself saves)")


@app.command("hf-to-megatron")
def hf_to_megatron_cmd(
    hf_dir: Path = typer.Argument(..., help="HF checkpoint directory (config.json + safetensors)"),
    out_dir: Path = typer.Argument(..., help="Megatron checkpoint directory to create"),
    tp: int = typer.Option(1, "--tp", help="Chunk the data as a run at this tensor-parallel size would"),
    pp: int = typer.Option(1, "--pp", help="... and at this pipeline-parallel size"),
    dtype: str = typer.Option("keep", "--dtype", metavar=DTYPE_CHOICES, help="Output dtype (keep: the source's)"),
    workers: int = typer.Option(1, "--workers", help="Tensors converted concurrently"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    strict: bool = typer.Option(False, "--strict", help="Refuse NaN/Inf weights instead of warning"),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary"),
    distributed: Optional[bool] = typer.Option(None, "--distributed/--no-distributed", help=DISTRIBUTED_HELP),
    megatron_core: str = typer.Option("any", "--megatron-core", metavar="any|0.16|0.17|0.18|0.19",
                                      help=MEGATRON_CORE_HELP),
    checksums: bool = typer.Option(True, "--checksums/--no-checksums",
                                   help="Record the source files' sha256 in the description (costs a core-second "
                                        "per ~1.4 GB: on a small machine, a third of the time)"),
):
    """Convert a HF checkpoint into a Megatron torch_dist checkpoint, streaming."""
    from ..io.checksums import FileHashes
    from ..io.hf_index import shard_files
    from ..layout import require_layout
    from ..megatron.compat import common_forms
    from ..plan import load_plan

    try:  # refuse a config, layout or target before paying for torch's import (the converter checks them again)
        common_forms(megatron_core)
        require_layout(load_plan(hf_dir), tp, pp)
    except HeteroConvertError as e:
        fail(str(e))
    from .process import ReadAheadShare

    env = world()
    # Hash the source (and so read it from disk) from the start, while torch and DCP are being imported, seconds
    # in which the disk would be idle, and on, ahead of the conversion. Under torchrun each process hashes its own
    # share after the import (convert/driver.py), and reads that share ahead from the start, as does a process
    # that does not hash, and, on a many-core machine, one that does (ReadAheadShare says why).
    single = not distributed and env.size == 1
    try:
        names = shard_files(hf_dir)[1]
    except HeteroConvertError:
        names = []  # reported, with the rest of the checks, by the converter
    early = single and checksums  # hashing before the import reads the source anyway
    hashes = FileHashes(hf_dir / n for n in (names if early else []))
    ahead = ReadAheadShare([hf_dir / n for n in names], env.rank, env.size, hashed=early)
    from ..convert import hf_to_megatron
    from ..io.quantized import open_checkpoint
    from .process import settle_process_for_streaming
    from .progress import Progress

    settle_process_for_streaming(workers)  # bounded RSS, no collector or OpenMP overhead (see its docstring)
    ahead.imported()
    try:
        total = open_checkpoint(hf_dir).total_bytes()  # a quantized checkpoint: its dequantized size
        # Under torchrun a process sees only its own share: no bar that would stop at 1/N.
        with Progress(total, "hf-to-megatron", not as_json and env.size == 1) as prog:
            s = hf_to_megatron(hf_dir, out_dir, tp=tp, pp=pp, dtype=dtype, workers=workers, overwrite=overwrite,
                               strict=strict, checksums=(hashes if single else True) if checksums else False,
                               progress=prog, distributed=distributed, megatron_core=megatron_core,
                               on_read_plan=ahead.follow)
    except HeteroConvertError as e:
        hashes.close()
        fail_job(e)
    finally:
        ahead.done()
    if env.coordinator:
        print_summary(s, as_json)


@app.command("megatron-to-hf")
def megatron_to_hf_cmd(
    megatron_dir: Path = typer.Argument(..., help="Megatron torch_dist checkpoint (root or iteration folder)"),
    out_dir: Path = typer.Argument(..., help="HF checkpoint directory to create"),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors file, e.g. 5GB, 500MB"),
    dtype: str = typer.Option("keep", "--dtype", metavar=DTYPE_CHOICES, help="Output dtype (keep: the source's)"),
    tokenizer_from: Optional[Path] = typer.Option(None, "--tokenizer-from", help="Copy tokenizer files from here"),
    workers: int = typer.Option(1, "--workers", help="Tensors converted concurrently"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    strict: bool = typer.Option(False, "--strict", help="Refuse NaN/Inf weights instead of warning"),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary"),
    distributed: Optional[bool] = typer.Option(None, "--distributed/--no-distributed", help=DISTRIBUTED_HELP),
    schema: str = typer.Option("auto", "--schema", metavar="auto|decilm|llama|puzzletron|anymodel",
                               help="config.json schema to write (auto: the one the model came in)"),
    verify_integrity: bool = typer.Option(
        True, "--verify-integrity/--no-verify-integrity",
        help="When the folder has megatron's integrity.json, check every file it lists (sha256) before the output "
             "is committed; this reads the optimizer state too"),
):
    """Convert a Megatron torch_dist checkpoint (any TP/PP; ours, or a training run's iteration folder saved by
    megatron-core 0.16 .. 0.19) into a HF checkpoint, streaming; optimizer, RNG and scheduler state are not read."""
    from ..io.megatron_checkpoint import DESCRIPTION_FILE, iteration_dir
    from .process import ReadAheadShare

    env = world()
    # Read this process's share of the data files from before torch is imported (see hf-to-megatron); only in our
    # own checkpoints, whose data files hold the model alone (a training run's are mostly optimizer state,
    # which the export never reads).
    try:
        it = iteration_dir(megatron_dir)
        files = sorted(it.glob("*.distcp")) if (it / DESCRIPTION_FILE).is_file() else []
    except (HeteroConvertError, OSError):
        files = []  # reported by the converter
    ahead = ReadAheadShare(files, env.rank, env.size, interleaved=True)
    from ..convert import megatron_to_hf
    from .process import settle_process_for_streaming
    from .progress import Progress

    settle_process_for_streaming(workers)  # bounded RSS, no collector or OpenMP overhead (see its docstring)
    ahead.imported()
    try:
        with Progress(0, "megatron-to-hf", not as_json and env.size == 1) as prog:
            s = megatron_to_hf(megatron_dir, out_dir, max_shard_size=max_shard_size, dtype=dtype,
                               tokenizer_from=tokenizer_from, workers=workers, overwrite=overwrite, strict=strict,
                               progress=prog, distributed=distributed, schema=schema,
                               verify_integrity=verify_integrity, on_read_plan=ahead.follow)
    except (HeteroConvertError, FileNotFoundError) as e:
        fail_job(e)
    finally:
        ahead.done()
    if env.coordinator:
        print_summary(s, as_json)


@app.command("megatron-to-megatron")
def megatron_to_megatron_cmd(
    megatron_dir: Path = typer.Argument(..., help="Megatron torch_dist checkpoint (root or iteration folder)"),
    out_dir: Path = typer.Argument(..., help="Megatron checkpoint directory to create"),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size to re-chunk for"),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel size to re-chunk for"),
    dtype: str = typer.Option("keep", "--dtype", metavar=DTYPE_CHOICES, help="Output dtype (keep: the source's)"),
    workers: int = typer.Option(1, "--workers", help="Tensors converted concurrently"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    strict: bool = typer.Option(False, "--strict", help="Refuse NaN/Inf weights instead of warning"),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary"),
    distributed: Optional[bool] = typer.Option(None, "--distributed/--no-distributed", help=DISTRIBUTED_HELP),
    megatron_core: str = typer.Option("any", "--megatron-core", metavar="any|0.16|0.17|0.18|0.19",
                                      help=MEGATRON_CORE_HELP),
):
    """Re-chunk a Megatron checkpoint for another TP/PP (or dtype), streaming, without going through HF. A
    homogeneous training run's stacked layers come out per layer."""
    from ..describe import load_model_plan
    from ..layout import require_layout
    from ..megatron.compat import common_forms

    try:  # refuse the target and layout before paying for torch's import
        common_forms(megatron_core)
        require_layout(load_model_plan(megatron_dir), tp, pp)
    except HeteroConvertError as e:
        fail(str(e))
    from ..convert import megatron_to_megatron
    from .process import settle_process_for_streaming
    from .progress import Progress

    env = world()
    settle_process_for_streaming(workers)
    try:
        with Progress(0, "megatron-to-megatron", not as_json and env.size == 1) as prog:
            s = megatron_to_megatron(megatron_dir, out_dir, tp=tp, pp=pp, dtype=dtype, workers=workers,
                                     overwrite=overwrite, strict=strict, progress=prog, distributed=distributed,
                                     megatron_core=megatron_core)
    except (HeteroConvertError, FileNotFoundError) as e:
        fail_job(e)
    if env.coordinator:
        print_summary(s, as_json)


# ---- verify -------------------------------------------------------------------------------------------------


@app.command()
def verify(
    hf: Path = typer.Option(..., "--hf", help="HF checkpoint directory (the reference)"),
    megatron: Path = typer.Option(..., "--megatron", help="Megatron torch_dist checkpoint to check"),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size megatron-core runs at"),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel size megatron-core runs at"),
    device: str = typer.Option("cpu", "--device", metavar="cpu|cuda", help="Where megatron-core runs (CPU: gloo)"),
    dtype: str = typer.Option("fp32", "--dtype", metavar="fp32|bf16|fp16", help="The dtype both models compute in"),
    reference_device: Optional[str] = typer.Option(
        None, "--reference-device", metavar="cpu|cuda",
        help="Where the layer-streamed HF model runs (fp64 and --dtype); default --device"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line (uses the tokenizer)"),
    random_tokens: bool = typer.Option(False, "--random-tokens",
                                       help="Random ids even when the checkpoint has a tokenizer (default: English text)"),
    batch: int = typer.Option(2, "--batch", help="Rows (of different lengths)"),
    seq_len: int = typer.Option(32, "--seq-len", help="Longest row in tokens (prompts are cut to it too)"),
    seed: int = typer.Option(0, "--seed", help="Seed of the random ids and of the choice of text"),
    factor: float = typer.Option(2.0, "--factor", help="How much further from fp64 than HF-X Megatron-X may be"),
    max_rel_diff: Optional[float] = typer.Option(
        None, "--max-rel-diff", help="Override: absolute bound on max |Megatron-X - fp64| / max |logit|"),
    min_top1: Optional[float] = typer.Option(None, "--min-top1",
                                             help="Override: top-1 agreement required at decisive positions"),
    max_mean_kl: Optional[float] = typer.Option(None, "--max-mean-kl",
                                                help="Override: absolute bound on mean KL(fp64 || Megatron-X)"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables"),
    report_file: Optional[Path] = typer.Option(None, "--report", help="Also write the report as JSON to this file"),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Scratch folder (shared by all ranks under torchrun)"),
    layers: bool = typer.Option(False, "--layers", help="Always print the per-layer table"),
):
    """Judge the Megatron model against the fp64 HF model, next to the HF model in the same dtype; exit 1 on
    failure. Megatron-X passes when its logits are about as close to the fp64 HF model's as HF-X's are
    (docs/parity.md). The HF side is streamed one layer at a time, so any model size fits one GPU (or the host).
    """
    import warnings

    warnings.filterwarnings("ignore")
    from ..parity import print_report, verify as run_verify

    overrides = {k: v for k, v in (("max_rel_diff", max_rel_diff), ("min_top1", min_top1),
                                   ("max_mean_kl", max_mean_kl)) if v is not None}
    env = world()
    if workdir is None and env.launched:
        import tempfile

        workdir = Path(tempfile.gettempdir()) / f"hetero-convert-verify-{env.run_id}"
    try:
        report = run_verify(hf, megatron, tp=tp, pp=pp, device=device, dtype=dtype, prompts=prompts, batch=batch,
                            seq_len=seq_len, seed=seed, thresholds=overrides, workdir=workdir, factor=factor,
                            reference_device=reference_device, text=False if random_tokens else None)
    except (HeteroConvertError, ValueError, RuntimeError, FileNotFoundError) as e:
        fail(str(e))
    if not env.coordinator:  # under the user's torchrun: rank 0 speaks for the job
        raise typer.Exit(0 if report.ok else 1)
    if as_json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        print_report(report, console, show_layers=layers)
    if report_file:
        report_file.write_text(json.dumps(report.as_dict(), indent=1))
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

    from ..demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        ok = run_demo(Path(workdir) if workdir else Path(tmp), tp, pp, console, verify)
    raise typer.Exit(0 if ok else 1)

@app.command()
def example(
    out_dir: Path = typer.Argument(..., help="Directory to write the example HF checkpoint into"),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights"),
):
    """Write the bundled example: a small HF checkpoint with every layer kind and a real tokenizer."""
    if out_dir.exists() and any(out_dir.iterdir()):
        fail(f"{out_dir} exists and is not empty")
    from ..fixtures import write_example

    path = write_example(out_dir, seed=seed)
    console.print(f"wrote the bundled heterogeneous example (random weights, a tokenizer trained on Python's docs) "
                  f"to {path}", highlight=False)


# ---- plan-convert -------------------------------------------------------------------------------------------


@app.command("plan-convert")
def plan_convert(
    path: Path = typer.Argument(..., help="A config.json, or a HF or Megatron checkpoint directory (no weights "
                                          "are read)"),
    ranks: int = typer.Option(..., "--ranks", help="Processes of the torchrun job (nodes x processes per node)"),
    tp: int = typer.Option(1, "--tp", help="Megatron tensor-parallel size"),
    pp: int = typer.Option(1, "--pp", help="Megatron pipeline-parallel size (hf-to-megatron)"),
    direction: str = typer.Option("hf-to-megatron", "--direction", metavar="hf-to-megatron|megatron-to-hf",
                                  help="Which conversion to plan"),
    dtype: str = typer.Option("keep", "--dtype", metavar=DTYPE_CHOICES, help="Output dtype (keep: the source's)"),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="HF shard size (megatron-to-hf)"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
):
    """Which process of a distributed conversion does what, and the bytes each reads and writes."""
    from ..convert import plan_conversion

    try:
        d = plan_conversion(path, ranks, tp=tp, pp=pp, direction=direction, dtype=dtype,
                            max_shard_size=max_shard_size)
    except HeteroConvertError as e:
        fail(str(e))
    if as_json:
        print(json.dumps(d, indent=1))
    else:
        print_plan_conversion(d)


# ---- prune --------------------------------------------------------------------------------------------------


@app.command()
def prune(
    src: Path = typer.Argument(..., help="HF Llama or DeciLM checkpoint to prune"),
    out: Path = typer.Argument(..., help="Directory for the pruned DeciLM checkpoint (and prune_scores.json)"),
    calib: Optional[list[Path]] = typer.Option(None, "--calib", help="Calibration text file (plain text); repeat "
                                               "for a mix of domains. Default: a mix made from Python's own docs "
                                               "and docstrings"),
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
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size of the --megatron checkpoint"),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel size of the --megatron checkpoint"),
    device: str = typer.Option("cpu", "--device", metavar="cpu|cuda", help="Where the scoring runs"),
    compute_dtype: Optional[str] = typer.Option(None, "--compute-dtype", metavar="fp32|bf16",
                                                help="Dtype of the scoring forwards (default: bf16 on cuda and on "
                                                     "CPUs with native bf16, else fp32)"),
    batch_size: int = typer.Option(4, "--batch-size", help="Calibration sequences per forward"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier prune output in OUT"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output (warnings still go to the report)"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
):
    """Prune into a smaller heterogeneous DeciLM model: per-layer variants scored by KL, exact knapsack search."""
    import warnings

    if megatron is not None:
        warn_megatron_version()

    warnings.filterwarnings("ignore")
    from ..pruning import PruneError, PruneOptions
    from ..pruning.progress import make_progress

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
            from ..pruning import prune as run_prune

            report = run_prune(src, out, texts, target=target, fraction=fraction, options=options,
                               reuse_scores=reuse_scores, scores_from=scores_from, megatron=megatron, tp=tp, pp=pp,
                               overwrite=overwrite, progress=progress)
    except (HeteroConvertError, PruneError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(report, indent=1))
        return
    print_prune_report(report, out)


if __name__ == "__main__":
    app()
