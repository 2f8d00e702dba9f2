"""Deterministic random-weight checkpoints, laid out exactly as released models are.

`write_random_checkpoint(config, out_dir)` writes config.json, sharded `model-0000X-of-0000N.safetensors` with
`model.safetensors.index.json` (or one model.safetensors), DeciLM key names, no tensors for removed parts,
lm_head only when untied. Each tensor's values depend only on (seed, name), so a checkpoint is the same
whatever the shard size, and tensors are generated and streamed one at a time: this also writes the
multi-gigabyte checkpoints of the benchmarks in bounded memory.

Weights are scaled so that the models are numerically interesting: q/k use a larger std (0.08 at hidden 128,
scaled by sqrt(128/hidden)) so attention is far from uniform and a wrong RoPE factor shows in the logits
(with std 0.02 at hidden 256 attention is almost uniform and a halved rope factor hardly moves the logits); norm weights are 1 + noise so a swapped norm shows too.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from .dtypes import config_name
from .io.hf_checkpoint import ShardedWriter, plan_shards
from .mappings import expected_hf_keys
from .plan import load_config, load_plan
from .resources import shipped_dir


def bundled_fixtures_dir() -> Path:
    return shipped_dir("fixtures", "tiny-every-kind.json")


def bundled_config(name: str) -> dict:
    return load_config(bundled_fixtures_dir() / f"{name}.json")


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype, std: float = 0.02,
                  device: str = "cpu") -> torch.Tensor:
    # device="cuda" draws on the GPU (other values than the CPU's; for checkpoints of billions of parameters).
    g = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        t = 1.0 + 0.1 * torch.randn(shape, generator=g, device=device)
    else:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            # Attention scores have std ~ std_qk^2 * hidden. 0.08 at hidden 128 gives ~0.8: far enough from
            # uniform attention for a wrong RoPE factor to show, yet well-conditioned. Keeping 0.08 at
            # hidden 2048 gives std ~13: softmax turns into an argmax and every layer amplifies rounding
            # ~100x (measured: fp32 differences growing 1.7e-6 -> 2.6e-5 over 8 layers on CPU), which is a
            # property of the random model, not of a conversion. So the std shrinks with sqrt(hidden).
            std = 0.08 * (128 / shape[-1]) ** 0.5  # shape[-1]: the input width, the hidden size
        t = torch.randn(shape, generator=g, device=device) * std
    return t.to(dtype).cpu()


def _filler(name: str, shape, seed: int, dtype: torch.dtype, fast: bool, device: str = "cpu") -> torch.Tensor:
    if not fast:
        return random_tensor(name, shape, seed, dtype, device=device)
    # Benchmarks write gigabytes: a cheap repeating pattern, still distinct per tensor and per row.
    n = shape[0]
    base = random_tensor(name, shape[1:] if len(shape) > 1 else (1,), seed, dtype)
    if len(shape) == 1:
        return random_tensor(name, shape, seed, dtype)
    rows = torch.arange(n, dtype=torch.float32).unsqueeze(1).mul_(1e-4).to(dtype)
    return (base.unsqueeze(0) + rows).to(dtype)


def write_random_checkpoint(
    config: dict | str | Path,
    out_dir: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 2 << 20,
    fast: bool = False,
    device: str = "cpu",
) -> Path:
    """Write a checkpoint for `config` (a dict, a config.json, or a bundled fixture name)."""
    if isinstance(config, str) and not Path(config).exists():
        config = bundled_config(config)
    cfg = dict(config) if isinstance(config, dict) else load_config(config)
    cfg["torch_dtype"] = config_name(dtype)
    plan = load_plan(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = [(k, dtype, s) for k, s in expected_hf_keys(plan).items()]
    writer = ShardedWriter(out, plan_shards([[t] for t in tensors], max_shard_bytes))
    try:
        for key, _, shape in tensors:
            writer.write(key, _filler(key, shape, seed, dtype, fast, device))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    writer.write_index()
    if plan.source_format.startswith("decilm"):
        from .remote_code import write_remote_code

        cfg["auto_map"] = write_remote_code(out)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def train_tokenizer(out_dir: str | Path, vocab_size: int, text: str | None = None) -> None:
    """A byte-level BPE tokenizer with exactly `vocab_size` ids (<unk>=0, <s>=1, </s>=2, as the bundled configs'
    bos/eos ids say), trained on Python's own documentation (pydoc_data, shipped with every CPython under the PSF
    licence), saved the way transformers loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if text is None:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=4096).save_pretrained(str(out_dir))


EXAMPLE = "tiny-every-kind"


def write_example(out_dir: str | Path, seed: int = 0) -> Path:
    """The bundled example: every layer kind (GQA with its own KV heads, linear replacements, removed
    sub-blocks, a dummy layer, FFN widths that are not multiples of 256), random weights, and a real tokenizer."""
    out = write_random_checkpoint(EXAMPLE, out_dir, seed=seed, max_shard_bytes=1 << 20)
    train_tokenizer(out, load_plan(out).vocab_size)
    return out
