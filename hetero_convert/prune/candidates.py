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
import torch.nn.functional as F

from ..hf.modeling_decilm import DeciLMAttention, DeciLMMLP, apply_rotary_pos_emb, repeat_kv
from ..plan import GQA, LINEAR, NONE, SWIGLU, Attention, FFN, LayerPlan, ModelPlan, width_to_ffn_mult

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


# ---- which variants exist ------------------------------------------------------------------------------------


def attention_options(plan: ModelPlan, layer: LayerPlan) -> list[Attention]:
    """Keep first, then fewer KV heads (most first), linear, removed."""
    a = layer.attention
    options = [a]
    if a.kind == GQA:
        heads = plan.num_attention_heads
        for group in range(1, heads + 1):
            if heads % group == 0 and heads // group < a.num_kv_heads:
                options.append(Attention(GQA, heads // group))
        options.append(Attention(LINEAR))
    if a.kind != NONE:
        options.append(Attention(NONE))
    return options


def default_ffn_widths(parent_width: int, hidden: int, max_widths: int = 8) -> list[int]:
    """Narrower widths the format can express: every multiple of 256 below the parent width when there are at
    most `max_widths` of them, else the multiples of 256 nearest to k/(max_widths+1) of the parent width."""
    every = [w for w in range(256, parent_width, 256) if width_to_ffn_mult(w, hidden) is not None]
    if len(every) <= max_widths:
        return every
    picked = {min(every, key=lambda w: abs(w - parent_width * k / (max_widths + 1))) for k in range(1, max_widths + 1)}
    return sorted(picked)


def ffn_options(plan: ModelPlan, layer: LayerPlan, widths: list[int] | None = None, max_widths: int = 8) -> list[FFN]:
    """Keep first, then narrower widths (widest first), linear, removed."""
    f = layer.ffn
    options = [f]
    if f.kind == SWIGLU:
        pool = default_ffn_widths(f.width, plan.hidden_size, max_widths) if widths is None else widths
        for w in sorted({w for w in pool if w < f.width}, reverse=True):
            mult = width_to_ffn_mult(w, plan.hidden_size)
            if mult is None:
                raise ValueError(f"FFN width {w} cannot be expressed as ffn_mult for hidden size {plan.hidden_size}")
            options.append(FFN(SWIGLU, w, mult))
        options.append(FFN(LINEAR))
    if f.kind != NONE:
        options.append(FFN(NONE))
    return options


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
    """Running X^T X and X^T Y for fitting Y ~ X W^T, accumulated batch by batch (never all X at once)."""

    def __init__(self, n_in: int, n_out: int, dtype: torch.dtype, device):
        self.xtx = torch.zeros(n_in, n_in, dtype=dtype, device=device)
        self.xty = torch.zeros(n_in, n_out, dtype=dtype, device=device)
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.xtx.dtype)
        y = y.reshape(-1, y.shape[-1]).to(self.xtx.dtype)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.count += x.shape[0]

    def solve(self, ridge: float) -> torch.Tensor:
        """W [out, in] minimising |X W^T - Y|^2 + lambda |W|^2, lambda = ridge * mean(diag(X^T X))."""
        return ridge_solve(self.xtx, self.xty, ridge).T.contiguous()


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
    head_importance: torch.Tensor | None = None  # per query head: summed squared output contribution
    ffn_ls: LeastSquares | None = None
    act_sq: torch.Tensor | None = None  # per FFN channel: summed a_j^2
    act_gram: torch.Tensor | None = None  # A^T A over calibration tokens
    tokens: int = 0
    extra: dict = field(default_factory=dict)


def attention_heads(attn: DeciLMAttention, x: torch.Tensor, pos_emb, bias) -> torch.Tensor:
    """Per-head attention outputs [batch, heads, seq, head_dim], before o_proj (the module's own math)."""
    b, s, _ = x.shape
    q = attn.q_proj(x).view(b, s, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, s, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *pos_emb)
    k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scaling)


@torch.no_grad()
def collect_stats(layer, batches, pos_emb, bias, acc_dtype: torch.dtype = torch.float64,
                  want_gram: bool = True) -> LayerStats:
    """Run one parent layer over the cached inputs and accumulate what the variants are fitted from.

    Attention: the map RMSNorm(x) -> attention output, and each query head's share of the output.
    FFN: the map RMSNorm(h) -> FFN output, each channel's mean squared activation and the channels' Gram
    matrix (for refitting down_proj on a subset of channels).
    """
    st = LayerStats()
    for h in batches:
        hidden = h.shape[-1]
        st.tokens += h.shape[0] * h.shape[1]
        if layer.self_attn is not None:
            x = layer.input_layernorm(h)
            attn = layer.self_attn
            if isinstance(attn, DeciLMAttention):
                heads = attention_heads(attn, x, pos_emb, bias)
                b, n, s, d = heads.shape
                y = attn.o_proj(heads.transpose(1, 2).reshape(b, s, n * d))
                if st.head_importance is None:
                    st.head_importance = torch.zeros(n, dtype=torch.float64)
                w_o = attn.o_proj.weight
                for i in range(n):
                    part = heads[:, i] @ w_o[:, i * d:(i + 1) * d].T
                    st.head_importance[i] += part.float().pow(2).sum().item()
            else:
                y = attn(x)
            if st.attn_ls is None:
                st.attn_ls = LeastSquares(hidden, hidden, acc_dtype, h.device)
            st.attn_ls.add(x, y)
            h = h + y
        if layer.mlp is not None:
            x = layer.post_attention_layernorm(h)
            mlp = layer.mlp
            if isinstance(mlp, DeciLMMLP):
                a = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
                y = mlp.down_proj(a)
                a2 = a.reshape(-1, a.shape[-1]).to(acc_dtype)
                if st.act_sq is None:
                    st.act_sq = torch.zeros(a2.shape[1], dtype=acc_dtype, device=h.device)
                    if want_gram:
                        st.act_gram = torch.zeros(a2.shape[1], a2.shape[1], dtype=acc_dtype, device=h.device)
                st.act_sq += a2.pow(2).sum(0)
                if want_gram:
                    st.act_gram += a2.T @ a2
            else:
                y = mlp(x)
            if st.ffn_ls is None:
                st.ffn_ls = LeastSquares(hidden, hidden, acc_dtype, h.device)
            st.ffn_ls.add(x, y)
    return st


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


