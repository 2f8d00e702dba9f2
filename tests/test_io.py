"""The byte-level pieces under the converters: the positional safetensors writer, the NaN/Inf check and the
source hashes."""

import hashlib
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from hetero_convert.convert.common import ErrorSink, check_finite
from hetero_convert.io import checksums
from hetero_convert.io.checksums import FileHashes, sha256_file
from hetero_convert.io.safetensors_writer import StreamingSafetensorsWriter


def layout_and_tensors():
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (7, 5), "b": (3,), "c": (0, 4), "d": (64, 33), "e": (1,)}
    dtypes = {"a": torch.bfloat16, "b": torch.float32, "c": torch.float16, "d": torch.bfloat16, "e": torch.int64}
    tensors = {k: (torch.randn(shapes[k], generator=gen) * 10).to(dtypes[k]) for k in shapes}
    return [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], tensors


def test_writer_any_order_from_threads_reads_back_with_safetensors(tmp_path):
    layout, tensors = layout_and_tensors()
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", layout)
    order = list(tensors)
    random.Random(1).shuffle(order)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda k: w.write(k, tensors[k]), order))
    w.close()
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


def test_writer_refuses_holes_repeats_and_strangers(tmp_path):
    layout, tensors = layout_and_tensors()
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", layout)
    w.write("d", tensors["d"])
    with pytest.raises(ValueError, match="'d' written twice"):
        w.write("d", tensors["d"])
    with pytest.raises(ValueError, match="'z' is not planned"):
        w.write("z", tensors["d"])
    with pytest.raises(ValueError, match=r"'a' is torch.float32 \(7, 5\), planned torch.bfloat16"):
        w.write("a", tensors["a"].float())
    with pytest.raises(ValueError, match=r"4 tensors were never written \(first: 'a'\)"):
        w.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_finds_one_bad_value_anywhere(dtype, bad):
    """The check reads only min and max: a single NaN/Inf in any vector lane or in the tail must still show."""
    for n in (1, 17, 4099, 1 << 20):
        for pos in {0, min(1, n - 1), n // 2, n - 1}:
            t = torch.randn(n).to(dtype)
            t[pos] = bad
            sink = ErrorSink()
            check_finite(t, "w", sink, strict=False)
            assert sink.warnings == ["w: 1 NaN/Inf values"], (n, pos)
    sink = ErrorSink()
    check_finite(torch.randn(4099).to(dtype), "w", sink, strict=True)
    assert sink.warnings == [] and sink.errors == []


def test_sha256_over_blocks_equals_hashlib(tmp_path, monkeypatch):
    monkeypatch.setattr(checksums, "BLOCK", 1 << 16)  # several blocks and a partial last one
    data = random.Random(0).randbytes((1 << 18) + 12345)
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_file_hashes_background_and_late_files(tmp_path):
    files = []
    for k in range(3):
        files.append(tmp_path / f"s{k}.safetensors")
        files[-1].write_bytes(bytes([k]) * (1000 + k))
    hashes = FileHashes(files[:2])  # the third was not known when hashing started
    got = hashes.results(files)
    assert got == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_file_hashes_close_stops_between_blocks(tmp_path, monkeypatch):
    """close() during a file's first block: the thread hashes no further block and records no digest."""
    monkeypatch.setattr(checksums, "BLOCK", 1 << 12)
    p = tmp_path / "big"
    p.write_bytes(b"x" * (1 << 20))  # 256 blocks
    blocks, first_block, closed = [], threading.Event(), threading.Event()

    real_sha256 = hashlib.sha256

    class Recorder:
        def __init__(self):
            self.h = real_sha256()

        def update(self, data):
            blocks.append(len(data))
            first_block.set()
            closed.wait(5)  # the main thread closes while this block is being hashed
            self.h.update(data)

        def hexdigest(self):
            return self.h.hexdigest()

    monkeypatch.setattr(checksums.hashlib, "sha256", Recorder)
    hashes = FileHashes([p])
    assert first_block.wait(5)
    hashes.close()
    closed.set()
    for t in hashes._threads:
        t.join(5)
    assert not any(t.is_alive() for t in hashes._threads)
    assert blocks == [1 << 12] and hashes._digests == {}


def test_writer_keeps_a_tensor_whose_write_failed_pending(tmp_path, monkeypatch):
    """A write that raises (disk full) must not count: close() still reports the tensor as missing."""
    layout, tensors = layout_and_tensors()
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", layout)

    def full(buf, at):
        raise OSError(28, "No space left on device")

    real = w._pwrite
    monkeypatch.setattr(w, "_pwrite", full)
    with pytest.raises(OSError):
        w.write("a", tensors["a"])
    monkeypatch.setattr(w, "_pwrite", real)
    for k in ("b", "c", "d", "e"):
        w.write(k, tensors[k])
    with pytest.raises(ValueError, match=r"1 tensors were never written \(first: 'a'\)"):
        w.close()


def test_file_hashes_of_several_files_on_several_threads(tmp_path):
    """Several threads hash several files at once; every digest is hashlib's, whatever thread made it."""
    paths = []
    for k in range(5):
        p = tmp_path / f"f{k}"
        p.write_bytes(bytes([k]) * (3 << 20) + b"tail" * k)
        paths.append(p)
    hashes = FileHashes(paths, threads=3)
    assert len(hashes._threads) == 3
    got = hashes.results(paths)
    assert got == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
