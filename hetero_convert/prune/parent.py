"""The parent model, held layer by layer, and its one calibration pass.

A Llama checkpoint is read as a homogeneous DeciLM (the per-layer plan of a Llama config, identical tensor
names), so every forward here goes through our DeciLM layer classes: the layers that are scored are the
layers that get exported. Layers are built on demand from the safetensors files and kept in a
least-recently-used cache of bounded size, so a model larger than memory is streamed; only the embedding,
final norm and output head stay resident.

`calibrate` runs the parent once and keeps, for every layer, its input hidden states on the calibration
tokens, plus the parent's output log-probabilities on the scoring tokens. Every later step (statistics,
scoring a variant at layer i) starts from the cached input of layer i instead of recomputing layers < i.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..hf.configuration_decilm import DeciLMConfig
from ..hf.modeling_decilm import DeciLMDecoderLayer, DeciLMRMSNorm, DeciLMRotaryEmbedding, build_attention_bias
from ..io.quantized import open_checkpoint
from ..plan import LayerPlan, ModelPlan, load_config, load_plan


def source_config(src: str | Path) -> dict:
    """config.json of SRC, with a transformers-5 `rope_parameters` folded back into rope_theta/rope_scaling
    (Llama configs saved by transformers 5 carry only the former; the plan reads the latter)."""
    cfg = dict(load_config(src))
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" not in cfg:
        cfg["rope_theta"] = rp.get("rope_theta", 10000.0)
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind != "default" and cfg.get("rope_scaling") is None:
            cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    return cfg


def single_layer_config(plan: ModelPlan, layer: LayerPlan, attn_implementation: str) -> DeciLMConfig:
    """A one-layer DeciLM config whose layer 0 is `layer`: enough to build that layer's module."""
    one = dataclasses.replace(plan, layers=(LayerPlan(0, layer.attention, layer.ffn),))
    cfg = DeciLMConfig(**one.hf_config())
    cfg._attn_implementation = attn_implementation
    return cfg


