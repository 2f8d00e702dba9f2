"""Logits parity between the HF model and the real megatron-core GPTModel of a converted checkpoint.

The HF side is the transformers model (our DeciLM, or transformers' own Llama for Llama checkpoints) run
in this process; the Megatron side is megatron-core's GPTModel built from our spec at the requested TP/PP,
loaded with `dist_checkpointing.load` and run forward-only (through megatron's pipeline schedule when PP > 1)
in a torchrun job of TP*PP processes (`megatron/`). Both see the same tokens; every position that is
not padding is compared.

When parity fails it says where: the per-layer outputs of both models (forward hooks, aligned by global
layer index across pipeline stages) are compared, and the first layer whose difference exceeds the
tolerance is named.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .io.megatron_checkpoint import iteration_dir, read_plan as read_plan_from_megatron
from .plan import ModelPlan, load_config, load_plan

# Default thresholds, and why:
#  fp32: both sides compute in fp32 from the same weights; only summation order differs (TP splits, fused
#        vs unfused attention), which moves logits by ~1e-6 of their range. A mapping bug moves them by 0.1-1.4
#        of it, a wrong llama3 rope factor by ~1e-3. 1e-5 separates the two with margin, and the argmax must
#        agree everywhere.
#  bf16: rounding differs between the two implementations at every layer, so elementwise differences are
#        ~1e-2. Both bf16 models are judged against the fp32 HF model (the truth they both approximate):
#        Megatron-bf16 must be about as faithful to it as HF-bf16 is.
#        - KL: mean KL(HF-fp32 || Megatron-bf16) <= max(1e-3, 2 x mean KL(HF-fp32 || HF-bf16)). The 1e-3 bound
#          alone is below bf16's own noise on real models: on SmolLM2-135M, HF-bf16 vs HF-fp32 is 1.16e-3 and
#          Megatron-bf16 vs HF-fp32 1.11e-3 (CPU, docs/parity.md). A mapping bug gives 0.1 to 1.
#        - top-1: Megatron-bf16's agreement with HF-fp32 >= 0.99 x HF-bf16's agreement with HF-fp32, counted
#          at positions where the fp32 top-1 logit leads the runner-up by more than bf16 resolves (2^-6 of
#          max |logit|, a few ulps). Below that the order is rounding noise in either implementation; random-
#          weight models have many such near-ties. Raw agreement over all positions is reported too.
#        The direct HF-bf16 vs Megatron-bf16 metrics are reported as well.
DEFAULT_THRESHOLDS = {
    "fp32": {"max_rel_diff": 1e-5, "min_top1": 1.0, "max_mean_kl": None, "top1_margin": 0.0},
    "bf16": {"max_rel_diff": None, "min_top1": 0.99, "max_mean_kl": 1e-3, "top1_margin": 2.0**-6,
             "noise_factor": 2.0},
}
# Per-layer hidden-state tolerance (max |diff| / max |HF hidden|) used to localise a failure. In fp32 the
# per-layer noise is ~5e-7 (summation order); a llama3 factor of 8 instead of 16 moves the first attention
# layer's output by ~1e-4 at 24 positions, so the logits threshold itself is the right line.
LAYER_TOLERANCE = {"fp32": 1e-5, "bf16": 5e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class LayerDiff:
    layer: int
    kind: str
    rel_max_diff: float


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


def make_inputs(hf_dir: Path | None, vocab_size: int, prompts: Path | None = None, batch: int = 2,
                seq_len: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [b, s] and attention_mask [b, s] (right padding; rows of different lengths when b > 1).

    With a prompts file (one text per line), the checkpoint's tokenizer is used; otherwise seeded random ids.
    """
    if prompts is not None:
        from transformers import AutoTokenizer

        texts = [t for t in Path(prompts).read_text().splitlines() if t.strip()]
        if not texts:
            raise ValueError(f"{prompts}: no prompts")
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        rows = [tok(t, add_special_tokens=True)["input_ids"][:seq_len] for t in texts]
    else:
        g = torch.Generator().manual_seed(seed)
        # Lengths from seq_len down, so a batch really mixes lengths and exercises the padding path.
        lengths = [max(2, seq_len - (i * seq_len) // (2 * max(1, batch))) for i in range(batch)]
        rows = [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


# ---- the two sides -------------------------------------------------------------------------------------------


def load_hf_model(hf_dir: Path, dtype: str, device: str):
    """Our DeciLM for DeciLM checkpoints, transformers' own LlamaForCausalLM for Llama ones."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from . import hf as _register  # noqa: F401  (registers DeciLM with the Auto classes)

    hf_logging.disable_progress_bar()

    cfg = load_config(hf_dir)
    kwargs = {"dtype": DTYPES[dtype]}
    if cfg.get("model_type") == "llama":
        kwargs["attn_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=False, **kwargs)
    return model.to(device).eval()


@torch.no_grad()
def hf_forward(hf_dir: Path, ids: torch.Tensor, mask: torch.Tensor, dtype: str, device: str,
               hidden: bool = True) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    model = load_hf_model(hf_dir, dtype, device)
    outputs: dict[int, torch.Tensor] = {}
    hooks = []
    if hidden:
        for i, layer in enumerate(model.model.layers):
            def hook(module, args, out, i=i):
                outputs[i] = (out[0] if isinstance(out, tuple) else out).float().cpu()
            hooks.append(layer.register_forward_hook(hook))
    try:
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    logits = logits.float().cpu()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return logits, outputs


def megatron_forward(cases: list[tuple[ModelPlan, Path]], ids: torch.Tensor, mask: torch.Tensor, tp: int, pp: int,
                     dtype: str, device: str, workdir: Path, hidden: bool = True, timeout: float = 900.0) -> list[dict]:
    """Run every (plan, checkpoint) of one layout in a single torchrun job; return rank 0's outputs."""
    from .launch import run_under_torchrun

    workdir.mkdir(parents=True, exist_ok=True)
    torch.save({"input_ids": ids, "attention_mask": mask}, workdir / "inputs.pt")
    plans, ckpts, outs = [], [], []
    for k, (plan, ckpt) in enumerate(cases):
        p = workdir / f"plan{k}.json"
        p.write_text(json.dumps(plan.to_json()))
        plans.append(str(p))
        ckpts.append(str(ckpt))
        outs.append(str(workdir / f"out{k}.pt"))
    args = ["--plan-json", *plans, "--ckpt", *ckpts, "--out", *outs, "--tp", str(tp), "--pp", str(pp),
            "--dtype", dtype, "--device", device, "--input-ids", str(workdir / "inputs.pt")]
    if hidden:
        args.append("--hidden")
    if inside_torchrun():
        # Already one of TP*PP ranks (the user launched torchrun): run the worker in this process.
        from .launch import world
        from .megatron import worker

        size = world().size
        if size != tp * pp:
            raise ValueError(f"launched with {size} processes, but TP*PP = {tp * pp}")
        worker.main(args)
        if not world().coordinator:
            return []
    else:
        run_under_torchrun(args, nproc=tp * pp, timeout=timeout, log_file=workdir / "megatron.log")
    return [torch.load(o, weights_only=False) for o in outs]


# ---- comparison ----------------------------------------------------------------------------------------------


def compare_logits(ref: torch.Tensor, got: torch.Tensor, mask: torch.Tensor, top1_margin: float = 0.0) -> dict:
    """Metrics over every non-padding position. ref = HF, got = Megatron, both [b, s, V] fp32.

    `top1_agreement_decisive` counts only positions where HF's best logit leads its second by more than
    top1_margin * max |logit| (all positions when the margin is 0)."""
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
    decisive = (top2[:, 0] - top2[:, -1]) > top1_margin * scale if top1_margin > 0 else torch.ones_like(agree)
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "max_rel_diff": diff.max().item() / max(scale, 1e-30),
        "max_abs_logit": scale,
        "cosine_min": torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item(),
        "cosine_mean": torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item(),
        "top1_agreement": agree.double().mean().item(),
        "top1_agreement_decisive": agree[decisive].double().mean().item() if bool(decisive.any()) else 1.0,
        "decisive_fraction": decisive.double().mean().item(),
        "top5_overlap": overlap.mean().item(),
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
    }


def bf16_against_fp32(ref32: torch.Tensor, hf16: torch.Tensor, meg16: torch.Tensor, mask: torch.Tensor,
                      margin: float) -> dict:
    """How far each bf16 model is from the fp32 HF model: the noise floor the bf16 check is measured against."""
    hf = compare_logits(ref32, hf16, mask, margin)
    meg = compare_logits(ref32, meg16, mask, margin)
    return {
        "fp32ref_hf_bf16_kl_mean": hf["kl_mean"], "fp32ref_megatron_bf16_kl_mean": meg["kl_mean"],
        "fp32ref_hf_bf16_top1_decisive": hf["top1_agreement_decisive"],
        "fp32ref_megatron_bf16_top1_decisive": meg["top1_agreement_decisive"],
    }


def check_thresholds(metrics: dict, thresholds: dict) -> list[str]:
    out = []
    if "fp32ref_megatron_bf16_kl_mean" in metrics:  # bf16: judged against the fp32 model, see DEFAULT_THRESHOLDS
        floor = metrics["fp32ref_hf_bf16_kl_mean"]
        kl_bound = max(thresholds.get("max_mean_kl") or 0.0, thresholds.get("noise_factor", 2.0) * floor)
        if not metrics["fp32ref_megatron_bf16_kl_mean"] <= kl_bound:
            out.append(f"mean KL(HF-fp32 || Megatron-bf16) = {metrics['fp32ref_megatron_bf16_kl_mean']:.3g} > "
                       f"{kl_bound:.3g} (HF-bf16's own: {floor:.3g})")
        top1_bound = (thresholds.get("min_top1") or 0.0) * metrics["fp32ref_hf_bf16_top1_decisive"]
        if not metrics["fp32ref_megatron_bf16_top1_decisive"] >= top1_bound:
            out.append(f"top-1 agreement with HF-fp32 {metrics['fp32ref_megatron_bf16_top1_decisive']:.4f} < "
                       f"{top1_bound:.4f} (HF-bf16's own: {metrics['fp32ref_hf_bf16_top1_decisive']:.4f})")
        if not all(math.isfinite(v) for v in metrics.values()):
            out.append("non-finite logits")
        return out
    if thresholds.get("max_rel_diff") is not None and not metrics["max_rel_diff"] <= thresholds["max_rel_diff"]:
        out.append(f"max |diff| / max |logit| = {metrics['max_rel_diff']:.3g} > {thresholds['max_rel_diff']:g}")
    key = "top1_agreement_decisive" if thresholds.get("top1_margin") else "top1_agreement"
    if thresholds.get("min_top1") is not None and not metrics[key] >= thresholds["min_top1"]:
        out.append(f"top-1 agreement {metrics[key]:.4f} < {thresholds['min_top1']:g}"
                   + (f" (positions with a top-1 margin > {thresholds['top1_margin']:.3g} of max |logit|)"
                      if key != "top1_agreement" else ""))
    if thresholds.get("max_mean_kl") is not None and not metrics["kl_mean"] <= thresholds["max_mean_kl"]:
        out.append(f"mean KL(HF||Megatron) = {metrics['kl_mean']:.3g} > {thresholds['max_mean_kl']:g}")
    if not all(math.isfinite(v) for v in metrics.values()):
        out.append("non-finite logits")
    return out


def localise(plan: ModelPlan, ref: dict[int, torch.Tensor], got: dict[int, torch.Tensor], mask: torch.Tensor,
             tolerance: float) -> tuple[list[LayerDiff], int | None]:
    """Per-layer max |diff| / max |HF|, and the first layer above `tolerance` (None if none is)."""
    keep = mask.bool()
    rows, first = [], None
    for layer in plan.layers:
        i = layer.index
        if i not in ref or i not in got:
            continue
        a, b = ref[i][keep].double(), got[i][keep].double()
        rel = (a - b).abs().max().item() / max(a.abs().max().item(), 1e-30)
        rows.append(LayerDiff(i, layer.describe(), rel))
        if first is None and not rel <= tolerance:
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


def verify_many(pairs: list[tuple[Path, Path]], tp: int = 1, pp: int = 1, device: str = "cpu", dtype: str = "fp32",
                prompts: Path | None = None, batch: int = 2, seq_len: int = 32, seed: int = 0,
                thresholds: dict | None = None, workdir: Path | None = None,
                structural_check: bool = True) -> list[ParityReport]:
    """Verify several (HF dir, Megatron dir) pairs at one layout, with one torchrun launch."""
    if dtype not in DEFAULT_THRESHOLDS:
        raise ValueError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    th = dict(DEFAULT_THRESHOLDS[dtype], **(thresholds or {}))
    cases, plans = [], []
    for hf_dir, meg_dir in pairs:
        hf_plan = load_plan(hf_dir)
        it_dir = iteration_dir(meg_dir)
        meg_plan = read_plan_from_megatron(it_dir)
        if structural_check:
            diffs = same_model(hf_plan, meg_plan)
            if diffs:
                raise ValueError(f"{hf_dir} and {meg_dir} describe different models:\n  - " + "\n  - ".join(diffs))
        cases.append((meg_plan, it_dir))
        plans.append(meg_plan)
    vocab = min(p.vocab_size for p in plans)
    ids, mask = make_inputs(Path(pairs[0][0]), vocab, prompts, batch, seq_len, seed)
    from .launch import world

    rank0 = world().coordinator
    # HF first, then Megatron: on one GPU the two models never need memory at the same time.
    hf_out = [hf_forward(Path(h), ids, mask, dtype, device) for h, _ in pairs] if rank0 else []
    # bf16 is judged against the fp32 HF model (see DEFAULT_THRESHOLDS): its logits, no hidden states.
    hf_ref32 = [hf_forward(Path(h), ids, mask, "fp32", device, hidden=False)[0] for h, _ in pairs] \
        if rank0 and dtype == "bf16" else [None] * len(pairs)
    with tempfile.TemporaryDirectory() as tmp:
        # Under a user's torchrun every rank must use the same folder; the caller passes one (--workdir).
        meg_out = megatron_forward(cases, ids, mask, tp, pp, dtype, device, Path(workdir or tmp))
    if not rank0:
        return []
    reports = []
    for (hf_dir, meg_dir), plan, (ref_logits, ref_hidden), ref32, got in zip(pairs, plans, hf_out, hf_ref32, meg_out):
        metrics = compare_logits(ref_logits, got["logits"], mask, th.get("top1_margin") or 0.0)
        if ref32 is not None:
            metrics.update(bf16_against_fp32(ref32, ref_logits, got["logits"], mask, th.get("top1_margin") or 0.0))
        failures = check_thresholds(metrics, th)
        layers, first = localise(plan, ref_hidden, got.get("hidden", {}), mask, LAYER_TOLERANCE[dtype])
        if failures:
            if first is not None:
                failures.append(f"first diverging layer: {first} ({plan.layers[first].describe()})")
            else:
                failures.append("all layer outputs agree: the difference is in the final norm or output layer")
        reports.append(ParityReport(str(hf_dir), str(meg_dir), tp, pp, device, dtype, ids.shape[0], ids.shape[1],
                                    int(mask.sum()), metrics, th, failures, layers, first if failures else None))
    return reports


def verify(hf_dir: Path, megatron_dir: Path, **kw) -> ParityReport | None:
    """One pair; None on the non-zero ranks of a torchrun the user started."""
    reports = verify_many([(Path(hf_dir), Path(megatron_dir))], **kw)
    return reports[0] if reports else None


def print_report(r: ParityReport, console, show_layers: bool = False) -> None:
    from rich.table import Table

    t = Table(title=f"HF vs Megatron, TP={r.tp} PP={r.pp} {r.device} {r.dtype}, {r.positions} positions")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in r.metrics.items():
        t.add_row(k, f"{v:.4g}")
    console.print(t)
    if show_layers or not r.ok:
        lt = Table(title="per-layer output: max |diff| / max |HF|")
        lt.add_column("layer", justify="right")
        lt.add_column("kind")
        lt.add_column("rel diff", justify="right")
        for row in r.layers:
            mark = " <- first over tolerance" if row.layer == r.first_bad_layer else ""
            lt.add_row(str(row.layer), row.kind, f"{row.rel_max_diff:.3g}{mark}")
        console.print(lt)
    if r.ok:
        console.print("[green]PASS[/] within thresholds " + json.dumps({k: v for k, v in r.thresholds.items() if v is not None}))
    else:
        for f in r.failures:
            console.print(f"[red]FAIL[/] {f}", highlight=False)


def inside_torchrun() -> bool:
    from .launch import world

    return world().launched
