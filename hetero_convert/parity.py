"""`verify`: logits parity between the HF model and megatron-core's GPTModel of a converted checkpoint, against fp64.

The Megatron side is megatron-core's GPTModel built from our spec at the requested TP/PP, loaded with
`dist_checkpointing.load` and run forward-only (through megatron's pipeline schedule when PP > 1) in a torchrun
job of TP*PP processes (`megatron/`), or in the ranks of the user's own torchrun. The HF side is the HF
model streamed one layer at a time (`reference.py`), run in fp64 and in the dtype X under test in one pass. Both
see the same tokens; every position that is not padding counts.

The yardstick (docs/parity.md has the measurements behind it): the fp64 HF model is the truth; HF-X's distance
from it is the noise X costs on this model and these tokens. Megatron-X passes when it is about as faithful:
  - max |Megatron-X - fp64| / max |fp64 logit|  <=  max(FACTOR x the same for HF-X, floor),
  - mean KL(fp64 || Megatron-X)                 <=  max(FACTOR^2 x the same for HF-X, KL floor),
  - top-1 equal to fp64's wherever fp64's lead over the runner-up exceeds twice the allowed error;
and the same first rule, applied to every layer's output, localises a failure: the first layer whose output is
further from fp64 than FACTOR x HF-X's (or the floor) is named. Only the judgement of the logits decides.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import VerifyError
from .io.dcp import DCPReader
from .io.megatron_checkpoint import iteration_dir, read_plan as read_plan_from_megatron
from .launch import share_from_coordinator, world
from .plan import ModelPlan, load_plan
from .reference import StreamOutput, reference_forward

DTYPES = ("fp32", "bf16", "fp16")
# How much further from fp64 than HF-X Megatron-X may be, in logit (and hidden-state) error. Measured ratios on
# correct conversions stay below ~1.4 (docs/parity.md), a mapping bug gives 10^2-10^6; KL is quadratic in the
# logit error, hence FACTOR^2 on KL.
FACTOR = 2.0


def floors(dtype: str) -> dict:
    """The absolute floors, so that an HF side that happens to be (nearly) exact does not demand zero:
    two units in the last place of X at the largest value (relative), and the KL that moving logits of order
    one by one unit in the last place costs (1/2 eps^2)."""
    eps = torch.finfo({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]).eps
    return {"floor_rel": 2 * eps, "floor_kl": 0.5 * eps * eps}


@dataclass
class LayerDiff:
    layer: int
    kind: str
    hf_rel: float  # max |HF-X - fp64| / max |fp64| of this layer's output
    megatron_rel: float  # the same for Megatron-X
    bound: float  # max(FACTOR x hf_rel, floor)

    @property
    def ok(self) -> bool:
        return self.megatron_rel <= self.bound


@dataclass
class ParityReport:
    hf: str
    megatron: str
    tp: int
    pp: int
    device: str
    dtype: str
    batch: int
    seq_len: int
    positions: int
    prompts: str
    metrics: dict
    thresholds: dict
    failures: list[str]
    layers: list[LayerDiff] = field(default_factory=list)
    first_bad_layer: int | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


# ---- inputs ------------------------------------------------------------------------------------------------


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def has_tokenizer(hf_dir: Path | None) -> bool:
    return hf_dir is not None and any((Path(hf_dir) / f).is_file() for f in TOKENIZER_FILES)


def sample_texts(n: int, seed: int = 0) -> list[str]:
    """n passages of English prose from Python's own documentation (pydoc_data, in every CPython install)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(keys), generator=g)[:n].tolist()
    return [" ".join(topics[keys[k]].split())[:2000] for k in picks]


