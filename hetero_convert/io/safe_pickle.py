"""Reading the pickled parts of a checkpoint without running what they ask for.

Two kinds of pickle reach us from an input checkpoint, and neither may name an arbitrary global (a pickle that
names `os.system` calls it while loading):

- DCP's `.metadata` file, which torch writes with plain `pickle.dump` and its own `FileSystemReader` reads with
  plain `pickle.load`. `load_dcp_metadata` reads it with a restricted unpickler that admits only the classes
  torch's DCP metadata is made of (those of torch 2.4 .. 2.13, and the ShardedTensor `TensorProperties` that
  older DCP pickled), calls only the few functions and classes that rebuild them, and sets state only on
  instances of those classes; `check_dcp_metadata` then checks that what came out has the structure DCP
  promises (every chunk inside its tensor, chunks that tile it exactly, every chunk stored in a plain file name
  of the directory, byte ranges that do not overlap).
- torch.save files: Megatron's `common.pt` (a training run's argparse namespace, enums), `_extra_state`
  payloads and megatron-core 0.19's `common_state` object. `load_common` reads them with
  `torch.load(weights_only=True)` plus an explicit allow-list, the same list megatron-core 0.16 / 0.19 register
  for their own loads (Megatron's own classes are matched by name through stand-ins, so reading a training
  run's args does not import megatron-core).

Everything refused raises `UnsafePickleError` (a `CheckpointError`): one line naming the file and the global
or the structure it asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import io
import itertools
import math
import os
import pickle
import re
import signal
import sys
import threading
import types
from pathlib import Path, PosixPath, PurePosixPath

from .hf_index import CheckpointError, plain_file_name

METADATA_FILE = ".metadata"
# A 253B model at TP=8 PP=16 with its optimizer state has a few hundred thousand chunks: tens of MB.
MAX_METADATA_BYTES = 1 << 30
MAX_NESTING = 64


class UnsafePickleError(CheckpointError):
    """Pickled content that asks for something outside the allow-list, or is not what it claims to be."""


def _short(text: object, limit: int = 160) -> str:
    """One line, bounded: for names and values taken from an untrusted file."""
    try:
        s = text if isinstance(text, str) else repr(text)
    except ValueError:  # repr of an int of more than 4,300 digits raises
        s = f"<a {type(text).__name__} too long to print>"
    s = s.encode("unicode_escape", "backslashreplace").decode("ascii")  # no newline or control character
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ---- the DCP metadata allow-list --------------------------------------------------------------------------

# (module, name) of every class DCP pickles into `.metadata`, by the torch version that pickles it.
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties",  # older DCP pickled the ShardedTensor one below instead
        "StorageMeta",  # absent from older torch: then simply not admitted
    ),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo", "_StoragePrefix"),
    # megatron-core's save keeps every rank's local plan in the metadata (`all_local_plans`), to reuse it
    "torch.distributed.checkpoint.planner": ("SavePlan", "WriteItem", "TensorWriteData", "BytesIOWriteData"),
    # what DCP's metadata imported before it had its own TensorProperties; torch 2.13 still has the class
    "torch.distributed._shard.sharded_tensor.metadata": ("TensorProperties",),
}
_DCP_ENUMS = {
    "torch.distributed.checkpoint.metadata": ("_MEM_FORMAT_ENCODING",),
    "torch.distributed.checkpoint.planner": ("WriteItemType",),
    "torch.distributed._shard.sharded_tensor.metadata": ("MEM_FORMAT_ENCODING",),
}


def _resolve(module: str, name: str):
    """The class a `.metadata` names, without importing DCP as a whole (dcp_types loads its light modules):
    `filesystem._StorageInfo` is admitted as our stand-in for it (and as DCP's own class when that module is
    loaded anyway); a module of older torch that is not loaded yet is imported only if a pickle names it."""
    from . import dcp_types

    if module == dcp_types.STORAGE_INFO[0] and name in dcp_types.FILESYSTEM_STAND_INS:
        return dcp_types.filesystem_classes(name)
    light = {f"{dcp_types.PACKAGE}.{m}": getattr(dcp_types, m, None) for m in ("metadata", "planner", "storage")}
    if module in light and light[module] is not None:
        return getattr(light[module], name, None)
    if module.startswith(dcp_types.PACKAGE) and module not in sys.modules:
        return None  # a DCP module no checkpoint of this torch names (e.g. filesystem's _StoragePrefix)
    try:
        __import__(module)
        return getattr(sys.modules[module], name)
    except (ImportError, AttributeError):
        return None  # a name of another torch version: nothing to admit


class _DCPAllowList:
    """What a `.metadata` pickle may name, built once (the torch classes resolved in the installed torch)."""

    def __init__(self):
        import torch

        self.classes: dict[tuple[str, str], type] = {}  # may be created (NEWOBJ) and given state (BUILD)
        self.callables: dict[tuple[str, str], object] = {}  # may be called (REDUCE)
        self.storage_types: tuple[type, ...] = ()
        self.build_types_extra: tuple[type, ...] = ()
        for module, names in _DCP_CLASSES.items():
            for name in names:
                cls = _resolve(module, name)
                if isinstance(cls, tuple):  # DCP's filesystem records: our stand-in, or DCP's own class
                    self.classes[(module, name)] = cls[-1]
                    self.build_types_extra += cls
                    if name == "_StorageInfo":
                        self.storage_types = cls
                elif isinstance(cls, type):
                    self.classes[(module, name)] = cls
        for module, names in _DCP_ENUMS.items():
            for name in names:
                cls = _resolve(module, name)
                if isinstance(cls, type) and issubclass(cls, enum.Enum):
                    self.callables[(module, name)] = cls
        self.callables[("torch", "Size")] = torch.Size
        self.callables[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
        # StorageMeta.checkpoint_id is the path the checkpoint was saved to (a str or a Path)
        for module in ("pathlib", "pathlib._local"):  # Python 3.13 moved the classes into pathlib._local
            self.callables[(module, "PosixPath")] = PosixPath
            self.callables[(module, "PurePosixPath")] = PurePosixPath
        # dtypes and layouts are pickled as the torch attribute of that name (layouts also via _get_layout)
        self.constants: dict[tuple[str, str], object] = {}
        for name in dir(torch):
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout)):
                self.constants[("torch", name)] = value
        self.build_types = tuple(self.classes.values()) + self.build_types_extra
        self.setstate_types = tuple(c for c in self.build_types if "__setstate__" in vars(c))
        # identity sets: membership of an object from the stack must not call its __hash__ / __eq__
        self.build_ids = {id(c) for c in self.build_types}
        self.callable_ids = {id(c) for c in self.callables.values()}


_ALLOW: _DCPAllowList | None = None
_ALLOW_LOCK = threading.Lock()


def _allow_list() -> _DCPAllowList:
    global _ALLOW
    with _ALLOW_LOCK:
        if _ALLOW is None:
            _ALLOW = _DCPAllowList()
        return _ALLOW


class _Refused(Exception):
    """Raised inside the unpickler; turned into UnsafePickleError naming the file."""


def _refuse_opcode(name: str):
    def refuse(self):
        raise _Refused(f"uses the {name} opcode, which DCP metadata never does")
    return refuse


class _RestrictedUnpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler with every opcode that can reach code gated by the allow-list.

    The C unpickler can only be restricted in `find_class`; that is not enough here: its BUILD would set any
    attribute (of a class object too: `TensorProperties.__setstate__ = ...` pollutes the class for the whole
    process), and its APPEND / SETITEM call `append` / `__setitem__` on whatever object is on the stack."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, allow: _DCPAllowList):
        super().__init__(file, fix_imports=False)
        self.allow = allow

    def find_class(self, module, name):
        key = (module, name)
        for table in (self.allow.classes, self.allow.callables, self.allow.constants):
            if key in table:
                return table[key]
        raise _Refused(f"asks for the global '{_short(module, 80)}.{_short(name, 80)}', which is not one of the "
                       f"classes DCP metadata is made of")

    def persistent_load(self, pid):
        raise _Refused("uses a persistent id, which DCP metadata never does")

    def _load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in self.allow.callable_ids or type(args) is not tuple:
            raise _Refused(f"calls {_short(func, 80)}, which DCP metadata never calls")
        self.stack[-1] = func(*args)

    def _new_object(self, cls, args, kwargs):
        if id(cls) not in self.allow.build_ids or type(args) is not tuple:
            raise _Refused(f"creates {_short(cls, 80)}, which is not one of the classes DCP metadata is made of")
        if args or kwargs:  # DCP's dataclasses are created bare, their fields then set by BUILD
            raise _Refused(f"creates {cls.__name__} with arguments, which DCP metadata never does")
        return cls.__new__(cls)

    def _load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new_object(cls, args, None))

    def _load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new_object(cls, args, kwargs))

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if id(type(inst)) not in self.allow.build_ids:
            raise _Refused(f"sets the state of {_short(type(inst).__name__, 80)}, which DCP metadata never does")
        if isinstance(inst, self.allow.setstate_types):  # TensorProperties: a 5-tuple
            if type(state) is not tuple:
                raise _Refused(f"gives {type(inst).__name__} a {type(state).__name__} state, not a tuple")
            inst.__setstate__(state)
            return
        if type(state) is not dict:
            raise _Refused(f"gives {type(inst).__name__} a {type(state).__name__} state, not a dict")
        for k, v in state.items():
            if type(k) is not str or k.startswith("__"):
                raise _Refused(f"sets attribute {_short(k, 80)} of {type(inst).__name__}")
            inst.__dict__[k] = v

    def _load_append(self):
        value = self.stack.pop()
        self._container(list).append(value)

    def _load_appends(self):
        items = self.pop_mark()
        self._container(list).extend(items)

    def _load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._container(dict)[key] = value

    def _load_setitems(self):
        items = self.pop_mark()
        target = self._container(dict)
        if len(items) % 2:
            raise _Refused("sets a dict item without a value")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def _load_additems(self):
        items = self.pop_mark()
        self._container(set).update(items)

    def _container(self, kind: type):
        target = self.stack[-1] if self.stack else None
        if type(target) is not kind:
            raise _Refused(f"adds items to a {_short(type(target).__name__, 80)}, not a {kind.__name__}")
        return target

    def _load_frame(self):
        """As pickle's own, but a frame must hold the bytes its header declares: the C unpickler (plain
        `pickle.load`, what DCP uses) refuses a short one as truncated; the Python one would read on."""
        size = int.from_bytes(self.read(8), "little")
        if size > MAX_METADATA_BYTES:
            raise _Refused(f"declares a frame of {size} bytes, more than any DCP metadata file")
        self._unframer.load_frame(size)
        frame = self._unframer.current_frame
        if frame is not None and len(frame.getbuffer()) != size:
            raise _Refused(f"declares a frame of {size} bytes where {len(frame.getbuffer())} remain (truncated)")

    for _op, _fn in (
        (pickle.FRAME, _load_frame), (pickle.REDUCE, _load_reduce), (pickle.NEWOBJ, _load_newobj), (pickle.NEWOBJ_EX, _load_newobj_ex),
        (pickle.BUILD, _load_build), (pickle.APPEND, _load_append), (pickle.APPENDS, _load_appends),
        (pickle.SETITEM, _load_setitem), (pickle.SETITEMS, _load_setitems), (pickle.ADDITEMS, _load_additems),
    ):
        dispatch[_op[0]] = _fn
    # Protocol 0/1 object creation and the copyreg extension registry: never in DCP's protocol-4+ pickles.
    for _op, _name in ((pickle.INST, "INST"), (pickle.OBJ, "OBJ"), (pickle.EXT1, "EXT1"), (pickle.EXT2, "EXT2"),
                       (pickle.EXT4, "EXT4")):
        dispatch[_op[0]] = _refuse_opcode(_name)
    del _op, _fn, _name


def unpickle_dcp_metadata(data: bytes, where: str):
    """The object a `.metadata` pickle describes, rebuilt with the allow-list only (not yet checked)."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), _allow_list()).load()
    except _Refused as e:
        raise UnsafePickleError(f"{where}: refused: the pickle {e}") from None
    except RecursionError:
        raise UnsafePickleError(f"{where}: not a valid DCP metadata file (nested too deeply)") from None
    except Exception as e:  # truncated, garbled, a constructor given the wrong arguments
        first = str(e).splitlines()[0] if str(e) else ""
        raise UnsafePickleError(f"{where}: not a valid DCP metadata file ({type(e).__name__}: "
                                f"{_short(first)})") from None


