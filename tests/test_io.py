"""The byte-level pieces under the converters: the positional safetensors writer, the NaN/Inf check, the
source hashes, DCP's stacked layer entries read per layer, read-ahead, and the output's write-back and fsync."""

import hashlib
import json
import os
import random
import sys
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


def write_dcp(path, tensors: dict, chunking: dict):
    """A DCP folder written by our tensor-major writer: `chunking[key]` lists each chunk's (offsets, sizes)."""
    from hetero_convert.io.dcp import finish_metadata, tensor_item, write_groups

    items = [tensor_item(k, t.shape, o, s, t.dtype) for k, t in tensors.items() for o, s in chunking[k]]

    def produce(group):
        for it in group:
            region = tuple(slice(o, o + n) for o, n in zip(it.index.offset, it.tensor_data.chunk.sizes))
            yield it, tensors[it.index.fqn][region].clone()

    results = write_groups(path, [[it] for it in items], produce, lambda it: 0)
    finish_metadata(path, [items], results)


def read_rows(rows, a: int, b: int) -> bytes:
    """Rows [a, b) of a `StoredRows`, each piece read whole."""
    out = bytearray()
    scratch = torch.empty(max(1, (b - a) * rows.row_bytes), dtype=torch.uint8)
    for read, n in rows.pieces(a, b, scratch):
        buf = bytearray(n)
        read(memoryview(buf), 0)
        out += buf
    return bytes(out)


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def test_stacked_layers_read_per_layer_from_their_own_chunks(tmp_path):
    """A homogeneous model's `decoder.layers.X` [L, ...] is seen as `decoder.layers.{i}.X`: equal to DCP's own
    load sliced, each layer read from its own chunks (a bad chunk of layer 1 leaves layer 0 readable)."""
    import torch.distributed.checkpoint as dcp

    from hetero_convert.io.dcp import DCPReader
    from hetero_convert.io.hf_index import CheckpointError

    g = torch.Generator().manual_seed(0)
    L = 3
    tensors = {"decoder.layers.self_attention.linear_qkv.weight": torch.randn(L, 8, 4, generator=g).bfloat16(),
               "decoder.layers.mlp.linear_fc1.layer_norm_weight": torch.randn(L, 4, generator=g),
               "decoder.layers.self_attention.linear_proj.weight": torch.randn(L, 5, 8, generator=g).bfloat16(),
               "decoder.layers.0.special.weight": torch.randn(2, 2, generator=g),
               "embedding.word_embeddings.weight": torch.randn(6, 4, generator=g)}
    qkv, norm, proj, special, emb = tensors
    chunking = {qkv: [((i, 4 * t, 0), (1, 4, 4)) for i in range(L) for t in range(2)],  # per layer, TP=2
                norm: [((0, 0), (L, 4))],  # one chunk holding every layer
                # per layer, column strips of unequal widths, the last one also cut in rows
                proj: [c for i in range(L) for c in (((i, 0, 0), (1, 5, 3)), ((i, 0, 3), (1, 2, 5)),
                                                      ((i, 2, 3), (1, 3, 5)))],
                special: [((0, 0), (2, 2))], emb: [((0, 0), (6, 4))]}
    write_dcp(tmp_path, tensors, chunking)
    reader = DCPReader(tmp_path)
    assert reader.view_stacked_layers(L + 1) == 0 and not reader.stacked  # not this model's layer count
    assert reader.view_stacked_layers(L) == 3 and reader.stacked
    keys = reader.tensor_keys()
    assert qkv not in keys and norm not in keys and proj not in keys and {special, emb} <= set(keys)
    theirs = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in tensors.items()}
    dcp.load(theirs, storage_reader=dcp.FileSystemReader(str(tmp_path)), no_dist=True)
    for i in range(L):
        for key, rest in ((qkv, "self_attention.linear_qkv.weight"), (norm, "mlp.linear_fc1.layer_norm_weight"),
                          (proj, "self_attention.linear_proj.weight")):
            view = f"decoder.layers.{i}.{rest}"
            assert tuple(keys[view].size) == tuple(tensors[key].shape[1:])
            assert torch.equal(reader.load(view), theirs[key][i]) and torch.equal(reader.load(view), tensors[key][i])
            assert torch.equal(reader.load(view, torch.float64), tensors[key][i].double())
            assert reader.tensor_bytes(view) == tensors[key][i].numel() * tensors[key].element_size()
            # As byte ranges of rows (megatron-to-hf's streaming): layer i's rows, at its place in the chunk.
            with reader.stored_rows(view) as rows:
                n = tensors[key].shape[1]
                assert rows.unit == (16 if key == proj else 1)  # the strips' rows gathered, 8 bf16 each
                for a, b in ((0, n), (1, n - 1), (n - 1, n)):
                    assert read_rows(rows, a, b) == raw_bytes(tensors[key][i][a:b]), (view, a, b)
    # Garble layer 1's first chunk of the QKV: layer 1 is refused, naming the stacked entry and the chunk.
    index = next(k for k in reader.metadata.storage_data if k.fqn == qkv and tuple(k.offset) == (1, 0, 0))
    info = reader.metadata.storage_data[index]
    with open(tmp_path / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(b"\0" * 64)
    fresh = DCPReader(tmp_path)
    fresh.view_stacked_layers(L)
    assert torch.equal(fresh.load("decoder.layers.0.self_attention.linear_qkv.weight"), tensors[qkv][0])
    with pytest.raises(CheckpointError, match=r"the chunk of 'decoder\.layers\.self_attention\.linear_qkv\.weight' "
                                              r"at \[1, 0, 0\]"):
        fresh.load("decoder.layers.1.self_attention.linear_qkv.weight")
    # A truncated data file is reported for every layer of a stacked entry it holds.
    with open(tmp_path / info.relative_path, "r+b") as f:
        f.truncate(info.offset)
    missing = fresh.missing_bytes()
    assert {f"decoder.layers.{i}.self_attention.linear_qkv.weight" for i in range(L)} <= set(missing)


def test_read_ahead_reads_each_file_from_its_start_up_to_its_limit(tmp_path, monkeypatch):
    """ReadAhead (run while torch is imported) reads what it is given, exactly `limit` bytes in all when that
    is less, skips files that vanished, and after stop() starts no further read."""
    from hetero_convert.packing import share_of_files
    from hetero_convert.io import read_ahead
    from hetero_convert.io.read_ahead import BLOCK, ReadAhead

    files = []
    for k, size in enumerate([3 * BLOCK + 5, BLOCK // 2, 0, 2 * BLOCK]):
        files.append(tmp_path / f"f{k}")
        files[-1].write_bytes(bytes(size))
    total = sum(f.stat().st_size for f in files)

    def finished(ahead):
        for t in ahead._threads:
            t.join(timeout=30)
            assert not t.is_alive()
        return ahead.bytes_read

    assert finished(ReadAhead(files + [tmp_path / "missing"], limit=10 * BLOCK, threads=3)) == total
    for threads in (1, 2, 4):
        assert finished(ReadAhead(files, limit=BLOCK + 7, threads=threads)) == BLOCK + 7

    reads, gate = [], threading.Event()
    real = read_ahead._read_block

    def held(fd, buf, at):  # the first read waits until the test has called stop()
        reads.append(at)
        gate.wait(30)
        return real(fd, buf, at)

    monkeypatch.setattr(read_ahead, "_read_block", held)
    ahead = ReadAhead(files, limit=total, threads=1)
    while not reads:
        gate.wait(0.01)
    ahead.stop()
    gate.set()
    assert finished(ahead) == BLOCK and len(reads) == 1
    # Under torchrun, each process reads its own share: by bytes, disjoint, all of them together.
    shares = [share_of_files(files, r, 3) for r in range(3)]
    assert sorted(p for s in shares for p in s) == [f for f in files if f.is_file()]


def test_read_ahead_reads_in_the_order_the_conversion_will(tmp_path, monkeypatch):
    """HF shards are read one after another (a conversion goes through the model shard by shard); DCP data
    files abreast, always the next block of the file least far through (every rank's file holds its chunks in
    model order, and a conversion reads each tensor's chunks from all of them). Read one block at a time, the
    order is exact."""
    from hetero_convert.io import read_ahead
    from hetero_convert.io.read_ahead import BLOCK, ReadAhead

    sizes = {"a": 4 * BLOCK, "b": 2 * BLOCK, "c": 4 * BLOCK - 1}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(bytes(size))
    reads, real = [], read_ahead._read_block

    def recorded(fd, buf, at):
        reads.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), at // BLOCK, len(buf)))
        return real(fd, buf, at)

    monkeypatch.setattr(read_ahead, "_read_block", recorded)
    for interleaved in (False, True):
        reads.clear()
        ahead = ReadAhead([tmp_path / n for n in sizes], limit=1 << 40, threads=1, interleaved=interleaved)
        ahead._threads[0].join(timeout=30)
        assert ahead.bytes_read == sum(sizes.values())
        order = [(name, k) for name, k, _ in reads]
        if not interleaved:
            assert order == [(n, k) for n in "abc" for k in range(sizes[n] // BLOCK + (sizes[n] % BLOCK > 0))]
        else:
            # after the first round a is 1/4 through, b 1/2, c just over 1/4; a tie goes to the earlier file
            assert order == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("c", 1), ("a", 2), ("b", 1), ("c", 2),
                             ("a", 3), ("c", 3)]
        assert reads[-1][2] == BLOCK - 1  # c's last block, short


def _recorded_writeback(monkeypatch) -> dict[str, list[tuple[int, int]]]:
    """Record the ranges WRITEBACK hands to the kernel, by file name, instead of handing them over."""
    from hetero_convert.io.writeback import WRITEBACK

    ranges: dict[str, list[tuple[int, int]]] = {}
    assert WRITEBACK.handed_over(timeout=30)  # what earlier tests submitted is not recorded here

    def record(fd, start, length, flags):
        ranges.setdefault(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), []).append((start, start + length))
        return 0

    monkeypatch.setattr(WRITEBACK, "_fn", record)
    return ranges


def _covered(ranges: list[tuple[int, int]]) -> int:
    ranges, total, reach = sorted(ranges), 0, 0
    for a, b in ranges:
        assert a % 4096 == 0 and b % 4096 == 0 and a >= reach, "ranges page-aligned and disjoint"
        total, reach = total + b - a, b
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_write_back_is_started_for_every_whole_page_written(tiny_sources, tmp_path, monkeypatch):
    """Both writers hand the pages they finish to the write-back thread while converting (so the disk writes
    while it reads): a DCP data file from its first byte to its last whole page, a safetensors tensor the
    whole pages inside its own bytes (the pages at its edges are shared with its neighbours' writes)."""
    from hetero_convert import hf_to_megatron, megatron_to_hf
    from hetero_convert.io.writeback import WRITEBACK

    ranges = _recorded_writeback(monkeypatch)
    meg = tmp_path / "meg"
    hf_to_megatron(tiny_sources["tiny-every-kind"], meg, tp=2, workers=2)
    megatron_to_hf(meg, tmp_path / "hf", max_shard_size=300_000)
    assert WRITEBACK.handed_over(timeout=30)
    data = sorted((meg / "release").glob("*.distcp"))
    assert data
    for f in data:
        assert _covered(ranges.pop(f.name)) == f.stat().st_size // 4096 * 4096
    shards = sorted((tmp_path / "hf").glob("*.safetensors"))
    assert len(shards) > 1 and set(ranges) == {f.name for f in shards}
    for f in shards:
        raw = f.read_bytes()
        head = 8 + int.from_bytes(raw[:8], "little")
        spans = [(head + t["data_offsets"][0], head + t["data_offsets"][1])
                 for k, t in json.loads(raw[8:head]).items() if k != "__metadata__"]
        inner = sum(max(0, (b // 4096 - -(-a // 4096)) * 4096) for a, b in spans)
        assert _covered(ranges[f.name]) == inner > 0
        for a, b in ranges[f.name]:
            assert any(s <= a and b <= e for s, e in spans), "a range never crosses into another tensor's bytes"


def test_output_is_fsynced_before_it_is_published(tiny_sources, tmp_path, monkeypatch):
    """Every file and folder of the output is fsynced while it is still the hidden staging folder, and the
    parent folder after the rename: a crash never leaves a published output whose data is not on the disk."""
    from hetero_convert import hf_to_megatron
    from hetero_convert.io import staging, writeback

    events = []
    real_fsync, real_rename = writeback._fsync_path, staging.rename_noreplace
    monkeypatch.setattr(writeback, "_fsync_path", lambda p, d: (events.append(("fsync", str(p))), real_fsync(p, d)))
    monkeypatch.setattr(staging, "rename_noreplace",
                        lambda a, b: (events.append(("rename", str(a), str(b))), real_rename(a, b)))
    out = tmp_path / "meg"
    hf_to_megatron(tiny_sources["tiny-llama"], out)
    (k, (_, tmp, dst)), = [(k, e) for k, e in enumerate(events) if e[0] == "rename"]
    assert dst == str(out)
    synced_before = {e[1] for e in events[:k]}
    for path in [out, *out.rglob("*")]:
        assert str(path).replace(str(out), tmp, 1) in synced_before, path
    assert events[k + 1:] == [("fsync", str(tmp_path))]


@pytest.mark.parametrize("cores, through", [(2, False), (8, True), (32, True)])
def test_read_ahead_lasts_the_conversion_only_where_cores_are_plentiful(tmp_path, monkeypatch, cores, through):
    """The CLI's read-ahead stops once torch is imported on a small machine (where its extra copy competes with
    a CPU-bound conversion) and reads on to the conversion's end on a many-core one (where the disk sets the
    pace); either way it is stopped when the conversion ends."""
    from hetero_convert.cli import process

    (tmp_path / "f").write_bytes(bytes(1 << 20))
    monkeypatch.setattr(process.os, "cpu_count", lambda: cores)
    ahead = process.ReadAheadShare([tmp_path / "f"], 0, 1)
    ahead.imported()
    assert ahead.reader._stopped.is_set() is not through
    first = ahead.reader
    ahead.follow([(tmp_path / "f", 1000, 5000), (tmp_path / "f", 0, 100)])  # the conversion's plan, once known
    if through:  # read on along the plan, the files' own reader stopped
        assert first.stopped and ahead.reader is not first
        for t in ahead.reader._threads:
            t.join(timeout=30)
        assert ahead.reader.bytes_read == 5100
    else:
        assert ahead.reader is first
    ahead.done()
    assert ahead.reader._stopped.is_set()


@pytest.mark.parametrize("cores, reads", [(2, False), (16, True)])
def test_hashing_process_reads_ahead_too_only_where_cores_are_plentiful(tmp_path, monkeypatch, cores, reads):
    """hf-to-megatron hashes its source from the start, which reads it. On a small machine that is all the
    reading ahead it does (a second reader would cost a copy of every byte); on a many-core one the read-ahead
    runs beside it (the few hashing threads read the disk at about half its speed)."""
    from hetero_convert.cli import process

    (tmp_path / "f").write_bytes(bytes(3 << 20))
    monkeypatch.setattr(process.os, "cpu_count", lambda: cores)
    ahead = process.ReadAheadShare([tmp_path / "f"], 0, 1, hashed=True)
    for t in ahead.reader._threads:
        t.join(timeout=10)
    assert ahead.reader.stop() == (3 << 20 if reads else 0)
    unhashed = process.ReadAheadShare([tmp_path / "f"], 0, 1, hashed=False)  # not hashed: read ahead anyway
    for t in unhashed.reader._threads:
        t.join(timeout=10)
    assert unhashed.reader.stop() == 3 << 20


def test_fsync_refusal_by_the_filesystem_is_not_a_failure_but_a_write_error_is(tmp_path, monkeypatch):
    """A filesystem that cannot fsync (EINVAL: some FUSE and network ones, for folders) does not fail the job;
    an I/O error does: the output would not be on the disk."""
    import errno as errnos

    from hetero_convert.io import writeback

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x")
    for code, fails in ((errnos.EINVAL, False), (errnos.EIO, True)):
        def refuse(fd, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(writeback.os, "fsync", refuse)
        if fails:
            with pytest.raises(OSError):
                writeback.fsync_tree(tmp_path / "d")
        else:
            writeback.fsync_tree(tmp_path / "d")


@pytest.mark.parametrize("tp", [1, 2])
def test_the_read_plan_is_what_the_conversion_then_reads_in_that_order(tmp_path, tiny_sources, monkeypatch, tp):
    """Both directions announce the byte ranges they will read (the CLI reads ahead along them). Every read of
    the source afterwards falls inside one of them, each of them is read, and (one worker) they are first
    read in the order given: reading ahead along the plan reads what the conversion wants next."""
    from hetero_convert.convert import hf_to_megatron, megatron_to_hf

    reads: list[tuple[str, int, int]] = []
    real = os.preadv

    def recorded(fd, buffers, offset, *rest):
        got = real(fd, buffers, offset, *rest)
        reads.append((os.readlink(f"/proc/self/fd/{fd}"), offset, got))
        return got

    monkeypatch.setattr(os, "preadv", recorded)
    meg, back = tmp_path / "meg", tmp_path / "back"
    for run, source in ((lambda cb: hf_to_megatron(tiny_sources["tiny-every-kind"], meg, tp=tp, checksums=False,
                                                   on_read_plan=cb), tiny_sources["tiny-every-kind"]),
                        (lambda cb: megatron_to_hf(meg, back, on_read_plan=cb), meg)):
        plans: list[list] = []
        reads.clear()
        run(plans.append)
        (plan,) = plans
        assert plan and all(str(p).startswith(str(source)) for p, _, _ in plan)
        first_read: dict[int, int] = {}
        for k, (path, at, n) in enumerate(r for r in reads if r[0].startswith(str(source))):
            inside = [i for i, (p, a, length) in enumerate(plan) if str(p) == path and a <= at and at + n <= a + length]
            assert inside, (path, at, n)
            for i in inside:
                first_read.setdefault(i, k)
        assert sorted(first_read) == list(range(len(plan)))  # every planned range is read
        order = [first_read[i] for i in range(len(plan))]
        assert order == sorted(order)
        if tp == 1 and source == tiny_sources["tiny-every-kind"]:
            # a row-parallel weight (o_proj, down_proj) read whole is one contiguous read, not one per row
            from hetero_convert.io.hf_reader import HFCheckpoint

            infos = {(str(i.file), i.offset): name for name, i in HFCheckpoint(source).tensors.items()}
            source_reads = [r for r in reads if r[0].startswith(str(source))]
            row_parallel = [(str(p), a, n) for p, a, n in plan
                            if infos[(str(p), a)].endswith(("o_proj.weight", "down_proj.weight"))]
            assert row_parallel
            for p, a, n in row_parallel:
                assert sum(1 for path, at, _ in source_reads if path == p and a <= at < a + n) == 1


def test_read_ahead_allowance_is_the_nodes_and_the_plan_reader_takes_what_is_left(tmp_path, monkeypatch):
    """A quarter of the available memory in all: the processes of one node share it (torchrun), and the reader
    that follows the plan gets only what the files' reader left of it, reading a range listed twice once."""
    from hetero_convert.cli import process
    from hetero_convert.io import read_ahead

    mib = 1 << 20
    (tmp_path / "f").write_bytes(bytes(4 * mib))
    monkeypatch.setattr(process.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(read_ahead, "available_memory", lambda: 4 * 6 * mib)  # a 6 MiB allowance per node

    def finished(ahead):
        for t in ahead.reader._threads:
            t.join(timeout=10)
        return ahead.reader.bytes_read

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert finished(process.ReadAheadShare([tmp_path / "f"], 0, 1)) == 3 * mib  # half of it each
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    ahead = process.ReadAheadShare([tmp_path / "f"], 0, 1)
    assert finished(ahead) == 4 * mib and ahead.reader.allowance == 2 * mib
    reads, real = [], read_ahead._read_block
    monkeypatch.setattr(read_ahead, "_read_block", lambda fd, buf, at: (reads.append((at, len(buf))),
                                                                        real(fd, buf, at))[1])
    ahead.follow([(tmp_path / "f", 0, mib), (tmp_path / "f", 0, mib), (tmp_path / "f", mib, 3 * mib)])
    assert finished(ahead) == 2 * mib
    assert sorted(reads) == [(0, mib), (mib, mib)]


def test_a_failing_read_plan_callback_does_not_fail_the_conversion(tmp_path, tiny_sources):
    """Reading ahead only brings reads forward: a callback that cannot start (no thread to be had) is
    ignored, and the conversion completes and is exact."""
    import torch
    from safetensors.torch import load_file

    from hetero_convert.convert import hf_to_megatron, megatron_to_hf

    def refuse(plan):
        raise RuntimeError("can't start new thread")

    src = tiny_sources["tiny-llama"]
    hf_to_megatron(src, tmp_path / "meg", checksums=False, on_read_plan=refuse)
    megatron_to_hf(tmp_path / "meg", tmp_path / "back", on_read_plan=refuse)
    a = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted((tmp_path / "back").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cores,workers,local,threads", [(16, 8, None, 1), (16, 1, "8", 1), (16, 2, None, 4),
                                                        (32, 1, "2", 8), (2, 2, None, 1), (64, 2, "8", 2)])
def test_intra_op_threads_share_the_node_among_its_processes(monkeypatch, cores, workers, local, threads):
    """Every writer thread of every process on the node counts: 8 torchrun processes on 16 cores each keep one
    intra-op thread (with 8 each, their OpenMP teams spun 9x the CPU of one process doing the same work)."""
    from hetero_convert.cli import process

    monkeypatch.setattr(process.os, "cpu_count", lambda: cores)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert process.intra_op_threads(workers) == threads
