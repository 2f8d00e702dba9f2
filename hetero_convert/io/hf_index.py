"""Which files a HF safetensors checkpoint directory consists of, read from its index alone.

Kept free of torch so the CLI can know (and start hashing) the source files before its heavy imports; the
reader (`hf_reader.HFCheckpoint`) validates the same list against the shards' headers.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def shard_files(directory: str | Path) -> tuple[dict[str, str] | None, list[str]]:
    """(the index's weight_map, or None for a single-file checkpoint; the shard file names, sorted)."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        return weight_map, sorted(set(weight_map.values()))
    if (directory / SINGLE_FILE).is_file():
        return None, [SINGLE_FILE]
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