def load_dcp_metadata(path: str | Path):
    """Read, unpickle safely and check one `.metadata` file: the `Metadata` plain `pickle.load` would give."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_METADATA_BYTES:
            raise UnsafePickleError(f"{path}: {size} bytes, more than any DCP metadata file ({MAX_METADATA_BYTES})")
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    md = unpickle_dcp_metadata(data, str(path))
    check_dcp_metadata(md, str(path))
    return md


def validate_dcp_metadata(directory: str | Path):
    """What a DCP directory must pass before a loader that trusts it gets it (megatron-core's, which unpickles
    `.metadata` with plain pickle, and `common.pt` and its objects with torch.load's defaults, which torch < 2.6
    does not restrict): the metadata is safe to unpickle and consistent, every chunk's bytes are in a data
    file of the directory, and `common.pt` and every object record (`_extra_state`, `common_state`, RNG
    states) load under `load_common`'s allow-list. Tensor data is not read. Returns the Metadata."""
    from .dcp import DCPReader  # dcp builds on this module

    directory = Path(directory)
    md = load_dcp_metadata(directory / METADATA_FILE)
    sizes: dict[str, int | None] = {}
    for index, info in md.storage_data.items():
        name = info.relative_path
        if name not in sizes:
            p = directory / name
            sizes[name] = p.stat().st_size if p.is_file() else None
        if sizes[name] is None:
            raise CheckpointError(f"{directory / METADATA_FILE}: '{_short(index.fqn)}' is stored in {name}, which "
                                  f"is missing")
        if info.offset + info.length > sizes[name]:
            raise CheckpointError(f"{directory / name}: truncated: '{_short(index.fqn)}' needs bytes up to "
                                  f"{info.offset + info.length}, the file has {sizes[name]}")
    if (directory / "common.pt").is_file():
        load_common(directory / "common.pt")
    reader = DCPReader(directory)
    for key in reader.object_keys():
        reader.load_object(key)
    return md


