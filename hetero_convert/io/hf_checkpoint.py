"""The HF checkpoint directory as this project writes it: one writer for the converter, the fixtures and prune.

  model.safetensors                        one shard, or
  model-00001-of-0000N.safetensors ...     N shards of at most --max-shard-size, filled in model order, with
  model.safetensors.index.json             {"metadata": {"total_size": tensor bytes}, "weight_map": {key: file}}
  config.json, generation_config.json      from the plan (DeciLM with its remote code, or Llama)
  configuration_decilm.py, modeling_decilm.py   the remote code (DeciLM only)
  tokenizer files                          copied from where the model came from, when it had them

`total_size` counts tensor bytes only, as transformers' save_pretrained does (not file sizes with headers).
Shards are planned before anything is written (every name, dtype and shape is known from the plan), so each
shard's header is written first and its tensors can then arrive in any order, from any thread.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from ..dtypes import config_name
from ..packing import pack_in_order
from .hf_index import INDEX_FILE, SINGLE_FILE
from .safetensors_writer import StreamingSafetensorsWriter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
# The files whose presence means "this directory has a tokenizer" (the others only accompany one).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")

GENERATION_CONFIG = "generation_config.json"
TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]  # (key, dtype, shape)


def shard_names(n: int) -> list[str]:
    return [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)] if n > 1 else [SINGLE_FILE]


def tensor_bytes(spec: TensorSpec) -> int:
    return spec[1].itemsize * math.prod(spec[2])


def plan_shards(units: list[list[TensorSpec]], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive units (tensors that must share a file, e.g. the HF tensors of one Megatron tensor) packed
    into shards of at most max_bytes; a unit larger than that gets a shard of its own."""
    groups = pack_in_order(units, lambda u: sum(tensor_bytes(t) for t in u), max_bytes)
    return [[t for unit in g for t in unit] for g in groups]


class ShardedWriter:
    """The safetensors files of a planned checkpoint. By default every file is created now and every tensor
    is to be written here; with `tensors`, only those (a process's share of a distributed job), into files
    `create_files` made beforehand (`create=False`) or made now. `write(key, tensor)` puts a tensor in its
    shard (thread-safe, each key once); `close()` fails unless every tensor this writer was to write was
    written; `write_index()` (one process) records which file holds which key."""

    def __init__(self, out_dir: str | Path, shards: list[list[TensorSpec]], tensors: set[str] | None = None,
                 create: bool = True):
        self.out_dir = Path(out_dir)
        self.shards = shards
        self.names = shard_names(len(shards))
        self.file_of = {key: k for k, shard in enumerate(shards) for key, _, _ in shard}
        self.writers: dict[int, StreamingSafetensorsWriter] = {}
        unknown = set(tensors or ()) - set(self.file_of)
        if unknown:
            raise ValueError(f"tensor '{min(unknown)}' is not planned for this checkpoint")
        picked = range(len(shards)) if tensors is None else sorted({self.file_of[k] for k in tensors})
        try:
            for k in picked:
                expect = None if tensors is None else {key for key, _, _ in shards[k] if key in tensors}
                self.writers[k] = StreamingSafetensorsWriter(self.out_dir / self.names[k], shards[k], create=create,
                                                             expect=expect)
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def create_files(out_dir: str | Path, shards: list[list[TensorSpec]]) -> None:
        """Every shard file with its header, for the processes that then write their tensors into it."""
        for name, shard in zip(shard_names(len(shards)), shards):
            StreamingSafetensorsWriter(Path(out_dir) / name, shard, expect=set()).close()

    def writer_of(self, key: str) -> StreamingSafetensorsWriter:
        if key not in self.file_of:
            raise ValueError(f"tensor '{key}' is not planned for this checkpoint")
        if self.file_of[key] not in self.writers:
            raise ValueError(f"tensor '{key}' belongs to {self.names[self.file_of[key]]}, not opened here")
        return self.writers[self.file_of[key]]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.writer_of(key).write(key, tensor)

    def write_streamed(self, key: str, chunk, buf: torch.Tensor) -> None:
        """`key` from a `StreamedChunk`, through the block buffer `buf`."""
        self.writer_of(key).write_streamed(key, chunk, buf)

    def close(self) -> None:
        errors = []
        for k in sorted(self.writers):
            try:
                self.writers.pop(k).close()
            except ValueError as e:
                errors.append(str(e))
        if errors:
            raise ValueError("; ".join(errors))

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
        self.writers.clear()

    def total_bytes(self) -> int:
        return sum(tensor_bytes(t) for shard in self.shards for t in shard)

    def write_index(self) -> None:
        """The index, when there is more than one shard (a single file needs none)."""
        if len(self.shards) > 1:
            weight_map = {key: self.names[k] for k, shard in enumerate(self.shards) for key, _, _ in shard}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": self.total_bytes()}, "weight_map": weight_map}, indent=2) + "\n")


