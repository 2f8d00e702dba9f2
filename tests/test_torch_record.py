"""torch_record.tensor_span: the byte range of a torch.save record's tensor, found only for the plain records
whose raw bytes are exactly what torch.load returns; anything else is left to torch.load (None), and nothing
the record's pickle names is ever called."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetero_convert.io.torch_record import tensor_span


def record(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def read_span(raw: bytes, dtype, shape):
    span = tensor_span(io.BytesIO(raw), dtype, shape)
    if span is None:
        return None
    if span.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw[span.offset:span.offset + span.nbytes]), dtype=dtype).reshape(shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (1, 4), (2, 1, 3), (0, 4)])
def test_plain_records_are_found_and_equal_torch_load(dtype, shape):
    t = (torch.randn(shape) * 100).to(dtype)
    raw = record(t)
    got = read_span(raw, dtype, shape)
    assert got is not None and torch.equal(got, torch.load(io.BytesIO(raw), weights_only=True))


def test_a_record_written_without_its_crc32_is_read_in_place():
    """Our DCP writer turns torch.save's CRC32 off (no reader checks it), leaving 0 in the zip headers; the
    span is still found, and its bytes are torch.load's (zipfile's own read, which checks the CRC, is not used)."""
    from torch.utils.serialization import config

    t = torch.randn(4, 6).to(torch.bfloat16)
    old, config.save.compute_crc32 = config.save.compute_crc32, False
    try:
        raw = record(t)
    finally:
        config.save.compute_crc32 = old
    assert {i.CRC for i in zipfile.ZipFile(io.BytesIO(raw)).infolist()} == {0}
    got = read_span(raw, torch.bfloat16, (4, 6))
    assert got is not None and torch.equal(got, t)


@pytest.mark.parametrize("name,obj,dtype,shape", [
    ("transposed", torch.arange(12, dtype=torch.float32).reshape(3, 4).t(), torch.float32, (4, 3)),
    ("a view into a larger storage", torch.arange(12, dtype=torch.float32)[4:10], torch.float32, (6,)),
    ("a parameter", torch.nn.Parameter(torch.ones(3)), torch.float32, (3,)),
    ("another dtype than expected", torch.ones(3, dtype=torch.float16), torch.bfloat16, (3,)),
    ("another shape than expected", torch.ones(3, 2), torch.float32, (2, 3)),
    ("a dict of tensors", {"w": torch.ones(3)}, torch.float32, (3,)),
    ("a non-tensor", [1, 2, 3], torch.float32, (3,)),
])
def test_records_that_are_not_the_plain_case_are_left_to_torch_load(name, obj, dtype, shape):
    assert tensor_span(io.BytesIO(record(obj)), dtype, shape) is None, name


def _rewrite(raw: bytes, replace: dict[str, bytes]) -> bytes:
    """The archive with some members' contents replaced (same names, stored uncompressed)."""
    src, out = zipfile.ZipFile(io.BytesIO(raw)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            z.writestr(info.filename, replace.get(info.filename.rsplit("/", 1)[-1], src.read(info)))
    return out.getvalue()


class _Payload:
    """Unpickling calls Path.touch on the marker: the code a hostile data.pkl would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_hostile_data_pkl_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    raw = _rewrite(record(torch.ones(3)), {"data.pkl": pickle.dumps(_Payload(marker), protocol=2)})
    assert tensor_span(io.BytesIO(raw), torch.float32, (3,)) is None
    assert not marker.exists()


def test_big_endian_and_compressed_records_are_left_to_torch_load():
    raw = record(torch.ones(3))
    assert tensor_span(io.BytesIO(_rewrite(raw, {"byteorder": b"big"})), torch.float32, (3,)) is None
    src, out = zipfile.ZipFile(io.BytesIO(raw)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info), zipfile.ZIP_DEFLATED if "/data/" in info.filename
                       else zipfile.ZIP_STORED)
    assert tensor_span(io.BytesIO(out.getvalue()), torch.float32, (3,)) is None


@settings(max_examples=1000, deadline=None)
@given(st.data())
def test_a_corrupted_record_is_never_misread(data):
    """Any bytes of a record changed: either the span is still the untouched data (its bytes equal the
    tensor's), or the record is left to torch.load. Never an exception, never other bytes."""
    t = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    raw = bytearray(record(t))
    span = tensor_span(io.BytesIO(bytes(raw)), torch.float32, (8, 8))
    data_range = range(span.offset, span.offset + span.nbytes)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1).filter(lambda i: i not in data_range))
        raw[at] = data.draw(st.integers(0, 255))
    got = read_span(bytes(raw), torch.float32, (8, 8))
    assert got is None or torch.equal(got, t)