# ---- the structure DCP promises ---------------------------------------------------------------------------


def _ints(value, what: str, where: str, ndim: int | None = None) -> tuple[int, ...]:
    import torch

    if type(value) is not torch.Size or not all(type(d) is int and d >= 0 for d in value):
        raise UnsafePickleError(f"{where}: {what} is {_short(value, 80)}, not a torch.Size of non-negative ints")
    if ndim is not None and len(value) != ndim:
        raise UnsafePickleError(f"{where}: {what} has {len(value)} dimensions, the tensor has {ndim}")
    return tuple(value)


def check_dcp_metadata(md, where: str) -> None:
    """Refuse a Metadata whose structure is not what DCP writes (one line naming the file and the entry).

    Checked: the types of every field; every tensor's dtype; every chunk inside its tensor, the chunks
    tiling the tensor exactly (no overlap, no gap: what DCP's own save planner validates before writing,
    so a genuine checkpoint always passes, and a load never leaves memory unwritten); every chunk and object
    stored under a plain file name of the directory, with non-negative offset and length, its record no
    shorter than the chunk's raw bytes (torch.save stores them uncompressed), and no two records sharing bytes.
    """
    import torch

    from .dcp_types import (BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                            TensorStorageMetadata)

    allow = _allow_list()
    if type(md) is not Metadata:
        raise UnsafePickleError(f"{where}: holds a {_short(type(md).__name__, 80)}, not DCP Metadata")
    sdm, storage = getattr(md, "state_dict_metadata", None), getattr(md, "storage_data", None)
    if type(sdm) is not dict or type(storage) is not dict:
        raise UnsafePickleError(f"{where}: state_dict_metadata and storage_data must be dicts")
    # The two big tables are checked field by field below; the rest (planner data, megatron's saved plans,
    # storage_meta) only for its types and depth: nothing reads it.
    _check_plain_tree([v for k, v in md.__dict__.items() if k not in ("state_dict_metadata", "storage_data")],
                      where, allow)
    sm = getattr(md, "storage_meta", None)
    if sm is not None and type(sm) is not StorageMeta:
        raise UnsafePickleError(f"{where}: storage_meta is a {_short(type(sm).__name__, 80)}")
    for index, info in storage.items():
        if type(index) is not MetadataIndex or type(getattr(index, "fqn", None)) is not str:
            raise UnsafePickleError(f"{where}: a storage_data key is {_short(index, 80)}, not a MetadataIndex")
        if type(info) not in allow.storage_types:
            raise UnsafePickleError(f"{where}: '{_short(index.fqn)}' is stored as a {_short(type(info).__name__, 80)}")
        rel, off, length = (getattr(info, k, None) for k in ("relative_path", "offset", "length"))
        if not plain_file_name(rel):
            raise UnsafePickleError(f"{where}: '{_short(index.fqn)}' is stored in {_short(rel, 80)}, not a plain "
                                    f"file name inside the checkpoint directory")
        if type(off) is not int or type(length) is not int or not (0 <= off < 2**63 and 0 <= length < 2**63):
            raise UnsafePickleError(f"{where}: '{_short(index.fqn)}' has offset {_short(off, 40)} and length "
                                    f"{_short(length, 40)}: not non-negative 64-bit ints")
        td = getattr(info, "transform_descriptors", None)
        if td is not None and (type(td) not in (list, tuple) or not all(type(t) is str for t in td)):
            raise UnsafePickleError(f"{where}: '{_short(index.fqn)}' has transform descriptors {_short(td, 80)}")
    properties_types = tuple(c for c in allow.build_types if c.__name__ == "TensorProperties")
    for key, entry in sdm.items():
        if type(key) is not str:
            raise UnsafePickleError(f"{where}: a state_dict_metadata key is {_short(key, 80)}, not a str")
        if type(entry) is BytesStorageMetadata:
            if MetadataIndex(key) not in storage:
                raise UnsafePickleError(f"{where}: object '{_short(key)}' has no storage entry")
            continue
        if type(entry) is not TensorStorageMetadata:
            raise UnsafePickleError(f"{where}: '{_short(key)}' is described by a {_short(type(entry).__name__, 80)}")
        props = getattr(entry, "properties", None)
        dtype = getattr(props, "dtype", None)
        if type(props) not in properties_types or not isinstance(dtype, torch.dtype):
            raise UnsafePickleError(f"{where}: '{_short(key)}' has dtype {_short(dtype, 80)}, not a torch dtype")
        size = _ints(getattr(entry, "size", None), f"the size of '{_short(key)}'", where)
        chunks = getattr(entry, "chunks", None)
        if type(chunks) is not list or not all(type(c) is ChunkStorageMetadata for c in chunks):
            raise UnsafePickleError(f"{where}: the chunks of '{_short(key)}' are not a list of ChunkStorageMetadata")
        boxes = []
        for chunk in chunks:
            what = f"a chunk of '{_short(key)}'"
            offsets = _ints(getattr(chunk, "offsets", None), f"the offsets of {what}", where, len(size))
            sizes = _ints(getattr(chunk, "sizes", None), f"the sizes of {what}", where, len(size))
            if any(o + s > d for o, s, d in zip(offsets, sizes, size)):
                raise UnsafePickleError(f"{where}: {what} at {list(offsets)} size {list(sizes)} lies outside "
                                        f"the tensor {list(size)}")
            info = storage.get(MetadataIndex(key, offsets))
            if info is None:
                raise UnsafePickleError(f"{where}: {what} at {list(offsets)} has no storage entry")
            if not info.transform_descriptors and info.length < math.prod(sizes) * dtype.itemsize:
                raise UnsafePickleError(f"{where}: {what} at {list(offsets)} is {list(sizes)} {dtype} "
                                        f"({math.prod(sizes) * dtype.itemsize} bytes) but its record in "
                                        f"{info.relative_path} has {info.length} bytes")
            boxes.append((offsets, sizes))
        _check_tiling(key, size, boxes, where)
    _check_records_disjoint(storage, where)


