"""The variants each layer may take, the calibration statistics they need, and how their weights are made.

Every variant is initialised from the parent without training:
  attention  keep | fewer KV heads (each n_heads_in_group dividing the head count), the KV heads a new head
             serves merged by a weighted average, weighted by measured importance | a linear replacement
             x + W·RMSNorm(x) with W fitted by least squares | removed
  FFN        keep | narrower SwiGLU (widths the DeciLM ffn_mult rule can express), the most important
             channels kept and down_proj refitted by least squares | a linear replacement | removed
"Keep" returns the parent's own tensors (the same objects), so a kept layer is the parent bit for bit.

Tensors are named as in the HF checkpoint without the `model.layers.{i}.` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..hf.modeling_decilm import DeciLMAttention, DeciLMMLP
from ..plan import (
    FFN,
    GQA,
    LINEAR,
    NONE,
    SWIGLU,
    Attention,
    LayerPlan,
    ModelPlan,
)
from ..kinds.swiglu import default_widths as default_ffn_widths  # noqa: F401  (re-exported for callers)

ATTN_KEYS = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
             "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.linear_attn.weight")
FFN_KEYS = ("post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
            "mlp.down_proj.weight", "mlp.linear_mlp.weight")


@dataclass(frozen=True)
class Recipe:
    """How reduced variants are initialised. The defaults are ours; baselines switch them off."""

    # "output": mean(a_j^2) * |down[:, j]|^2, the expected squared contribution of channel j to the FFN output;
    # "activation": mean(a_j^2) alone (Minitron-style activation importance).
    ffn_importance: str = "output"
    # Refit down_proj on the kept channels so they best reproduce the full FFN output (least squares).
    ffn_refit: bool = True
    # "importance": merged KV heads weighted by the measured output share of the query heads they serve;
    # "mean": plain average (GQA-paper mean pooling).
    kv_merge: str = "importance"
    # Ridge of the linear replacements' least squares, relative to the mean diagonal of the Gram matrix.
    ridge: float = 1e-3
    # Ridge of the down_proj refit, pulling towards the parent's own columns rather than towards zero: with
    # few calibration tokens per kept channel a plain fit overfits (measured on SmolLM2: held-out error of
    # the FFN output 25-35% below no refit at 0.1, and far worse than no refit with a tiny ridge on 1k tokens).
    refit_ridge: float = 0.1
    # Cross-validation of both ridges on tokens the fits never saw (the held-back scoring tokens): each fit is
    # solved for every value below and the one with the lowest held-out error is kept; None = no refit.
    cv: bool = True
    refit_ridges: tuple = (0.1, 0.3, 1.0, None)
    linear_ridges: tuple = (1e-4, 1e-3, 1e-2, 1e-1)
    cv_tokens: int = 512  # held-out tokens the ridge errors are measured on (evenly spaced among the held-back)


# ---- which variants exist ------------------------------------------------------------------------------------


def attention_options(plan: ModelPlan, layer: LayerPlan) -> list[Attention]:
    """Keep first, then the cheaper variants the layer's attention kind allows (kinds/: fewer KV heads, most
    first, then linear, then removed)."""
    a = layer.attention
    return [a] + a.spec.cheaper_variants(plan, a)


def ffn_options(plan: ModelPlan, layer: LayerPlan, widths: list[int] | None = None, max_widths: int = 8) -> list[FFN]:
    """Keep first, then the cheaper variants the layer's FFN kind allows (kinds/: narrower widths, widest
    first, then linear, then removed)."""
    f = layer.ffn
    return [f] + f.spec.cheaper_variants(plan, f, widths, max_widths)


def attention_name(a: Attention, parent: Attention) -> str:
    if a == parent:
        return "keep"
    return {GQA: f"kv{a.num_kv_heads}", LINEAR: "linear", NONE: "none"}[a.kind]


def ffn_name(f: FFN, parent: FFN) -> str:
    if f.kind == parent.kind and f.width == parent.width:
        return "keep"
    return {SWIGLU: f"w{f.width}", LINEAR: "linear", NONE: "none"}[f.kind]


# ---- calibration statistics ----------------------------------------------------------------------------------


class LeastSquares:
    """Running X^T X, X^T Y and |Y|^2 for fitting Y ~ X W^T, accumulated batch by batch (never all X at once).
    Products are taken in the activations' dtype and summed in `dtype` (float64)."""

    def __init__(self, n_in: int, n_out: int, dtype: torch.dtype, device):
        self.xtx = torch.zeros(n_in, n_in, dtype=dtype, device=device)
        self.xty = torch.zeros(n_in, n_out, dtype=dtype, device=device)
        self.yty = 0.0
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        y = y.reshape(-1, y.shape[-1])
        if x.dtype not in (torch.float32, torch.float64):
            x, y = x.float(), y.float()
        self.xtx += (x.T @ x).to(self.xtx.dtype)
        self.xty += (x.T @ y).to(self.xty.dtype)
        self.yty += y.double().pow(2).sum().item()
        self.count += x.shape[0]

    def solve(self, ridge: float) -> torch.Tensor:
        """W [out, in] minimising |X W^T - Y|^2 + lambda |W|^2, lambda = ridge * mean(diag(X^T X))."""
        return ridge_solve(self.xtx, self.xty, ridge).T.contiguous()

    def error(self, w: torch.Tensor) -> float:
        """|X W^T - Y|^2 / |Y|^2 on the accumulated data, from the sums alone."""
        w = w.to(self.xtx)
        sq = (w @ self.xtx * w).sum() - 2 * (w * self.xty.T).sum() + self.yty
        return max(sq.item(), 0.0) / max(self.yty, 1e-30)


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float, prior: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_B |X B - Y|^2 + lambda |B - prior|^2 = (G + lambda I)^-1 (X^T Y + lambda prior), in float64;
    lambda = ridge x mean(diag G), so the ridge is scale-free. No prior: shrink towards zero."""
    g = gram.to(torch.float64)
    lam = ridge * g.diagonal().mean().clamp_min(1e-30)
    g = g + lam * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    rhs = rhs.to(torch.float64)
    if prior is not None:
        rhs = rhs + lam * prior.to(rhs)
    return torch.linalg.solve(g, rhs)


@dataclass
class LayerStats:
    attn_ls: LeastSquares | None = None
    head_gram: torch.Tensor | None = None  # [heads, head_dim, head_dim]: each head's output Gram, before o_proj
    head_importance: torch.Tensor | None = None  # per query head: summed squared output contribution
    ffn_ls: LeastSquares | None = None
    act_sq: torch.Tensor | None = None  # per FFN channel: summed a_j^2
    act_gram: torch.Tensor | None = None  # A^T A over calibration tokens
    tokens: int = 0
    # Held-out statistics keep the samples themselves (few tokens; errors are computed from them directly):
    # attn_x/attn_y, ffn_x/ffn_y, acts (the FFN's channel activations).
    samples: dict = field(default_factory=dict)


class StatsRecorder:
    """Forward hooks on one parent layer that accumulate, while the layer runs its own forward, what the
    variants are fitted from: no second computation of the layer, and exactly the layer's own arithmetic.

    Attention: the map RMSNorm(x) -> attention output, and each query head's share of the output.
    FFN: the map RMSNorm(h) -> FFN output, each channel's summed squared activation and the channels' Gram
    matrix (for refitting down_proj on a subset of channels).
    """

    def __init__(self, layer, want_gram: bool = True, acc_dtype: torch.dtype = torch.float64,
                 samples: bool = False):
        self.layer, self.want_gram, self.acc, self.keep_samples = layer, want_gram, acc_dtype, samples
        self.stats = LayerStats()
        self.handles = []
        attn, mlp = layer.self_attn, layer.mlp
        if attn is not None:
            self.handles.append(attn.register_forward_hook(self._attn))
            if isinstance(attn, DeciLMAttention):
                self.handles.append(attn.o_proj.register_forward_pre_hook(self._heads))
        if mlp is not None:
            self.handles.append(mlp.register_forward_hook(self._ffn))
            if isinstance(mlp, DeciLMMLP):
                self.handles.append(mlp.down_proj.register_forward_pre_hook(self._acts))

    def _keep(self, name, t):
        t = t.reshape(-1, t.shape[-1]).float()
        self.stats.samples.setdefault(name, []).append(t)

    def _attn(self, module, args, out):
        x = args[0]
        st = self.stats
        st.tokens += x.shape[0] * x.shape[1]
        if self.keep_samples:
            self._keep("attn_x", x), self._keep("attn_y", out)
            return
        if st.attn_ls is None:
            st.attn_ls = LeastSquares(x.shape[-1], out.shape[-1], self.acc, x.device)
        st.attn_ls.add(x, out)

    def _heads(self, module, args):
        if self.keep_samples:
            return
        o = args[0]  # [b, s, heads * head_dim]
        attn = self.layer.self_attn
        heads = o.reshape(-1, attn.num_heads, attn.head_dim).float().transpose(0, 1)
        g = torch.bmm(heads.transpose(1, 2), heads).to(self.acc)  # per-head Gram [n, d, d]
        self.stats.head_gram = g if self.stats.head_gram is None else self.stats.head_gram + g

    def _ffn(self, module, args, out):
        x = args[0]
        st = self.stats
        if self.keep_samples:
            self._keep("ffn_x", x), self._keep("ffn_y", out)
            return
        if st.ffn_ls is None:
            st.ffn_ls = LeastSquares(x.shape[-1], out.shape[-1], self.acc, x.device)
        st.ffn_ls.add(x, out)

    def _acts(self, module, args):
        if self.keep_samples:
            self._keep("acts", args[0])
            return
        a = args[0].reshape(-1, args[0].shape[-1])
        if a.dtype not in (torch.float32, torch.float64):
            a = a.float()
        st = self.stats
        if st.act_sq is None:
            st.act_sq = torch.zeros(a.shape[1], dtype=self.acc, device=a.device)
            if self.want_gram:
                st.act_gram = torch.zeros(a.shape[1], a.shape[1], dtype=self.acc, device=a.device)
        st.act_sq += a.pow(2).sum(0).to(self.acc)
        if self.want_gram:
            st.act_gram += (a.T @ a).to(self.acc)

    def finish(self) -> LayerStats:
        for h in self.handles:
            h.remove()
        st = self.stats
        st.samples = {k: torch.cat(v) for k, v in st.samples.items()}
        if st.head_gram is not None:
            # |o_h W_o[:, h]^T|^2 summed over tokens = trace(W_h G_h W_h^T), with W_h the head's o_proj columns.
            attn = self.layer.self_attn
            n, d = attn.num_heads, attn.head_dim
            w = attn.o_proj.weight.to(self.acc).reshape(-1, n, d).transpose(0, 1)  # [n, H, d]
            st.head_importance = (torch.bmm(w, st.head_gram) * w).sum((1, 2)).cpu()
        return st


@torch.no_grad()
def collect_stats(layer, batches, pos_emb, bias, acc_dtype: torch.dtype = torch.float64,
                  want_gram: bool = True) -> LayerStats:
    """Run one parent layer over `batches` and return the statistics (see StatsRecorder)."""
    rec = StatsRecorder(layer, want_gram, acc_dtype)
    for h in batches:
        layer(h, pos_emb, bias, None)
    return rec.finish()


# ---- building a variant's tensors ----------------------------------------------------------------------------


def merge_kv_heads(weight: torch.Tensor, num_heads: int, old_kv: int, new_kv: int,
                   head_weights: torch.Tensor | None = None) -> torch.Tensor:
    """k_proj or v_proj weight [old_kv*hd, H] -> [new_kv*hd, H].

    New KV head n serves query heads [n*g', (n+1)*g'); each of those read old KV head q // g. The new head
    is the average of those old heads, each weighted by the summed `head_weights` of the query heads it
    contributes (all ones = count-weighted mean). With new_kv == old_kv the input is returned unchanged.
    RoPE is linear and the same for every head, so averaging the projection rows is averaging the rotated keys.
    """
    if new_kv == old_kv:
        return weight
    if num_heads % new_kv or num_heads % old_kv:
        raise ValueError(f"{num_heads} heads cannot be grouped into {old_kv} or {new_kv} KV heads")
    head_dim = weight.shape[0] // old_kv
    g_old, g_new = num_heads // old_kv, num_heads // new_kv
    per_query = torch.ones(num_heads, dtype=torch.float64) if head_weights is None else head_weights.double().cpu()
    mix = torch.zeros(new_kv, old_kv, dtype=torch.float64)
    for q in range(num_heads):
        mix[q // g_new, q // g_old] += per_query[q]
    for n in range(new_kv):  # a group whose heads measured zero falls back to the plain mean
        if mix[n].sum() <= 0:
            for q in range(n * g_new, (n + 1) * g_new):
                mix[n, q // g_old] += 1.0
    mix = mix / mix.sum(dim=1, keepdim=True)
    w = weight.view(old_kv, head_dim, -1).to(torch.float64)
    merged = torch.einsum("no,odh->ndh", mix.to(w.device), w)
    return merged.reshape(new_kv * head_dim, -1).to(weight.dtype)


def channel_order(stats: LayerStats, down: torch.Tensor, how: str) -> torch.Tensor:
    """FFN channels, most important first."""
    score = stats.act_sq.double().cpu()
    if how == "output":
        score = score * down.double().pow(2).sum(0).cpu()
    elif how != "activation":
        raise ValueError(f"unknown FFN importance {how!r}")
    return torch.argsort(score, descending=True, stable=True)


def refit_downs(stats: LayerStats, down: torch.Tensor, order: torch.Tensor, widths: list[int], recipe: Recipe,
                heldout: LayerStats | None = None) -> dict[int, tuple[torch.Tensor, dict]]:
    """down_proj for each width w on its kept channels S_w = order[:w], refitted so they best reproduce the
    *full* FFN output, with the ridge pulling towards the parent's own columns. y = A W_down^T exactly, so
    A_S^T y = G[S, :] W_down^T and only the channels' Gram matrix G is needed. Returns {w: (down [H, w] with
    columns in importance order, info)}.

    The kept sets are nested (the top channels of one ranking), so G_SS of every width is a leading block of
    G permuted into importance order, and so is its Cholesky factor: one factorisation per ridge serves
    every width. lambda = ridge x mean(diag G) over the widest kept set.

    With held-out samples (tokens the fit never saw) the ridge is chosen among `recipe.refit_ridges` per width
    by the held-out error of the FFN output, None (no refit: the parent's own columns) included, so a refit
    that only fits the calibration tokens loses to a plainer one.
    """
    g = stats.act_gram
    wmax = max(widths)
    idx = order[:wmax].to(g.device)
    wd = down.T.to(g)  # [full width, H]
    g_pp = g[idx][:, idx]
    rhs_full = g[idx] @ wd  # [wmax, H]: G[S, :] W_down^T for the widest set; narrower sets are its leading rows
    prior = wd[idx]
    cv = heldout is not None and heldout.samples.get("acts") is not None and recipe.cv
    ridges = recipe.refit_ridges if cv else (recipe.refit_ridge,)
    lam0 = g_pp.diagonal().mean().clamp_min(1e-30)
    best: dict[int, tuple] = {}
    if cv:
        a_ho, y_ho = cv_samples(heldout, "acts", "ffn_y", recipe.cv_tokens)
        y_norm = y_ho.pow(2).sum().item()
    for ridge in ridges:
        if ridge is not None:
            m = g_pp + ridge * lam0 * torch.eye(wmax, dtype=g.dtype, device=g.device)
            chol, bad = torch.linalg.cholesky_ex(m)
            # Lower-triangular: the forward substitution of the widest set holds every narrower one's.
            z = None if bad.item() else torch.linalg.solve_triangular(chol, rhs_full + ridge * lam0 * prior,
                                                                      upper=False)
        for w in widths:
            if ridge is None:
                b = prior[:w]
            elif z is None:  # not positive definite in floating point: a general solve
                b = torch.linalg.solve(m[:w, :w], rhs_full[:w] + ridge * lam0 * prior[:w])
            else:
                b = torch.linalg.solve_triangular(chol[:w, :w].T, z[:w], upper=True)
            if not cv:
                best[w] = (float("nan"), ridge, b)
                continue
            pred = a_ho[:, idx[:w]] @ b.float()
            err = (pred - y_ho).pow(2).sum().item() / max(y_norm, 1e-30)
            if w not in best or err < best[w][0]:
                best[w] = (err, ridge, b)
    out = {}
    for w, (err, ridge, b) in best.items():
        info = {"ridge": ridge} | ({"heldout_rel_error": err} if cv else {})
        out[w] = (b.T.to(down.dtype), info)
    return out


def cv_samples(heldout: LayerStats, x_key: str, y_key: str, limit: int):
    x, y = heldout.samples[x_key], heldout.samples[y_key]
    if x.shape[0] > limit:
        pick = torch.linspace(0, x.shape[0] - 1, limit, device=x.device).round().long()
        x, y = x[pick], y[pick]
    return x.float(), y.float()


def fit_linear(ls: LeastSquares, recipe: Recipe, heldout: LayerStats | None = None, which: str = "attn",
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
    """A linear replacement W (Y ~ X W^T, ridge towards zero); the ridge chosen by held-out error when given."""
    x_ho = heldout.samples.get(f"{which}_x") if heldout is not None else None
    candidates = recipe.linear_ridges if x_ho is not None and recipe.cv else (recipe.ridge,)
    best = None
    for lam in candidates:
        w = ls.solve(lam)
        if len(candidates) == 1:
            return w.to(dtype or w.dtype), {"ridge": lam}
        xs, ys = cv_samples(heldout, f"{which}_x", f"{which}_y", recipe.cv_tokens)
        err = (xs @ w.T.float() - ys).pow(2).sum().item() / max(ys.pow(2).sum().item(), 1e-30)
        if best is None or err < best[0]:
            best = (err, lam, w)
    err, lam, w = best
    return w.to(dtype or w.dtype), {"ridge": lam, "heldout_rel_error": err, "fit_rel_error": ls.error(w)}


FFN_PART_KEYS = ("post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight")


def narrow_ffn(parent: dict, width: int, stats: LayerStats | None, recipe: Recipe,
               heldout: LayerStats | None = None) -> dict:
    """Keep the `width` most important channels (in their original order); optionally refit down_proj."""
    if width == parent["mlp.gate_proj.weight"].shape[0]:
        return {k: parent[k] for k in FFN_PART_KEYS}
    return ffn_from_record(parent, narrow_ffn_record(parent, width, stats, recipe, heldout)[0])


def narrow_ffn_record(parent: dict, width: int, stats: LayerStats, recipe: Recipe,
                      heldout: LayerStats | None = None) -> tuple[dict, dict]:
    """What a narrower FFN needs beyond the parent: the kept channels and, when refitted, down_proj."""
    return narrow_ffn_records(parent, [width], stats, recipe, heldout)[width]


def narrow_ffn_records(parent: dict, widths: list[int], stats: LayerStats, recipe: Recipe,
                       heldout: LayerStats | None = None) -> dict[int, tuple[dict, dict]]:
    """{width: (record, info)} for several narrower widths at once (one factorisation per ridge)."""
    down = parent["mlp.down_proj.weight"]
    order = channel_order(stats, down, recipe.ffn_importance)
    if recipe.ffn_refit and stats.act_gram is None:
        raise ValueError("refitting down_proj needs the activation Gram matrix")
    fitted = refit_downs(stats, down, order, widths, recipe, heldout) if recipe.ffn_refit else {}
    out = {}
    for w in widths:
        chosen = order[:w]
        perm = torch.argsort(chosen)  # records keep the channels in their original order
        record = {"keep": chosen[perm].contiguous()}
        info = {}
        if w in fitted:
            new_down, info = fitted[w]
            record["mlp.down_proj.weight"] = new_down[:, perm.to(new_down.device)].contiguous()
        out[w] = (record, info)
    return out


def ffn_from_record(parent: dict, record: dict) -> dict:
    keep = record["keep"].long().to(parent["mlp.gate_proj.weight"].device)
    down = record.get("mlp.down_proj.weight")
    return {
        "post_attention_layernorm.weight": parent["post_attention_layernorm.weight"],
        "mlp.gate_proj.weight": parent["mlp.gate_proj.weight"][keep].contiguous(),
        "mlp.up_proj.weight": parent["mlp.up_proj.weight"][keep].contiguous(),
        "mlp.down_proj.weight": (parent["mlp.down_proj.weight"][:, keep] if down is None else down).contiguous(),
    }


def part_record(plan: ModelPlan, parent_layer: LayerPlan, part: str, option, parent: dict,
                stats: LayerStats | None, recipe: Recipe, heldout: LayerStats | None = None) -> tuple[dict, dict]:
    """(record, info) of one part variant: only the tensors that are not the parent's own (empty for keep and
    none). A record is what the fit store keeps; `part_tensors` turns it back into the part's tensors."""
    if part == "attention":
        base = parent_layer.attention
        if option.kind == NONE or option == base:
            return {}, {}
        norm = parent["input_layernorm.weight"]
        if option.kind == LINEAR:
            w, info = fit_linear(stats.attn_ls, recipe, heldout, "attn", norm.dtype)
            return {"self_attn.linear_attn.weight": w.contiguous()}, info
        if base.kind != GQA:
            raise ValueError(f"layer {parent_layer.index}: cannot make GQA attention from {base.kind}")
        weights = None if recipe.kv_merge == "mean" else stats.head_importance
        old, new, heads = base.num_kv_heads, option.num_kv_heads, plan.num_attention_heads
        return {n: merge_kv_heads(parent[n], heads, old, new, weights)
                for n in ("self_attn.k_proj.weight", "self_attn.v_proj.weight")}, {}
    base = parent_layer.ffn
    if option.kind == NONE or (option.kind == base.kind and option.width == base.width):
        return {}, {}
    norm = parent["post_attention_layernorm.weight"]
    if option.kind == LINEAR:
        w, info = fit_linear(stats.ffn_ls, recipe, heldout, "ffn", norm.dtype)
        return {"mlp.linear_mlp.weight": w.contiguous()}, info
    if base.kind != SWIGLU or option.width > base.width:
        raise ValueError(f"layer {parent_layer.index}: cannot make SwiGLU width {option.width} from the parent FFN")
    return narrow_ffn_record(parent, option.width, stats, recipe, heldout)


