"""The HF side of `verify`, run one decoder layer at a time straight from the safetensors files.

`verify` needs the HF model's logits and every layer's output twice: in fp64 (the truth both implementations
approximate) and in the dtype under test. Loading the whole model cannot do that at real sizes (Super-49B in
fp32 is ~200 GB, Ultra-253B ~1 TB), so the model is never built whole:

- each module (embedding, every decoder layer, final norm, output head) is built on the meta device from the
  model's own classes: our DeciLM decoder layer (`hf/modeling_decilm.py`), or transformers' `LlamaDecoderLayer`
  for Llama checkpoints, as `from_pretrained` would build them;
- it is given exactly its tensors, read by the lazy reader (`io/hf_reader.py`) in the checkpoint's dtype and
  checked against the module's own parameter names (a missing or stray tensor is an error, naming it);
- it runs once per requested dtype on that dtype's hidden states, which are all that survive it.

Weights stay in the checkpoint's dtype; a parametrization casts each weight to the running stream's dtype when
its module reads it, so the fp64 copy of a layer exists one matrix at a time. Peak memory is one layer in the
checkpoint's dtype, plus its largest matrix in fp64, plus the activations, whatever the number of layers.

The streams run the same operations in the same order as the whole model from `from_pretrained` with
`attn_implementation="sdpa"` (tests/test_verify.py checks the logits agree bit for bit). SDPA, not eager:
eager attention computes its softmax in fp32 whatever the model's dtype, which would cap the fp64 stream's
precision there. What the model itself computes in fp32 by design (RMSNorm statistics, RoPE angles) stays so in
the fp64 stream too; docs/parity.md measures what that costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .io.hf_index import CheckpointError
from .io.quantized import open_checkpoint
from .plan import load_plan
from .puzzletron import family_of_format

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Tensors a checkpoint may carry that no module reads (stale RoPE buffers of old checkpoints).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class StreamOutput:
    """One dtype's results, on the CPU: logits [b, s, V] and each layer's output [b, s, h] by layer index.
    fp64 for the fp64 stream; fp32 for the others (HF returns fp32 logits; an upcast is exact)."""

    logits: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


class _Stream:
    """The dtype of the stream being run, read by every weight's cast."""

    dtype: torch.dtype = torch.float32


class _CastToStream(nn.Module):
    """Parametrization: the stored weight, in the running stream's dtype (a no-op when they match)."""

    def __init__(self, stream: _Stream):
        super().__init__()
        self.stream = stream

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(self.stream.dtype)