def make_inputs(hf_dir: Path | None, vocab_size: int, prompts: Path | None = None, batch: int = 2,
                seq_len: int = 32, seed: int = 0, text: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """input_ids [b, s], attention_mask [b, s] (right padding, rows of different lengths when b > 1), and a
    description of where the tokens came from.

    With a prompts file (one text per line), its texts; otherwise, when the checkpoint has a tokenizer (and
    `text` is not False), English text from Python's documentation; otherwise seeded random ids.
    """
    use_text = prompts is not None or (text is not False and has_tokenizer(hf_dir))
    # Lengths from seq_len down, so a batch really mixes lengths and exercises the padding path.
    lengths = [max(2, seq_len - (i * seq_len) // (2 * max(1, batch))) for i in range(batch)]
    if use_text:
        from transformers import AutoTokenizer

        from . import hf as _register  # noqa: F401  (the config's model type, so no remote code is asked for)

        if prompts is not None:
            texts = [t for t in Path(prompts).read_text().splitlines() if t.strip()]
            if not texts:
                raise ValueError(f"{prompts}: no prompts")
            source, cut = f"prompts from {prompts}", [seq_len] * len(texts)
        else:
            texts, source, cut = sample_texts(batch, seed), "English text (pydoc_data) through the tokenizer", lengths
        tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=False)
        rows = [tok(t, add_special_tokens=True)["input_ids"][:n] for t, n in zip(texts, cut)]
        top = max(max(r) for r in rows if r)
        if top >= vocab_size:
            raise ValueError(f"the tokenizer of {hf_dir} gives id {top}, outside the model's vocabulary of {vocab_size}")
    else:
        g = torch.Generator().manual_seed(seed)
        rows = [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]
        source = f"random ids (seed {seed})"
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask, source


# ---- the Megatron side ---------------------------------------------------------------------------------------


def megatron_forward(cases: list[tuple[ModelPlan, Path]], ids: torch.Tensor, mask: torch.Tensor, tp: int, pp: int,
                     dtype: str, device: str, workdir: Path, hidden: bool = True, timeout: float = 900.0) -> list[dict]:
    """Run every (plan, checkpoint) of one layout in a single torchrun job; return rank 0's outputs."""
    from .launch import run_under_torchrun

    workdir.mkdir(parents=True, exist_ok=True)
    # Under the user's torchrun every rank writes its own inputs (ranks of a node share the folder).
    rank = world().rank
    inputs = workdir / f"inputs-{rank}.pt"
    torch.save({"input_ids": ids, "attention_mask": mask}, inputs)
    plans, ckpts, outs = [], [], []
    for k, (plan, ckpt) in enumerate(cases):
        p = workdir / f"plan{k}-{rank}.json"
        p.write_text(json.dumps(plan.to_json()))
        plans.append(str(p))
        ckpts.append(str(ckpt))
        outs.append(str(workdir / f"out{k}.pt"))
    args = ["--plan-json", *plans, "--ckpt", *ckpts, "--out", *outs, "--tp", str(tp), "--pp", str(pp),
            "--dtype", dtype, "--device", device, "--input-ids", str(inputs)]
    if hidden:
        args.append("--hidden")
    if inside_torchrun():
        # Already one of TP*PP ranks (the user launched torchrun): run the worker in this process.
        from .megatron import worker

        size = world().size
        if size != tp * pp:
            raise ValueError(f"launched with {size} processes, but TP*PP = {tp * pp}")
        from .io.dcp import dcp_failures_named

        with dcp_failures_named(", ".join(ckpts)):  # DCP's CheckpointException: one line naming the checkpoint
            worker.main(args)
        if device == "cuda":
            torch.cuda.empty_cache()  # the reference runs next on this GPU
        if not world().coordinator:
            return []
    else:
        try:
            run_under_torchrun(args, nproc=tp * pp, timeout=timeout, log_file=workdir / "megatron.log")
        except RuntimeError as e:
            from .errors import VerifyError
            from .launch import first_error

            raise VerifyError(f"{', '.join(ckpts)}: megatron-core could not load or run it at TP={tp} PP={pp}: "
                              f"{first_error(workdir / 'megatron.log') or str(e).splitlines()[0]}") from e
    return [torch.load(o, weights_only=False) for o in outs]


# ---- comparison ----------------------------------------------------------------------------------------------


def compare_logits(ref: torch.Tensor, got: torch.Tensor, mask: torch.Tensor, top1_margin: float = 0.0) -> dict:
    """Metrics of `got` against `ref` over every non-padding position; both [b, s, V].

    `top1_agreement_decisive` counts only positions where ref's best logit leads its second by more than
    top1_margin (absolute; all positions when it is 0)."""
    keep = mask.bool()
    a, b = ref[keep].double(), got[keep].double()  # [positions, V]
    diff = (a - b).abs()
    scale = a.abs().max().item()
    logp, logq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    top5_a, top5_b = a.topk(min(5, a.shape[-1]), -1).indices, b.topk(min(5, b.shape[-1]), -1).indices
    overlap = torch.tensor([len(set(x.tolist()) & set(y.tolist())) / x.numel() for x, y in zip(top5_a, top5_b)])
    agree = a.argmax(-1) == b.argmax(-1)
    top2 = a.topk(min(2, a.shape[-1]), -1).values
    decisive = (top2[:, 0] - top2[:, -1]) > top1_margin if top1_margin > 0 else torch.ones_like(agree)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "max_rel_diff": diff.max().item() / max(scale, 1e-30),
        "max_abs_logit": scale,
        "cosine_min": cos.min().item(),
        "cosine_mean": cos.mean().item(),
        "top1_agreement": agree.double().mean().item(),
        "top1_agreement_decisive": agree[decisive].double().mean().item() if bool(decisive.any()) else 1.0,
        "decisive_fraction": decisive.double().mean().item(),
        "top5_overlap": overlap.mean().item(),
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
    }


def relative_distance(ref: torch.Tensor, got: torch.Tensor, keep: torch.Tensor) -> float:
    """max |got - ref| / max |ref| over the kept positions."""
    a, b = ref[keep].double(), got[keep].double()
    return (a - b).abs().max().item() / max(a.abs().max().item(), 1e-30)


def judge(ref64: torch.Tensor, hf: torch.Tensor, meg: torch.Tensor, mask: torch.Tensor, dtype: str,
          factor: float = FACTOR, overrides: dict | None = None) -> tuple[dict, dict, list[str]]:
    """(metrics, thresholds, failures) of the logits of HF-X and Megatron-X, both measured from fp64.

    `overrides` may fix max_rel_diff / max_mean_kl (absolute bounds replacing the calibrated ones) or
    min_top1 (the agreement required at decisive positions, default 1)."""
    overrides = overrides or {}
    fl = floors(dtype)
    h = compare_logits(ref64, hf, mask)
    m = compare_logits(ref64, meg, mask)
    scale = h["max_abs_logit"]
    rel_bound = overrides.get("max_rel_diff", max(factor * h["max_rel_diff"], fl["floor_rel"]))
    kl_bound = overrides.get("max_mean_kl", max(factor * factor * h["kl_mean"], fl["floor_kl"]))
    # Where fp64's lead exceeds twice the allowed error, no model within the bound can change the top-1.
    margin = 2 * rel_bound * scale
    hd = compare_logits(ref64, hf, mask, margin)
    md = compare_logits(ref64, meg, mask, margin)
    min_top1 = overrides.get("min_top1", 1.0)
    metrics = {
        "fp64_max_abs_logit": scale,
        "hf_fp64_max_rel_diff": h["max_rel_diff"], "megatron_fp64_max_rel_diff": m["max_rel_diff"],
        "hf_fp64_kl_mean": h["kl_mean"], "megatron_fp64_kl_mean": m["kl_mean"],
        "hf_fp64_top1": h["top1_agreement"], "megatron_fp64_top1": m["top1_agreement"],
        "hf_fp64_top1_decisive": hd["top1_agreement_decisive"],
        "megatron_fp64_top1_decisive": md["top1_agreement_decisive"],
        "decisive_fraction": md["decisive_fraction"],
    }
    thresholds = {"factor": factor, "kl_factor": factor * factor, **fl, "max_rel_diff": rel_bound,
                  "max_mean_kl": kl_bound, "decisive_margin": margin, "min_top1": min_top1}
    failures = []
    if not m["max_rel_diff"] <= rel_bound:
        failures.append(f"max |Megatron-{dtype} - fp64| / max |logit| = {m['max_rel_diff']:.3g} > {rel_bound:.3g} "
                        f"(HF-{dtype}'s own: {h['max_rel_diff']:.3g})")
    if not m["kl_mean"] <= kl_bound:
        failures.append(f"mean KL(fp64 || Megatron-{dtype}) = {m['kl_mean']:.3g} > {kl_bound:.3g} "
                        f"(HF-{dtype}'s own: {h['kl_mean']:.3g})")
    if not md["top1_agreement_decisive"] >= min_top1:
        failures.append(f"top-1 agreement with fp64 {md['top1_agreement_decisive']:.4f} < {min_top1:g} at the "
                        f"{md['decisive_fraction']:.0%} of positions whose lead exceeds {margin:.3g}")
    if not all(math.isfinite(v) for v in (*h.values(), *m.values())):
        failures.append("non-finite logits")
    return metrics, thresholds, failures


def localise(plan: ModelPlan, ref64: dict[int, torch.Tensor], hf: dict[int, torch.Tensor],
             meg: dict[int, torch.Tensor], mask: torch.Tensor, dtype: str,
             factor: float = FACTOR) -> tuple[list[LayerDiff], int | None]:
    """Every layer's output judged like the logits: Megatron-X's distance from fp64 against
    max(factor x HF-X's, floor). Returns the rows and the first layer out of bound (None if none is)."""
    keep = mask.bool()
    floor = floors(dtype)["floor_rel"]
    rows, first = [], None
    for layer in plan.layers:
        i = layer.index
        if i not in ref64 or i not in hf or i not in meg:
            continue
        h, m = relative_distance(ref64[i], hf[i], keep), relative_distance(ref64[i], meg[i], keep)
        row = LayerDiff(i, layer.describe(), h, m, max(factor * h, floor))
        rows.append(row)
        if first is None and not row.ok:
            first = i
    return rows, first


def same_model(hf_plan: ModelPlan, meg_plan: ModelPlan) -> list[str]:
    """Structural differences between the HF config and the Megatron checkpoint's description."""
    out = []
    for field_name in ("hidden_size", "num_attention_heads", "vocab_size", "tie_word_embeddings", "rope_theta",
                       "rope_scaling", "rms_norm_eps"):
        if getattr(hf_plan, field_name) != getattr(meg_plan, field_name):
            out.append(f"{field_name}: HF {getattr(hf_plan, field_name)!r} vs Megatron {getattr(meg_plan, field_name)!r}")
    if len(hf_plan.layers) != len(meg_plan.layers):
        out.append(f"num layers: HF {len(hf_plan.layers)} vs Megatron {len(meg_plan.layers)}")
    for a, b in zip(hf_plan.layers, meg_plan.layers):
        if (a.attention, a.ffn.kind, a.ffn.width) != (b.attention, b.ffn.kind, b.ffn.width):
            out.append(f"layer {a.index}: HF {a.describe()} vs Megatron {b.describe()}")
    return out


def report_for(hf_dir, meg_dir, plan: ModelPlan, ref: dict[str, StreamOutput], got: dict, mask: torch.Tensor,
               dtype: str, tp: int, pp: int, device: str, prompts: str, factor: float = FACTOR,
               overrides: dict | None = None) -> ParityReport:
    """Judge one pair: HF-X and Megatron-X against the fp64 stream, logits then layers."""
    metrics, thresholds, failures = judge(ref["fp64"].logits, ref[dtype].logits, got["logits"], mask, dtype, factor,
                                          overrides)
    metrics.update({f"direct_{k}": v for k, v in compare_logits(ref[dtype].logits, got["logits"], mask).items()})
    layers, first = localise(plan, ref["fp64"].hidden, ref[dtype].hidden, got.get("hidden", {}), mask, dtype, factor)
    metrics["max_layer_ratio"] = max((l.megatron_rel / max(l.bound / factor, 1e-300) for l in layers), default=0.0)
    if failures:
        if first is not None:
            row = next(l for l in layers if l.layer == first)
            failures.append(f"first diverging layer: {first} ({plan.layers[first].describe()}): "
                            f"{row.megatron_rel:.3g} from fp64 vs HF-{dtype}'s {row.hf_rel:.3g}")
        else:
            failures.append("every layer's output is within bound: the difference is in the final norm or output layer")
    ids_shape = ref["fp64"].logits.shape
    return ParityReport(str(hf_dir), str(meg_dir), tp, pp, device, dtype, ids_shape[0], ids_shape[1],
                        int(mask.sum()), prompts, metrics, thresholds, failures, layers, first if failures else None)


def check_before_loading(it_dir: Path, plan: ModelPlan) -> None:
    """What megatron-core's loader must not be given unchecked: it unpickles `.metadata` with plain pickle and
    the common state and objects with torch.load's defaults, so they pass the restricted readers first
    (`validate_dcp_metadata`); and every stored tensor must be the plan's, as for megatron-to-hf. Every
    process that loads runs this itself."""
    from .convert.to_hf import check_megatron_keys
    from .io.dcp import DCPReader
    from .io.megatron_checkpoint import read_description
    from .io.safe_pickle import validate_dcp_metadata
    from .mappings import bind

    validate_dcp_metadata(it_dir)
    check_megatron_keys(DCPReader(it_dir), bind(plan), read_description(it_dir), plan)


def verify_many(pairs: list[tuple[Path, Path]], tp: int = 1, pp: int = 1, device: str = "cpu", dtype: str = "fp32",
                prompts: Path | None = None, batch: int = 2, seq_len: int = 32, seed: int = 0,
                thresholds: dict | None = None, workdir: Path | None = None, structural_check: bool = True,
                factor: float = FACTOR, reference_device: str | None = None,
                text: bool | None = None) -> list[ParityReport]:
    """Verify several (HF dir, Megatron dir) pairs at one layout, with one torchrun launch.

    `thresholds` may hold absolute overrides (max_rel_diff, max_mean_kl, min_top1); `reference_device` is
    where the streamed HF model runs (default: `device`)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cases, plans = [], []
    for hf_dir, meg_dir in pairs:
        hf_plan = load_plan(hf_dir)
        it_dir = iteration_dir(meg_dir)
        meg_plan = read_plan_from_megatron(it_dir)
        if DCPReader(it_dir).view_stacked_layers(meg_plan.num_layers):
            raise VerifyError(f"{meg_dir}: its layers are stored stacked (decoder.layers.X [L, ...]), as megatron-core "
                              f"saves a homogeneous model such as a Megatron-LM Llama run; verify builds the "
                              f"heterogeneous GPTModel, which loads per-layer keys. Re-lay it out first "
                              f"(hetero-convert megatron-to-megatron {meg_dir} OUT) or verify its megatron-to-hf export")
        check_before_loading(it_dir, meg_plan)
        if structural_check:
            diffs = same_model(hf_plan, meg_plan)
            if diffs:
                raise ValueError(f"{hf_dir} and {meg_dir} describe different models:\n  - " + "\n  - ".join(diffs))
        cases.append((meg_plan, it_dir))
        plans.append(meg_plan)
    vocab = min(p.vocab_size for p in plans)
    ids, mask, source = make_inputs(Path(pairs[0][0]), vocab, prompts, batch, seq_len, seed, text)
    # Megatron first: a checkpoint that does not load fails before the long reference pass, and under the
    # user's torchrun the other ranks are done before rank 0 starts the reference alone.
    with tempfile.TemporaryDirectory() as tmp:
        # Under a user's torchrun every rank must use the same folder; the caller passes one (--workdir).
        meg_out = megatron_forward(cases, ids, mask, tp, pp, dtype, device, Path(workdir or tmp))
    reports, refs = [], {}
    for (hf_dir, meg_dir), plan, got in zip(pairs, plans, meg_out):
        key = Path(hf_dir).resolve()
        if key not in refs:  # several Megatron checkpoints judged against one HF model: one reference pass
            refs[key] = reference_forward(hf_dir, ids, mask, ("fp64", dtype), reference_device or device)
        ref = refs[key]
        reports.append(report_for(hf_dir, meg_dir, plan, ref, got, mask, dtype, tp, pp, device, source, factor,
                                  thresholds))
    # Under the user's torchrun, rank 0 judged alone: every rank gets its reports.
    return share_from_coordinator(reports, "verify") if world().launched else reports


def verify(hf_dir: Path, megatron_dir: Path, **kw) -> ParityReport:
    """One pair; under the user's own torchrun, every rank returns the report rank 0 made."""
    return verify_many([(Path(hf_dir), Path(megatron_dir))], **kw)[0]


def print_report(r: ParityReport, console, show_layers: bool = False) -> None:
    from rich.table import Table

    x = r.dtype
    t = Table(title=f"HF-{x} and Megatron-{x} against the fp64 HF model: TP={r.tp} PP={r.pp} {r.device}, "
                    f"{r.positions} positions of {r.prompts}")
    t.add_column("distance from fp64")
    t.add_column(f"HF-{x}", justify="right")
    t.add_column(f"Megatron-{x}", justify="right")
    t.add_column("Megatron bound", justify="right")
    m, th = r.metrics, r.thresholds
    t.add_row("max |diff| / max |logit|", f"{m['hf_fp64_max_rel_diff']:.3g}", f"{m['megatron_fp64_max_rel_diff']:.3g}",
              f"{th['max_rel_diff']:.3g}")
    t.add_row("mean KL(fp64 || X)", f"{m['hf_fp64_kl_mean']:.3g}", f"{m['megatron_fp64_kl_mean']:.3g}",
              f"{th['max_mean_kl']:.3g}")
    t.add_row(f"top-1 at decisive positions ({m['decisive_fraction']:.0%})", f"{m['hf_fp64_top1_decisive']:.4f}",
              f"{m['megatron_fp64_top1_decisive']:.4f}", f">= {th['min_top1']:g}")
    t.add_row("top-1, all positions", f"{m['hf_fp64_top1']:.4f}", f"{m['megatron_fp64_top1']:.4f}", "")
    console.print(t)
    console.print(f"HF-{x} vs Megatron-{x} directly: max |diff| / max |logit| {m['direct_max_rel_diff']:.3g}, "
                  f"mean KL {m['direct_kl_mean']:.3g}, top-1 {m['direct_top1_agreement']:.4f}", highlight=False)
    if show_layers or not r.ok:
        lt = Table(title="per-layer output: max |X - fp64| / max |fp64|")
        for c in ("layer", "kind", f"HF-{x}", f"Megatron-{x}", "bound"):
            lt.add_column(c, justify="left" if c == "kind" else "right")
        for row in r.layers:
            mark = " <- first over bound" if row.layer == r.first_bad_layer else ""
            lt.add_row(str(row.layer), row.kind, f"{row.hf_rel:.3g}", f"{row.megatron_rel:.3g}{mark}",
                       f"{row.bound:.3g}")
        console.print(lt)
    if r.ok:
        console.print(f"[green]PASS[/] Megatron-{x} is within {th['factor']:g}x HF-{x}'s distance from fp64")
    else:
        for f in r.failures:
            console.print(f"[red]FAIL[/] {f}", highlight=False)


def inside_torchrun() -> bool:
    return world().launched