def _check_plain_tree(root, where: str, allow: _DCPAllowList) -> None:
    """Every object reachable from `root` is a plain value or an allowed class, nested at most MAX_NESTING
    deep (walked without recursion; shared objects visited once)."""
    import torch

    plain = (str, int, float, bool, bytes, type(None))
    constants = (torch.dtype, torch.layout, torch.memory_format)  # memory_format: set by TensorProperties
    allowed = allow.build_types + tuple(c for c in allow.callables.values() if isinstance(c, type))
    todo, seen = [(root, 0)], set()
    while todo:
        obj, depth = todo.pop()
        if id(obj) in seen or type(obj) in plain:
            continue
        seen.add(id(obj))
        if depth > MAX_NESTING:
            raise UnsafePickleError(f"{where}: objects nested more than {MAX_NESTING} deep")
        if type(obj) in (list, tuple, set, frozenset):
            todo += [(o, depth + 1) for o in obj]
        elif type(obj) is dict:
            todo += [(o, depth + 1) for kv in obj.items() for o in kv]
        elif isinstance(obj, constants) or (isinstance(obj, enum.Enum) and type(obj) in allowed):
            continue
        elif type(obj) in allowed:
            if isinstance(obj, tuple):  # torch.Size
                todo += [(o, depth + 1) for o in obj]
            todo += [(o, depth + 1) for o in getattr(obj, "__dict__", {}).values()]
        else:
            raise UnsafePickleError(f"{where}: holds a {_short(type(obj).__name__, 80)}")