class LayerStreamedReference:
    """A HF checkpoint directory, runnable layer by layer on `device` (cpu or cuda) in several dtypes at once."""

    def __init__(self, hf_dir: str | Path, device: str | torch.device = "cpu"):
        self.dir = Path(hf_dir)
        self.plan = load_plan(self.dir)
        self.ckpt = open_checkpoint(self.dir)  # ModelOpt FP8/NVFP4: the weights dequantized, as converted
        self.device = torch.device(device)
        # transformers' own layers for a native architecture (a Llama, or a Puzzletron child of one)
        self.family = family_of_format(self.plan.source_format)
        self.llama = self.family is not None
        self.config = self._hf_config()
        self._stream = _Stream()
        self._read: set[str] = set()

    def _hf_config(self):
        if self.llama:
            cfg = _native(self.family).config.from_pretrained(str(self.dir))
        elif self.plan.source_format == "decilm-7b":
            # Our DeciLM config reads block_configs; the plan states the same layers in that form.
            from .hf.configuration_decilm import DeciLMConfig

            cfg = DeciLMConfig(**self.plan.hf_config())
        else:
            from transformers import AutoConfig

            from . import hf as _register  # noqa: F401  (registers DeciLM with the Auto classes)

            cfg = AutoConfig.from_pretrained(str(self.dir), trust_remote_code=False)
        cfg._attn_implementation = "sdpa"
        return cfg

    # ---- modules ------------------------------------------------------------------------------------------
    def _module(self, make: Callable[[], nn.Module], prefix: str, cast: bool = True) -> nn.Module:
        """`make()` built on the meta device, then given the checkpoint tensors named `prefix` + its own
        parameter names (on `self.device`, in the checkpoint's dtype), each weight cast to the stream on use."""
        with torch.device("meta"):
            module = make()
        names = list(module.state_dict())
        state = {}
        for name in names:
            key = prefix + name
            if key not in self.ckpt.tensors:
                raise CheckpointError(f"{self.dir}: tensor '{key}' is missing (the model's {type(module).__name__} "
                                      "needs it)")
            state[name] = self.ckpt.read(key).to(self.device)
            self._read.add(key)
        stray = sorted(k for k in self.ckpt.tensors if k.startswith(prefix) and k[len(prefix):] not in names
                       and not k.endswith(IGNORED_SUFFIXES))
        if stray and prefix.startswith("model.layers."):
            raise CheckpointError(f"{self.dir}: tensor(s) {stray[:5]} belong to no parameter of layer "
                                  f"{prefix.split('.')[2]} ({self.plan.layers[int(prefix.split('.')[2])].describe()})")
        module.load_state_dict(state, strict=True, assign=True)
        if cast:
            for leaf in list(module.modules()):
                for pname, _ in list(leaf.named_parameters(recurse=False)):
                    parametrize.register_parametrization(leaf, pname, _CastToStream(self._stream), unsafe=True)
        return module.eval()

    def _layer(self, i: int) -> nn.Module:
        if self.llama:  # this layer's own KV heads and width; removed parts as Puzzletron's runtime has them
            return self._module(lambda: _native_layer(self.config, i, self.plan.layers[i], self.family),
                                f"model.layers.{i}.")
        from .hf.modeling_decilm import DeciLMDecoderLayer

        return self._module(lambda: DeciLMDecoderLayer(self.config, i, None), f"model.layers.{i}.")

    def _norm(self) -> nn.Module:
        h, eps = self.plan.hidden_size, self.plan.rms_norm_eps
        if self.llama:
            return self._module(lambda: _native(self.family).norm(h, eps=eps), "model.norm.")
        from .hf.modeling_decilm import DeciLMRMSNorm

        return self._module(lambda: DeciLMRMSNorm(h, eps=eps), "model.norm.")

    def _head(self) -> nn.Module:
        prefix = "model.embed_tokens." if self.plan.tie_word_embeddings else "lm_head."
        return self._module(lambda: nn.Linear(self.plan.hidden_size, self.plan.vocab_size, bias=False), prefix)

    def _positional(self, probe: torch.Tensor, positions: torch.Tensor):
        """(cos, sin) in the probe's dtype, from the model's own rotary embedding."""
        if self.llama:
            rotary = _native(self.family).rotary(config=self.config).to(self.device)
        else:
            from .hf.modeling_decilm import DeciLMRotaryEmbedding

            rotary = DeciLMRotaryEmbedding(self.config)
        return rotary(probe, positions)

    def _run_layer(self, layer: nn.Module, h: torch.Tensor, positional, bias: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
        if self.llama:
            out = layer(h, attention_mask=bias, position_ids=positions, position_embeddings=positional,
                        use_cache=False)
            return out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple
        return layer(h, positional, bias, None)

    # ---- the pass -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, dtypes: tuple[str, ...] = ("fp64", "fp32"),
            hidden: bool = True, progress: Callable[[int, int], None] | None = None) -> dict[str, StreamOutput]:
        """One pass over the layers; every dtype in `dtypes` is its own stream of hidden states.

        input_ids / attention_mask: [b, s], right padding (1 = token). Positions are 0..s-1, as in megatron and
        in HF for right-padded rows; values at padded positions are meaningless.
        """
        from .hf.modeling_decilm import build_attention_bias

        unknown = [d for d in dtypes if d not in DTYPES]
        if unknown:
            raise ValueError(f"unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}")
        self._read.clear()
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device)
        b, s = ids.shape
        positions = torch.arange(s, device=self.device).unsqueeze(0).expand(b, s)

        # The lookup runs in the checkpoint's dtype and its rows are then cast: the same values as casting the
        # table first, without an fp64 copy of the whole table.
        embed = self._module(lambda: nn.Embedding(self.plan.vocab_size, self.plan.hidden_size), "model.embed_tokens.",
                             cast=False)
        rows = embed(ids)
        del embed
        h = {d: rows.to(DTYPES[d]) for d in dtypes}
        del rows
        positional = {d: self._positional(h[d], positions) for d in dtypes}
        bias = {d: build_attention_bias(mask, b, s, 0, DTYPES[d], self.device) for d in dtypes}
        out = {d: StreamOutput(logits=torch.empty(0)) for d in dtypes}

        n = self.plan.num_layers
        for i in range(n):
            layer = self._layer(i)
            for d in dtypes:
                self._stream.dtype = DTYPES[d]
                h[d] = self._run_layer(layer, h[d], positional[d], bias[d], positions)
                if hidden:
                    out[d].hidden[i] = _to_cpu(h[d])
            del layer
            if progress:
                progress(i + 1, n)

        norm, head = self._norm(), self._head()
        for d in dtypes:
            self._stream.dtype = DTYPES[d]
            out[d].logits = _to_cpu(head(norm(h[d])))
        del norm, head
        self._check_all_read()
        return out

    def _check_all_read(self) -> None:
        unread = sorted(k for k in self.ckpt.tensors if k not in self._read and not k.endswith(IGNORED_SUFFIXES)
                        and not (k == "lm_head.weight" and self.plan.tie_word_embeddings))
        if unread:
            raise CheckpointError(f"{self.dir}: {len(unread)} tensor(s) belong to no module of the model: {unread[:5]}")


def _native(family: str):
    from .hf.native import native_classes

    return native_classes(family)


def _native_layer(config, i: int, layer, family: str) -> nn.Module:
    from .hf.native import native_layer

    return native_layer(config, i, layer, family)


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64 if t.dtype == torch.float64 else torch.float32)


def reference_forward(hf_dir: str | Path, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      dtypes: tuple[str, ...] = ("fp64", "fp32"), device: str = "cpu",
                      hidden: bool = True) -> dict[str, StreamOutput]:
    """The layer-streamed HF model on these tokens, in each of `dtypes`; see `LayerStreamedReference`."""
    return LayerStreamedReference(hf_dir, device).run(input_ids, attention_mask, dtypes, hidden)
