"""The parent model, held layer by layer, and the calibration token windows.

A Llama checkpoint is read as a homogeneous DeciLM (the per-layer plan of a Llama config, identical tensor
names), so every forward here goes through our DeciLM layer classes: the layers that are scored are the
layers that get exported. Layers are built on demand from the safetensors files and kept in a
least-recently-used cache of bounded size, so a model larger than memory is streamed; only the embedding,
final norm and output head stay resident.

The scoring sweep (scoring.py) builds each layer once, in order, and keeps only the current hidden states.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
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

    def build(self, layer: LayerPlan, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None
              ) -> DeciLMDecoderLayer:
        """The module of a layer variant, on the device in `dtype` (default: the compute dtype). Built on the
        meta device and then given the tensors, so no random initialisation is ever computed."""
        with torch.device("meta"):
            module = DeciLMDecoderLayer(self.layer_config(layer), 0, None)
        state = {k: v.to(self.device, dtype or self.dtype) for k, v in tensors.items()}
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
    def positional(self, seq_len: int, dtype: torch.dtype | None = None):
        """(cos, sin) and the causal additive mask for sequences of `seq_len`, with batch 1: they broadcast."""
        dtype = dtype or self.dtype
        if (seq_len, dtype) not in self._positional:
            probe = torch.empty(1, seq_len, 1, device=self.device, dtype=dtype)
            pos = torch.arange(seq_len, device=self.device).unsqueeze(0)
            bias = build_attention_bias(None, 1, seq_len, 0, dtype, self.device)
            self._positional[seq_len, dtype] = (self.rotary(probe, pos), bias)
        return self._positional[seq_len, dtype]

    def run(self, module, h: torch.Tensor) -> torch.Tensor:
        pos_emb, bias = self.positional(h.shape[1], h.dtype)
        return module(h, pos_emb, bias, None)

    def embed_ids(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return F.embedding(ids, self.embed).to(self.device, dtype or self.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return (self.norm(h.to(self.dtype)) @ self.lm_head.T).float()


def default_resident_bytes(device: torch.device) -> int:
    """How much of the parent stays built on the device: half a GPU's memory (the rest is for activations,
    statistics and the output head), or 8 GiB of host memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 2
    return 8 << 30


def _nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ---- calibration ---------------------------------------------------------------------------------------------


def windows(ids: torch.Tensor, num_tokens: int, seq_len: int) -> torch.Tensor:
    """[n, seq_len] windows, n = num_tokens // seq_len spread evenly over `ids` (evaluation text)."""
    available = ids.numel() // seq_len
    wanted = max(1, num_tokens // seq_len)
    if available == 0:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    n = min(wanted, available)
    starts = torch.linspace(0, available - 1, n).round().long() * seq_len
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
