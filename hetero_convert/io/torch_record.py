"""Where a torch.save record keeps a tensor's bytes, so a reader can put them straight where they belong.

DCP stores every chunk as one torch.save record: a zip archive whose members are stored uncompressed.
`<prefix>/data.pkl` is a small pickle that rebuilds the tensor (`torch._utils._rebuild_tensor_v2` called with
a storage, an offset, the shape and the strides), `<prefix>/data/<key>` holds that storage's raw bytes and
`<prefix>/byteorder` says in which byte order. torch.load reads a record into a fresh tensor; assembling a
TP-sharded weight from eight such tensors then allocates and copies every byte a second time.

`tensor_span` finds the byte range of the tensor's data when the record is the plain case torch's writers
produce for a chunk: one tensor of the expected dtype and shape, at storage offset 0, contiguous, its storage
exactly its size, little-endian, stored uncompressed. Then those bytes, read as they are, are what torch.load
would return. For anything else it answers None and the caller uses torch.load (weights_only) as before.

data.pkl is untrusted: it is read by an unpickler that knows the four globals such a record names, calls
only stand-ins of our own (never a torch function), and gives up on anything else.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from typing import NamedTuple

import torch

MAX_PICKLE_BYTES = 1 << 16  # one tensor's data.pkl is ~160 bytes
_STORAGE_DTYPES = {
    "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16, "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64, "ByteStorage": torch.uint8, "CharStorage": torch.int8,
    "ShortStorage": torch.int16, "IntStorage": torch.int32, "LongStorage": torch.int64, "BoolStorage": torch.bool,
}
# signature, version, flags, method, time, date, crc32, compressed size, size, name length, extra length
_LOCAL_HEADER = struct.Struct("<4s2xHH8xLLHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_NEXT_SIGNATURES = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x07\x08", b"PK\x06\x06", b"PK\x05\x06")


class FileRange(io.RawIOBase):
    """bytes [offset, offset + length) of an unbuffered file, as a seekable stream of its own. It has
    `readinto`, which torch.load uses to read each record straight into the tensor's storage."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self.f, self.start, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")
        want = min(len(view), self.length - self.pos)
        if want <= 0:
            return 0
        done = 0
        while done < want:  # fill it all: torch's reader treats a short read as the end of the data
            got = os.preadv(self.f.fileno(), [view[done:want]], self.start + self.pos + done)
            if got <= 0:
                break
            done += got
        self.pos += done
        return done


class Span(NamedTuple):
    """The tensor's data: `nbytes` bytes at `offset` of the record."""

    offset: int
    nbytes: int


class _NotPlain(Exception):
    pass


class _StorageType(NamedTuple):
    dtype: torch.dtype


class _Storage(NamedTuple):
    dtype: torch.dtype
    key: str
    numel: int


class _Tensor(NamedTuple):
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple


def _rebuild(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """Stands in for torch._utils._rebuild_tensor_v2: records its arguments, builds nothing."""
    if type(storage) is not _Storage or backward_hooks or metadata:
        raise _NotPlain
    return _Tensor(storage, storage_offset, tuple(size), tuple(stride))


def _empty_hooks():
    """Stands in for collections.OrderedDict, called with no arguments for the (empty) backward hooks."""
    return {}


class _RecordUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return _empty_hooks
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise _NotPlain

    def persistent_load(self, pid):
        if (type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage" or type(pid[1]) is not _StorageType
                or type(pid[2]) is not str or type(pid[4]) is not int):
            raise _NotPlain
        return _Storage(pid[1].dtype, pid[2], pid[4])


def _contiguous(size: tuple, stride: tuple) -> bool:
    expected = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n > 1 and s != expected:
            return False
        expected *= n
    return True


def _member_start(record: io.RawIOBase, info: zipfile.ZipInfo) -> int | None:
    """Where a stored member's bytes begin, once its local header names it and agrees with the directory; None
    otherwise. Its bytes are then read as they are: torch's writers may leave the CRC at 0 (when asked not to
    compute it), so zipfile's own read, which checks it, is not used."""
    record.seek(info.header_offset)
    head = record.read(_LOCAL_HEADER.size)
    if len(head) != _LOCAL_HEADER.size:
        return None
    signature, flags, method, csize, usize, name_len, extra_len = _LOCAL_HEADER.unpack(head)
    sizes = (info.file_size, 0xFFFFFFFF) + ((0,) if flags & 0x08 else ())  # 0: in a data descriptor after it
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if (signature != _LOCAL_SIGNATURE or method != zipfile.ZIP_STORED or info.compress_type != zipfile.ZIP_STORED
            or record.read(name_len) != info.orig_filename.encode()
            or csize not in sizes or usize not in sizes
            or start + info.file_size > record.seek(0, io.SEEK_END)):
        return None
    return start


def _member_bytes(record: io.RawIOBase, info: zipfile.ZipInfo) -> bytes | None:
    start = _member_start(record, info)
    if start is None:
        return None
    record.seek(start)
    data = record.read(info.file_size)
    return data if len(data) == info.file_size else None


def tensor_span(record: io.RawIOBase, dtype: torch.dtype, shape: tuple[int, ...]) -> Span | None:
    """The span of `record` (a torch.save archive, seekable) holding a plain tensor of `dtype` and `shape`,
    or None when the record is anything else (torch.load then decides what it holds)."""
    try:
        with zipfile.ZipFile(record) as z:
            pickles = [i for i in z.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            infos = {i.filename: i for i in z.infolist()}  # a repeated name: the last, as getinfo gives
        if len(pickles) != 1 or pickles[0].file_size > MAX_PICKLE_BYTES:
            return None
        prefix = pickles[0].filename[: -len("data.pkl")]
        pickled = _member_bytes(record, pickles[0])
        if pickled is None:
            return None
        t = _RecordUnpickler(io.BytesIO(pickled), fix_imports=False).load()
        if type(t) is not _Tensor or t.storage.dtype != dtype or t.size != tuple(shape) or t.offset != 0:
            return None
        numel = 1
        for n in shape:
            numel *= n
        if t.storage.numel != numel or not _contiguous(t.size, t.stride):
            return None
        if f"{prefix}byteorder" in infos and _member_bytes(record, infos[f"{prefix}byteorder"]) != b"little":
            return None
        info = infos.get(f"{prefix}data/{t.storage.key}")
        if info is None or info.file_size != numel * dtype.itemsize:
            return None
        # The data must end where the next zip structure begins: any other bytes would not be the ones torch.load
        # reads.
        start = _member_start(record, info)
        if start is None:
            return None
        record.seek(start + info.file_size)
        if record.read(4) not in _NEXT_SIGNATURES:
            return None
        return Span(start, info.file_size)
    except Exception:  # noqa: BLE001 - any malformed record is torch.load's to judge (and refuse)
        return None