def _check_tiling(key: str, size: tuple[int, ...], boxes: list, where: str) -> None:
    """The chunks cover the tensor exactly: their volumes add up to its volume and no two overlap."""
    total = math.prod(size)
    if sum(math.prod(s) for _, s in boxes) != total:
        raise UnsafePickleError(f"{where}: the chunks of '{_short(key)}' do not cover its {list(size)} elements "
                                f"exactly (they hold {sum(math.prod(s) for _, s in boxes)})")
    if len(boxes) < 2 or not size:
        return
    # Sweep along the longest dimension: only boxes whose ranges there overlap can overlap at all.
    d = max(range(len(size)), key=lambda k: size[k])
    order = sorted((b for b in boxes if math.prod(b[1])), key=lambda b: b[0][d])
    active: list = []
    for off, sz in order:
        active = [b for b in active if b[0][d] + b[1][d] > off[d]]
        for o2, s2 in active:
            if all(a < b + sb and b < a + sa for a, sa, b, sb in zip(off, sz, o2, s2)):
                raise UnsafePickleError(f"{where}: two chunks of '{_short(key)}' overlap: at {list(off)} and "
                                        f"{list(o2)}")
        active.append((off, sz))


def _check_records_disjoint(storage: dict, where: str) -> None:
    """No two entries read the same bytes: a genuine writer never shares a record, and a shared one would
    make one chunk a silent copy of another."""
    by_file: dict[str, list] = {}
    for index, info in storage.items():
        by_file.setdefault(info.relative_path, []).append((info.offset, info.length, index.fqn))
    for name, ranges in by_file.items():
        ranges.sort()
        for (o1, l1, k1), (o2, _, k2) in itertools.pairwise(ranges):
            if o2 < o1 + l1:
                raise UnsafePickleError(f"{where}: the records of '{_short(k1)}' and '{_short(k2)}' in {name} "
                                        f"overlap (bytes {o2}..{o1 + l1})")


