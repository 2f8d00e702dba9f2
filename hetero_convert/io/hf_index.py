"""Which files a HF safetensors checkpoint directory consists of, read from its index alone.

Kept free of torch so the CLI can know (and start hashing) the source files before its heavy imports; the
reader (`hf_reader.HFCheckpoint`) validates the same list against the shards' headers.

The index is an input like any other: it must be a JSON object whose `weight_map` maps each tensor name,
once, to a plain file name inside the directory. That is checked here, before any shard is opened, so an
index cannot point the reader at `../../somewhere` or `/dev/zero`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_JSON_BYTES = 100_000_000  # the safetensors library's bound on a header; an index is far smaller
# The `__metadata__` of every safetensors file this tool writes: "format" as transformers expects it, and the
# mark by which `--overwrite` knows a HF checkpoint directory as one of its own outputs (io/outputs.py).
WRITER_METADATA = {"format": "pt", "written_by": "hetero-convert"}


def quoted(text: object, limit: int = 160) -> str:
    """A name or value from an untrusted file on one line (control characters escaped), bounded: a string in
    quotes, anything else as its Python literal."""
    s = text if isinstance(text, str) else repr(text)
    s = s.encode("unicode_escape", "backslashreplace").decode("ascii")
    s = s if len(s) <= limit else s[: limit - 3] + "..."
    return "'" + s.replace("'", "\\'") + "'" if isinstance(text, str) else s


def plain_file_name(name: object) -> bool:
    """A file directly inside a directory: a non-empty str, no separator, not '.' or '..', no NUL or other
    control character (so that it prints on one line)."""
    return (type(name) is str and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and not any(ord(c) < 32 or ord(c) == 127 for c in name))


class _Duplicate(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def strict_json(raw: bytes | str, where: str, what: str = "JSON"):
    """JSON as the safetensors library (serde_json) reads it: UTF-8, no NaN/Infinity, no lone surrogate
    escapes; and no key twice in one object (Python's json keeps the last silently). One-line errors."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except _Duplicate as e:
        raise CheckpointError(f"{where}: corrupt {what}: the key {quoted(e.key)} appears twice in one object") \
            from None
    except RecursionError:
        raise CheckpointError(f"{where}: corrupt {what}: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: corrupt {what} ({str(e).splitlines()[0][:200]})") from None
    _check_strings(value, where, what)
    return value


def _check_strings(value, where: str, what: str) -> None:
    """Every string encodes as UTF-8 (json accepts "\\ud800", which no file name or tensor name can be)."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise CheckpointError(f"{where}: corrupt {what}: a string with a lone surrogate escape, "
                                      f"{quoted(v)}") from None
        elif isinstance(v, dict):
            todo += list(v.keys()) + list(v.values())
        elif isinstance(v, list):
            todo += v


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (checked to be an object without duplicate keys) and the byte
    offset where its data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated (only {size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: header length {n} exceeds the file size {size}: truncated or corrupt")
        if n > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: header length {n} exceeds the safetensors limit of "
                                  f"{MAX_JSON_BYTES} bytes")
        text = f.read(n)
    header = strict_json(text, path.name, "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an "
                              f"object)")
    return header, 8 + n


def read_index(index: Path) -> dict[str, str]:
    """The index's weight_map, checked: {tensor name: plain shard file name}, each tensor once."""
    try:
        size = index.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{index}: {size} bytes, not a safetensors index")
        raw = index.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{index}: cannot be read ({e.strerror or e})") from None
    data = strict_json(raw, str(index), "safetensors index")
    if not isinstance(data, dict):
        raise CheckpointError(f"{index}: not a valid safetensors index (a JSON {type(data).__name__}, not an object)")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid safetensors index (no 'weight_map' object)")
    if not weight_map:
        raise CheckpointError(f"{index}: the weight_map names no tensor")
    if "metadata" in data and data["metadata"] is not None and not isinstance(data["metadata"], dict):
        raise CheckpointError(f"{index}: 'metadata' is a {type(data['metadata']).__name__}, not an object")
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise CheckpointError(f"{index}: tensor {quoted(name)} maps to {quoted(file)}, not a file name")
        if not plain_file_name(file):
            raise CheckpointError(f"{index}: tensor {quoted(name)} maps to {quoted(file)}, not a plain file name "
                                  f"inside the checkpoint directory")
    return weight_map


def shard_files(directory: str | Path) -> tuple[dict[str, str] | None, list[str]]:
    """(the index's weight_map, or None for a single-file checkpoint; the shard file names, sorted)."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = read_index(index)
        return weight_map, sorted(set(weight_map.values()))
    if (directory / SINGLE_FILE).is_file():
        return None, [SINGLE_FILE]
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