def narrow_ffn(parent: dict, width: int, stats: LayerStats | None, recipe: Recipe) -> dict:
    """Keep the `width` most important channels (in their original order); optionally refit down_proj."""
    gate, up, down = parent["mlp.gate_proj.weight"], parent["mlp.up_proj.weight"], parent["mlp.down_proj.weight"]
    if width == gate.shape[0]:
        return {k: parent[k] for k in ("post_attention_layernorm.weight", "mlp.gate_proj.weight",
                                       "mlp.up_proj.weight", "mlp.down_proj.weight")}
    keep = torch.sort(channel_order(stats, down, recipe.ffn_importance)[:width]).values
    new_down = down[:, keep]
    if recipe.ffn_refit:
        if stats.act_gram is None:
            raise ValueError("refitting down_proj needs the activation Gram matrix")
        # y = A W_down^T exactly on calibration data, so A_S^T y = G[S, :] W_down^T: no second pass needed.
        g = stats.act_gram.double()
        idx = keep.to(g.device)
        rhs = g[idx] @ down.T.to(g)
        prior = new_down.T.to(g)
        new_down = ridge_solve(g[idx][:, idx], rhs, recipe.refit_ridge, prior).T.to(down.dtype)
    return {
        "post_attention_layernorm.weight": parent["post_attention_layernorm.weight"],
        "mlp.gate_proj.weight": gate[keep].contiguous(),
        "mlp.up_proj.weight": up[keep].contiguous(),
        "mlp.down_proj.weight": new_down.contiguous(),
    }


def attention_tensors(plan: ModelPlan, parent_layer: LayerPlan, choice: Attention, parent: dict,
                      stats: LayerStats | None, recipe: Recipe) -> dict:
    kind = choice.kind
    if kind == NONE:
        return {}
    if choice == parent_layer.attention:
        return {k: parent[k] for k in ATTN_KEYS if k in parent}
    norm = parent["input_layernorm.weight"]
    if kind == LINEAR:
        w = stats.attn_ls.solve(recipe.ridge)
        return {"input_layernorm.weight": norm, "self_attn.linear_attn.weight": w.to(norm.dtype)}
    if parent_layer.attention.kind != GQA:
        raise ValueError(f"layer {parent_layer.index}: cannot make GQA attention from {parent_layer.attention.kind}")
    weights = None if recipe.kv_merge == "mean" else stats.head_importance
    old, new, heads = parent_layer.attention.num_kv_heads, choice.num_kv_heads, plan.num_attention_heads
    return {
        "input_layernorm.weight": norm,
        "self_attn.q_proj.weight": parent["self_attn.q_proj.weight"],
        "self_attn.k_proj.weight": merge_kv_heads(parent["self_attn.k_proj.weight"], heads, old, new, weights),
        "self_attn.v_proj.weight": merge_kv_heads(parent["self_attn.v_proj.weight"], heads, old, new, weights),
        "self_attn.o_proj.weight": parent["self_attn.o_proj.weight"],
    }


def ffn_tensors(parent_layer: LayerPlan, choice: FFN, parent: dict, stats: LayerStats | None,
                recipe: Recipe) -> dict:
    kind = choice.kind
    if kind == NONE:
        return {}
    if kind == parent_layer.ffn.kind and choice.width == parent_layer.ffn.width:
        return {k: parent[k] for k in FFN_KEYS if k in parent}
    norm = parent["post_attention_layernorm.weight"]
    if kind == LINEAR:
        w = stats.ffn_ls.solve(recipe.ridge)
        return {"post_attention_layernorm.weight": norm, "mlp.linear_mlp.weight": w.to(norm.dtype)}
    if parent_layer.ffn.kind != SWIGLU or choice.width > parent_layer.ffn.width:
        raise ValueError(f"layer {parent_layer.index}: cannot make SwiGLU width {choice.width} from the parent FFN")
    return narrow_ffn(parent, choice.width, stats, recipe)


def layer_tensors(plan: ModelPlan, parent_layer: LayerPlan, choice: LayerPlan, parent: dict,
                  stats: LayerStats | None, recipe: Recipe) -> dict:
    """All tensors of layer variant `choice` (layer-local names)."""
    out = attention_tensors(plan, parent_layer, choice.attention, parent, stats, recipe)
    out.update(ffn_tensors(parent_layer, choice.ffn, parent, stats, recipe))
    # Fitted tensors come back on the statistics' device; checkpoints and the layer cache live on the CPU.
    return {k: v if v.device.type == "cpu" else v.cpu() for k, v in out.items()}