# ---- torch.save files: common.pt, _extra_state, common_state ------------------------------------------------


class _StandIn:
    """Megatron's enums and config dataclasses, matched by name without importing megatron-core (3-4 s and a
    page of warnings on a machine without Transformer Engine). An enum member is pickled as a call with its
    value; a dataclass as a new object whose state is set from a dict. The stand-in keeps either."""

    def __init__(self, value=None):
        self.value = value

    def __eq__(self, other):
        return type(other) is type(self) and other.__dict__ == self.__dict__

    def __hash__(self):
        return hash((type(self).__qualname__, repr(self.value)))

    def __repr__(self):
        return f"{type(self).__qualname__}({self.value!r})" if not self.__dict__.keys() - {"value"} \
            else f"{type(self).__qualname__}({self.__dict__})"


# What megatron-core 0.16.1 / 0.19.2 register in megatron/core/safe_globals.py (their own allow-list for the
# same files), by the name a pickle gives them.
_MEGATRON_NAMES = (
    ("megatron.core.transformer.enums", "AttnBackend"),
    ("megatron.core.transformer.enums", "CudaGraphScope"),
    ("megatron.core.transformer.enums", "CudaGraphModule"),
    ("megatron.core.transformer.enums", "InferenceCudaGraphScope"),
    ("megatron.core.transformer.enums", "AttnMaskType"),
    ("megatron.core.transformer.enums", "AttnType"),
    ("megatron.core.transformer.enums", "LayerType"),
    ("megatron.core.enums", "ModelType"),
    ("megatron.core.rerun_state_machine", "RerunDiagnostic"),
    ("megatron.core.rerun_state_machine", "RerunMode"),
    ("megatron.core.rerun_state_machine", "RerunState"),
    ("megatron.core.optimizer.optimizer_config", "OptimizerConfig"),
)


