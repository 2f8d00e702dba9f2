"""torch.distributed.checkpoint's metadata and write-plan classes, without importing DCP as a whole, and our
own writer of its `.metadata` file.

Importing `torch.distributed.checkpoint` runs its package `__init__`, which imports the default planners, and
through them DTensor, torch.fx's symbolic shapes and sympy: 0.6 s of a conversion's start-up on a laptop-class
core and 4.3 s of 10 s on the GPU host we measure on, repeated by every process of a torchrun job. The four
modules that define what a checkpoint's `.metadata` is made of (`stateful`, `metadata`, `planner`, `storage`)
import none of that, so they are loaded here on their own, under their real names, when the package has not
been imported yet; a later `import torch.distributed.checkpoint` (megatron-core's, say) then finds and uses
these very modules, so every class exists once. When loading them on their own fails (another torch may
arrange its files differently), the package is imported as usual.

The one class of a `.metadata` that lives elsewhere, `filesystem._StorageInfo` (where a chunk's bytes are),
is a three-field record; `StorageInfo` stands in for it, and `write_metadata` pickles it under DCP's name,
so the file is exactly what DCP's own writer produces for the same items.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import pickle
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed  # noqa: F401  (the parent package of the modules loaded below)

PACKAGE = "torch.distributed.checkpoint"
LIGHT_MODULES = ("stateful", "metadata", "planner", "storage")
STORAGE_INFO = (f"{PACKAGE}.filesystem", "_StorageInfo")
METADATA_FILE = ".metadata"
DCP_VERSION = "1.0.0"  # what torch's own FileSystemWriter records (filesystem.CURRENT_DCP_VERSION)


def _load_light() -> dict:
    if PACKAGE not in sys.modules:
        base = Path(torch.distributed.__file__).parent / "checkpoint"
        loaded = []
        try:
            for name in LIGHT_MODULES:
                full = f"{PACKAGE}.{name}"
                if full in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(full, base / f"{name}.py")
                module = importlib.util.module_from_spec(spec)
                sys.modules[full] = module
                loaded.append(full)
                spec.loader.exec_module(module)
        except Exception:  # noqa: BLE001 - another layout of torch's files: import DCP as usual
            for full in loaded:
                sys.modules.pop(full, None)
    return {name: importlib.import_module(f"{PACKAGE}.{name}") for name in LIGHT_MODULES}


_M = _load_light()
metadata, planner, storage = _M["metadata"], _M["planner"], _M["storage"]

Metadata = metadata.Metadata
MetadataIndex = metadata.MetadataIndex
TensorStorageMetadata = metadata.TensorStorageMetadata
BytesStorageMetadata = metadata.BytesStorageMetadata
ChunkStorageMetadata = metadata.ChunkStorageMetadata
TensorProperties = metadata.TensorProperties
StorageMeta = getattr(metadata, "StorageMeta", None)  # newer torch only
WriteItem, WriteItemType = planner.WriteItem, planner.WriteItemType
TensorWriteData, BytesIOWriteData = planner.TensorWriteData, planner.BytesIOWriteData
WriteResult = storage.WriteResult


@dataclass
class StorageInfo:
    """Where one item's bytes are: `relative_path` inside the checkpoint directory, at `offset`, `length`
    bytes (DCP's `filesystem._StorageInfo`; `transform_descriptors` names stream transforms such as
    compression, newer torch only)."""

    relative_path: str
    offset: int
    length: int
    transform_descriptors: tuple | None = None

    def __getstate__(self):  # as DCP's own class pickles itself: no None fields
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class StoragePrefix:
    """DCP's `filesystem._StoragePrefix` (a rank's data-file prefix), which megatron-core keeps in the saved
    plans of its `.metadata`; only ever read."""

    prefix: str


FILESYSTEM_STAND_INS = {"_StorageInfo": StorageInfo, "_StoragePrefix": StoragePrefix}


def filesystem_classes(name: str) -> tuple[type, ...]:
    """What DCP's `filesystem.<name>` may be unpickled as: our stand-in, and DCP's own class when that module
    is loaded anyway (last, so a process that has it gets it)."""
    module = sys.modules.get(STORAGE_INFO[0])
    theirs = getattr(module, name, None) if module is not None else None
    return (FILESYSTEM_STAND_INS[name],) + ((theirs,) if isinstance(theirs, type) else ())


class _MetadataPickler(pickle._Pickler):
    """The standard pickler (protocol 2+: objects as NEWOBJ + BUILD), except that the class `StorageInfo` is
    written under DCP's name, so readers unpickle DCP's `_StorageInfo`."""

    def save_global(self, obj, name=None):
        if obj is StorageInfo:
            self.write(pickle.GLOBAL + f"{STORAGE_INFO[0]}\n{STORAGE_INFO[1]}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def build_metadata(items_per_rank: list[list], results: list, checkpoint_id: str | None = None):
    """The checkpoint's Metadata, as DCP's default global save plan and FileSystemWriter.finish make it: one
    TensorStorageMetadata per tensor (its chunks in item order), one BytesStorageMetadata per object, and
    where every item's bytes went."""
    md: dict = {}
    for items in items_per_rank:
        for item in items:
            if item.type == WriteItemType.BYTE_IO:
                md[item.index.fqn] = BytesStorageMetadata()
                continue
            td = item.tensor_data
            entry = md.setdefault(item.index.fqn, TensorStorageMetadata(properties=td.properties, size=td.size,
                                                                        chunks=[]))
            entry.chunks.append(td.chunk)
    out = Metadata(state_dict_metadata=md)
    out.storage_data = {r.index: r.storage_data for r in results}
    if StorageMeta is not None and hasattr(out, "storage_meta"):
        out.storage_meta = StorageMeta(checkpoint_id=checkpoint_id, save_id=str(uuid.uuid4()))
    if hasattr(out, "version"):
        out.version = DCP_VERSION
    return out


def write_metadata(path: str | Path, items_per_rank: list[list], results: list, checkpoint_id: str | None = None):
    """`path/.metadata` for the written items (written to a temporary name, then renamed)."""
    buf = io.BytesIO()
    _MetadataPickler(buf, protocol=pickle.DEFAULT_PROTOCOL).dump(
        build_metadata(items_per_rank, results, checkpoint_id))
    tmp = Path(path) / f"{METADATA_FILE}.tmp"
    tmp.write_bytes(buf.getvalue())
    tmp.rename(Path(path) / METADATA_FILE)