def part_tensors(parent_layer: LayerPlan, part: str, option, parent: dict, record: dict) -> dict:
    """The layer-local tensors of one part variant, from the parent's tensors and the variant's record."""
    if part == "attention":
        base = parent_layer.attention
        if option.kind == NONE:
            return {}
        if option == base:
            return {k: parent[k] for k in ATTN_KEYS if k in parent}
        out = {"input_layernorm.weight": parent["input_layernorm.weight"]}
        if option.kind == LINEAR:
            return out | {"self_attn.linear_attn.weight": record["self_attn.linear_attn.weight"]}
        return out | {"self_attn.q_proj.weight": parent["self_attn.q_proj.weight"],
                      "self_attn.k_proj.weight": record["self_attn.k_proj.weight"],
                      "self_attn.v_proj.weight": record["self_attn.v_proj.weight"],
                      "self_attn.o_proj.weight": parent["self_attn.o_proj.weight"]}
    base = parent_layer.ffn
    if option.kind == NONE:
        return {}
    if option.kind == base.kind and option.width == base.width:
        return {k: parent[k] for k in FFN_KEYS if k in parent}
    if option.kind == LINEAR:
        return {"post_attention_layernorm.weight": parent["post_attention_layernorm.weight"],
                "mlp.linear_mlp.weight": record["mlp.linear_mlp.weight"]}
    return ffn_from_record(parent, record)


def layer_tensors(plan: ModelPlan, parent_layer: LayerPlan, choice: LayerPlan, parent: dict,
                  stats: LayerStats | None, recipe: Recipe, heldout: LayerStats | None = None) -> dict:
    """All tensors of layer variant `choice` (layer-local names), fitted from `stats`."""
    out = {}
    for part, option in (("attention", choice.attention), ("ffn", choice.ffn)):
        record, _ = part_record(plan, parent_layer, part, option, parent, stats, recipe, heldout)
        out.update(part_tensors(parent_layer, part, option, parent, record))
    # Fitted tensors come back on the statistics' device; checkpoints and the layer cache live on the CPU.
    return {k: v if v.device.type == "cpu" else v.cpu() for k, v in out.items()}