def _named_stand_in(module: str, name: str) -> type:
    # torch matches a global by "{__module__}.{__qualname__}"; the stand-in carries Megatron's name.
    return type(name, (_StandIn,), {"__module__": module, "__qualname__": name})


_STAND_INS = {key: _named_stand_in(*key) for key in _MEGATRON_NAMES}


def _common_allow_list() -> list:
    import numpy

    import torch

    allowed: list = [argparse.Namespace, types.SimpleNamespace, PosixPath, signal.Signals, io.BytesIO,
                     torch.Generator]
    for (module, name), stand_in in _STAND_INS.items():
        real = getattr(sys.modules.get(module), name, None)  # megatron already imported: its own class
        allowed.append(real if isinstance(real, type) else stand_in)
    # numpy arrays (Megatron-LM keeps numpy RNG states): the classes megatron-core admits too
    allowed += [numpy.ndarray, numpy.dtype]
    dtypes = getattr(numpy, "dtypes", None)
    allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")] if dtypes else []
    core = numpy._core if hasattr(numpy, "_core") else numpy.core
    reconstruct = core.multiarray._reconstruct
    allowed.append(reconstruct)
    if _named_globals_supported():  # a numpy 1.x pickle names it numpy.core.multiarray._reconstruct
        allowed += [(reconstruct, f"{m}.multiarray._reconstruct") for m in ("numpy.core", "numpy._core")]
    return allowed


def _named_globals_supported() -> bool:
    """torch >= 2.6 admits (object, "module.name") pairs in its safe-globals list."""
    import torch

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 6)


_COMMON_LOCK = threading.Lock()
_GLOBAL_RE = re.compile(r"GLOBAL ([^\s]+)")


def load_common(source: str | Path | bytes | bytearray | memoryview | io.IOBase, where: str | None = None):
    """torch.load(weights_only=True) of a Megatron common.pt, an `_extra_state` payload or a common_state
    object, admitting the explicit allow-list above besides tensors and plain values. `source` is a path,
    bytes or a binary file; `where` names it in errors (defaults to the path)."""
    import torch

    if isinstance(source, (bytes, bytearray, memoryview)):
        stream, name = io.BytesIO(bytes(source)), where or "<bytes>"
    elif isinstance(source, (str, os.PathLike)):
        stream, name = source, where or str(source)
    else:
        stream, name = source, where or getattr(source, "name", "<stream>")
    with _COMMON_LOCK:
        allowed = _common_allow_list()
        try:
            scope = torch.serialization.safe_globals(allowed)
        except AttributeError:  # torch 2.4: no scoped form, add them for the process (they are harmless)
            torch.serialization.add_safe_globals(allowed)
            scope = contextlib.nullcontext()
        try:
            with scope:
                return torch.load(stream, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafePickleError(f"{name}: {weights_only_reason(str(e))}") from None
        except Exception as e:  # a truncated or garbled file: the zip reader's complaint, on one line
            first = str(e).splitlines()[0] if str(e) else ""
            raise CheckpointError(f"{name}: cannot be read as a torch.save file ({type(e).__name__}: "
                                  f"{_short(first)})") from None


def weights_only_reason(message: str) -> str:
    """One line out of torch's several-paragraph weights_only refusal, starting with "refused": the global
    the pickle asked for, or the unpickler's own complaint (a garbled record: "Unsupported operand 255")."""
    m = _GLOBAL_RE.search(message)
    if m:
        name = m.group(1).rstrip(".")
        name = name if "." in name else f"builtins.{name}"  # torch drops the "builtins." it finds
        return (f"refused: the pickle asks for the global '{_short(name, 120)}', which is not on the allow-list "
                f"of what Megatron checkpoints hold")
    tail = message.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return f"refused by the weights-only unpickler: {_short(lines[0] if lines else 'unreadable pickle')}"