class ParentModel:
    """The parent's weights and the means to run any (variant of a) layer on a device."""

    def __init__(self, src: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                 max_resident_bytes: int | None = None, attn_implementation: str = "sdpa"):
        self.dir = Path(src)
        self.config = source_config(src)
        self.plan = load_plan(self.config)
        self.ckpt = open_checkpoint(src, self.config)  # a ModelOpt FP8/NVFP4 parent: dequantized on read
        self.device = torch.device(device)
        # fp32 on CPU (fast there and exact enough for small KL differences); bf16 on GPUs.
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        self.attn_implementation = attn_implementation
        self.checkpoint_dtype = self.ckpt.tensors["model.embed_tokens.weight"].dtype
        self.max_resident_bytes = max_resident_bytes or default_resident_bytes(self.device)
        self._layers: OrderedDict[int, torch.nn.Module] = OrderedDict()
        self._configs: dict = {}

        self.embed = self.ckpt.read("model.embed_tokens.weight")
        head = "model.embed_tokens.weight" if self.plan.tie_word_embeddings else "lm_head.weight"
        self.lm_head = self.ckpt.read(head).to(self.device, self.dtype)
        self.norm = DeciLMRMSNorm(self.plan.hidden_size, self.plan.rms_norm_eps).to(self.device, self.dtype)
        self.norm.weight.data.copy_(self.ckpt.read("model.norm.weight"))
        self.rotary = DeciLMRotaryEmbedding(self.layer_config(self.plan.layers[0]))
        self._positional: dict = {}

    # ---- layers --------------------------------------------------------------------------------------------
    def layer_config(self, layer: LayerPlan) -> DeciLMConfig:
        key = (layer.attention, layer.ffn)
        if key not in self._configs:
            self._configs[key] = single_layer_config(self.plan, layer, self.attn_implementation)
        return self._configs[key]

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """The parent's tensors of layer i (checkpoint dtype, CPU), named without the layer prefix."""
        prefix = f"model.layers.{i}."
        return {k[len(prefix):]: self.ckpt.read(k) for k in self.ckpt.tensors if k.startswith(prefix)
                and not k.endswith("rotary_emb.inv_freq")}

    def build(self, layer: LayerPlan, tensors: dict[str, torch.Tensor]) -> DeciLMDecoderLayer:
        """The module of a layer variant, on the device in the compute dtype. Built on the meta device and
        then given the tensors, so no random initialisation is ever computed."""
        with torch.device("meta"):
            module = DeciLMDecoderLayer(self.layer_config(layer), 0, None)
        state = {k: v.to(self.device, self.dtype) for k, v in tensors.items()}
        module.load_state_dict(state, strict=True, assign=True)
        return module.eval()

    def layer(self, i: int) -> DeciLMDecoderLayer:
        """Parent layer i, from the bounded cache."""
        if i in self._layers:
            self._layers.move_to_end(i)
            return self._layers[i]
        module = self.build(self.plan.layers[i], self.layer_tensors(i))
        self._layers[i] = module
        while len(self._layers) > 1 and sum(_nbytes(m) for m in self._layers.values()) > self.max_resident_bytes:
            self._layers.popitem(last=False)
        return module

    # ---- running -------------------------------------------------------------------------------------------
    def positional(self, seq_len: int):
        """(cos, sin) and the causal additive mask for sequences of `seq_len`, with batch 1: they broadcast."""
        if seq_len not in self._positional:
            probe = torch.empty(1, seq_len, 1, device=self.device, dtype=self.dtype)
            pos = torch.arange(seq_len, device=self.device).unsqueeze(0)
            bias = build_attention_bias(None, 1, seq_len, 0, self.dtype, self.device)
            self._positional[seq_len] = (self.rotary(probe, pos), bias)
        return self._positional[seq_len]

    def run(self, module, h: torch.Tensor) -> torch.Tensor:
        pos_emb, bias = self.positional(h.shape[1])
        return module(h, pos_emb, bias, None)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed).to(self.device, self.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return (self.norm(h) @ self.lm_head.T).float()


def default_resident_bytes(device: torch.device) -> int:
    """How much of the parent stays built on the device: half a GPU's memory (the rest is for activations,
    statistics and the output head), or 8 GiB of host memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 2
    return 8 << 30


def _nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ---- calibration -------------------------------------------------------------------------------------------------


def calibration_ids(tokenizer, text: str, num_tokens: int, seq_len: int) -> torch.Tensor:
    """[n, seq_len] token ids: n = num_tokens // seq_len windows spread evenly over the whole text, so the
    calibration sees all of it rather than its beginning."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return windows(torch.tensor(ids, dtype=torch.long), num_tokens, seq_len)


def windows(ids: torch.Tensor, num_tokens: int, seq_len: int) -> torch.Tensor:
    available = ids.numel() // seq_len
    wanted = max(1, num_tokens // seq_len)
    if available == 0:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    n = min(wanted, available)
    starts = torch.linspace(0, available - 1, n).round().long() * seq_len
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


@dataclass
class Calibration:
    """What the one parent pass leaves behind."""

    ids: torch.Tensor  # [n_seqs, seq_len]
    batch_size: int
    score_batches: int  # the first this-many batches are the scoring tokens
    inputs: list  # inputs[i][b]: layer i's input on batch b, CPU, compute dtype
    probs: list  # probs[b]: the parent's output distribution on scoring batch b [B, S, V], float32, CPU
    plogp: list  # plogp[b]: sum_v p log p per token [B, S] (minus the entropy), float64
    parent_lm_loss: float

    def batch_ids(self, b: int) -> torch.Tensor:
        return self.ids[b * self.batch_size:(b + 1) * self.batch_size]

    @property
    def num_batches(self) -> int:
        return len(self.inputs[0]) if self.inputs else 0

    def fingerprint(self) -> dict:
        import hashlib

        digest = hashlib.sha256(self.ids.numpy().tobytes()).hexdigest()[:16]
        return {"calibration_sha256_16": digest, "sequences": int(self.ids.shape[0]),
                "seq_len": int(self.ids.shape[1]), "score_sequences": min(self.ids.shape[0],
                                                                           self.score_batches * self.batch_size)}


@torch.no_grad()
def calibrate(parent: ParentModel, ids: torch.Tensor, score_seqs: int, batch_size: int,
              progress=None) -> Calibration:
    """One parent forward over the calibration tokens, layer-major (one layer resident at a time)."""
    batches = [ids[i:i + batch_size] for i in range(0, ids.shape[0], batch_size)]
    score_batches = max(1, min(len(batches), -(-score_seqs // batch_size)))
    h = [parent.embed_ids(b).cpu() for b in batches]
    inputs = []
    n = parent.plan.num_layers
    for i in range(n):
        inputs.append(h)
        layer = parent.layer(i)
        h = [parent.run(layer, x.to(parent.device)).cpu() for x in h]
        if progress:
            progress("parent pass", i + 1, n)
    probs, plogp, nll, count = [], [], 0.0, 0
    for b in range(score_batches):
        lp = torch.log_softmax(parent.logits(h[b].to(parent.device)), dim=-1)
        target = batches[b][:, 1:].to(lp.device)
        nll += -lp[:, :-1].gather(-1, target[..., None]).sum().item()
        count += target.numel()
        p = lp.exp()
        # p log p with 0 log 0 = 0 (an underflowed p would otherwise give 0 * -inf).
        plogp.append(torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1, dtype=torch.float64).cpu())
        probs.append(p.cpu())
    return Calibration(ids, batch_size, score_batches, inputs, probs, plogp, nll / max(count, 1))