def has_tokenizer(directory: str | Path | None) -> bool:
    return directory is not None and any((Path(directory) / f).is_file() for f in TOKENIZER_MARKERS)


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files found in src; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def dtype_key(source_config: dict | None) -> str:
    """Which key names the dtype: the source's own spelling ("dtype" since transformers 5, "torch_dtype" before
    and in every released Nemotron config, which transformers 5 still reads)."""
    if source_config and "dtype" in source_config and "torch_dtype" not in source_config:
        return "dtype"
    return "torch_dtype"


SCHEMAS = ("auto", "decilm", "llama", "puzzletron", "anymodel")


def export_schema(plan, schema: str | None):
    """The plan to write in `schema` (auto: the one it came in), refused when the schema cannot express it."""
    import dataclasses

    from ..errors import ConversionError
    from ..puzzletron import expressible, format_for, plan_family

    if schema in (None, "auto"):
        return plan
    if schema not in SCHEMAS:
        raise ConversionError(f"schema must be one of {list(SCHEMAS)}, got {schema!r}")
    if schema == "llama" and plan.llama_config() is None:
        raise ConversionError("the model cannot be written as a LlamaForCausalLM: its layers differ")
    if schema == "decilm":
        plan.hf_config()  # refuses what DeciLM cannot state (per-head q/k norms, another head_dim)
        return dataclasses.replace(plan, source_format="decilm")
    if schema in ("puzzletron", "anymodel"):
        family = plan_family(plan)
        if expressible(plan, family):
            raise ConversionError(f"the model cannot be written as a Puzzletron child "
                                  f"({'; '.join(expressible(plan, family)[:5])}): use the DeciLM schema")
        schema = format_for(family, schema)
    return dataclasses.replace(plan, source_format=schema)


def write_config(out: str | Path, plan, dtype: torch.dtype, source_config: dict | None = None) -> dict:
    """config.json (and the remote code when it is a DeciLM config): a Llama that went in comes back as a
    Llama, a Puzzletron child in its schema, everything else as DeciLM; the dtype under the source's key.
    `plan.source_format` decides (`export_schema` sets it for --schema). Returns it."""
    from ..remote_code import write_remote_code

    out = Path(out)
    cfg = plan.config_form(source_config)
    if cfg.get("model_type") == "nemotron-nas":
        cfg["auto_map"] = write_remote_code(out)
    cfg.pop("torch_dtype", None)
    cfg[dtype_key(source_config)] = config_name(dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def write_generation_config(out: str | Path, plan, source: str | Path | None = None) -> None:
    """generation_config.json: the source's own file when there is one (all its keys), else the plan's
    bos/eos/pad token ids."""
    if source is not None and Path(source).is_file():
        shutil.copy2(source, Path(out) / GENERATION_CONFIG)
        return
    gen = {k: v for k, v in plan.special_tokens.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (Path(out) / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")


def carry_files(src: str | Path, dst: str | Path) -> list[str]:
    """The files of a HF checkpoint that are not weights and that a Megatron checkpoint keeps for the way back:
    the tokenizer and the generation config. Returns the names copied."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    names = copy_tokenizer(src, dst)
    if (Path(src) / GENERATION_CONFIG).is_file():
        shutil.copy2(Path(src) / GENERATION_CONFIG, Path(dst) / GENERATION_CONFIG)
        names.append(GENERATION_CONFIG)
    return names
