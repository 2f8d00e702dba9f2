"""Chunks streamed through a small buffer (io/streamed.py): the same bytes as torch.save of the whole chunk, the
same checks, the same failures."""

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from hetero_convert.convert import ConversionError, hf_to_megatron
from hetero_convert.convert import to_megatron
from hetero_convert.io import dcp, streamed
from hetero_convert.io.dcp import DCPReader
from hetero_convert.io.hf_reader import HFCheckpoint
from hetero_convert.io.megatron_checkpoint import ITERATION_DIR
from hetero_convert.io.streamed import StreamedChunk, save_streamed
from hetero_convert.mappings import bind
from hetero_convert.plan import load_plan
from hetero_convert.convert.to_megatron import ToMegatronJob

FIXTURES = ["tiny-every-kind", "tiny-tied", "tiny-ultra-kinds", "tiny-llama"]


@pytest.fixture(scope="module")
def sources(tiny_sources):
    return tiny_sources


def stream_everything(monkeypatch, block: int = 96):
    """Every chunk streamed (the fixtures' chunks are all below the size that is streamed by default), through
    a block buffer of `block` bytes, so chunks span many blocks; returns the counts of records written streamed
    ("n") and of column strips written with a hole and filled from the rows ("holes")."""
    monkeypatch.setattr(to_megatron, "STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(dcp, "BLOCK_BYTES", block)
    monkeypatch.setattr(to_megatron, "BLOCK_BYTES", block)  # column strips: one source row per block
    calls = {"n": 0, "holes": 0}
    real, real_hole = dcp.save_streamed, dcp.save_hole

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    def counted_hole(*a, **k):
        calls["holes"] += 1
        return real_hole(*a, **k)

    monkeypatch.setattr(dcp, "save_streamed", counted)
    monkeypatch.setattr(dcp, "save_hole", counted_hole)
    return calls


def data_files(meg: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((meg / ITERATION_DIR).glob("*.distcp"))}


# ---- the pieces ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("tp", [1, 2])
def test_byte_pieces_are_the_bytes_read_chunk_reads(sources, name, tp):
    """Each chunk's pieces, read from the files, are its bytes as read_chunk builds them; only a column chunk
    narrower than its source (strided rows) has none."""
    ckpt = HFCheckpoint(sources[name])
    for m in bind(load_plan(sources[name]), tp=tp):
        dtype = ckpt.tensors[m.hf[0]].dtype
        for c in m.chunks(tp):
            pieces = m.byte_pieces(c, dtype.itemsize)
            if pieces is None:
                assert m.tp_rule == "cols" and tp > 1, m.megatron
                continue
            got = bytearray()
            for hf_name, start, n in pieces:
                buf = bytearray(n)
                if hf_name is not None:
                    ckpt.read_bytes(hf_name, start, memoryview(buf))
                got += buf
            want = m.read_chunk(ckpt, c, dtype)
            assert bytes(got) == want.view(-1).view(torch.uint8).numpy().tobytes(), (m.megatron, c)


# ---- one record ------------------------------------------------------------------------------------------------


def saved(t: torch.Tensor) -> bytes:
    b = io.BytesIO()
    with dcp._without_crc32():
        torch.save(t, b)
    return b.getvalue()


def streamed_record(tmp_path: Path, t: torch.Tensor, cuts: list[int], block: int, prefix: bytes = b"") -> bytes:
    """`t` written by save_streamed from pieces cut at byte offsets `cuts`, after `prefix` in the same file."""
    raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    bounds = [0] + sorted(set(cuts)) + [len(raw)]
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            pieces.append((lambda buf, at, a=a: buf.__setitem__(slice(None), raw[a + at:a + at + len(buf)]), b - a))
    seen = []
    chunk = StreamedChunk(t.dtype, tuple(t.shape), pieces, inspect=seen.append, failed=pytest.fail)
    path = tmp_path / "f.distcp"
    with open(path, "w+b") as f:
        f.write(prefix)
        with dcp._without_crc32():  # as the writer threads save
            save_streamed(f, chunk, torch.empty(block, dtype=torch.uint8))
        end = f.tell()
    data = path.read_bytes()
    assert len(data) == end
    assert sum(x.numel() for x in seen) == t.numel()  # every element was looked at, once
    return data[len(prefix):]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 9), dtype=st.sampled_from([torch.bfloat16, torch.float32,
       torch.float16]), cut_rows=st.lists(st.integers(0, 40), max_size=4), block_elems=st.integers(1, 50),
       prefix=st.binary(max_size=70))
def test_a_streamed_record_is_the_bytes_torch_save_writes(tmp_path_factory, rows, cols, dtype, cut_rows,
                                                          block_elems, prefix):
    t = torch.randn(rows, cols).to(dtype)
    row = cols * dtype.itemsize
    got = streamed_record(tmp_path_factory.mktemp("r"), t, [min(r, rows) * row for r in cut_rows],
                          block_elems * 8, prefix)
    assert got == saved(t)
    assert torch.equal(torch.load(io.BytesIO(got), weights_only=True), t)


def test_zero_pieces_are_zeros_and_a_failed_read_leaves_zeros_behind(tmp_path):
    t = torch.randn(6, 4).to(torch.bfloat16)
    raw = t.view(-1).view(torch.uint8).numpy().tobytes()
    errors = []

    def broken(buf, at):
        raise OSError("gone")

    chunk = StreamedChunk(t.dtype, (12, 4), [(lambda buf, at: buf.__setitem__(slice(None), raw[at:at + len(buf)]),
                                              len(raw)), (None, 16), (broken, 32)],
                          inspect=lambda b: None, failed=errors.append)
    with open(tmp_path / "f", "w+b") as f:
        save_streamed(f, chunk, torch.empty(16, dtype=torch.uint8))
    back = torch.load(tmp_path / "f", weights_only=True)
    assert torch.equal(back[:6], t) and not back[6:].any()
    assert [str(e) for e in errors] == ["gone"]  # once, though the piece spans two blocks


def test_a_record_without_the_plain_layout_is_written_whole(tmp_path, monkeypatch):
    """Where torch's record is not one `tensor_span` recognises (a later torch), the hole is cut off again and
    the chunk saved the plain way: the same bytes."""
    monkeypatch.setattr(streamed, "tensor_span", lambda *a: None)
    t = torch.randn(20, 3).to(torch.bfloat16)
    assert streamed_record(tmp_path, t, [24], 16, b"head") == saved(t)


# ---- whole conversions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("tp,pp,block", [(1, 1, 96), (2, 2, 96), (2, 2, 1000)])  # 1000: strips filled several
def test_streamed_conversion_writes_the_same_files(sources, tmp_path, monkeypatch, name, tp, pp, block):  # rows a block
    hf_to_megatron(sources[name], tmp_path / "plain", tp=tp, pp=pp, workers=2)
    calls = stream_everything(monkeypatch, block)
    hf_to_megatron(sources[name], tmp_path / "streamed", tp=tp, pp=pp, workers=2)
    assert calls["n"] > 0 and (calls["holes"] > 0) == (tp > 1)
    plain, stream = data_files(tmp_path / "plain"), data_files(tmp_path / "streamed")
    assert plain.keys() == stream.keys() and all(plain[k] == stream[k] for k in plain)


def test_streamed_chunks_hold_no_budget(sources, monkeypatch):
    """The writer threads' memory budget counts what a group reads whole: nothing once every chunk streams,
    whole-row chunks and the column strips of a row-parallel weight at TP > 1 (holes filled from the rows)
    alike; everything when nothing streams."""
    monkeypatch.setattr(to_megatron, "STREAM_MIN_BYTES", 0)
    job = ToMegatronJob(sources["tiny-every-kind"], Path("/nonexistent"), 2, 1, None, False, None)
    assert any(m.tp_rule == "cols" for m in job.maps)
    for m, group in zip(job.maps, job.grouped.groups):
        assert job.held_bytes(group) == 0, m.megatron
    monkeypatch.setattr(to_megatron, "STREAM_MIN_BYTES", 1 << 40)
    assert all(job.held_bytes(g) == job.grouped.write_bytes(g) for g in job.grouped.groups[:len(job.maps)])


def copy_src(sources, tmp_path, name="tiny-every-kind") -> Path:
    return Path(shutil.copytree(sources[name], tmp_path / "src"))


def with_nan_and_inf(src: Path, key: str) -> torch.Tensor:
    """Tensor `key` of the checkpoint `src` rewritten with a NaN first and an Inf last (for a row-parallel
    weight at TP=2: one in each column strip); returns it."""
    shard = src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(shard)
    tensors[key][0, 0] = float("nan")
    tensors[key][-1, -1] = float("-inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    return tensors[key]


def test_nan_in_several_blocks_is_counted_once_and_refused_with_strict(sources, tmp_path, monkeypatch):
    src = copy_src(sources, tmp_path)
    with_nan_and_inf(src, "model.layers.7.mlp.up_proj.weight")
    calls = stream_everything(monkeypatch)
    s = hf_to_megatron(src, tmp_path / "meg")
    assert calls["n"] > 0
    assert [w for w in s.warnings if "NaN/Inf" in w] == [
        "layer 7: decoder.layers.7.mlp.linear_fc1.weight (from model.layers.7.mlp.gate_proj.weight, "
        "model.layers.7.mlp.up_proj.weight): 2 NaN/Inf values"]
    with pytest.raises(ConversionError, match=r"linear_fc1.weight .* 2 NaN/Inf values \(refused: --strict\)"):
        hf_to_megatron(src, tmp_path / "meg2", strict=True)
    assert not (tmp_path / "meg2").exists() and not list(tmp_path.glob(".meg2.partial-*"))


def test_nan_in_column_strips_is_counted_once_per_tensor(sources, tmp_path, monkeypatch):
    """down_proj at TP=2 is two column strips filled from one pass over its rows: its NaN/Inf are counted
    once, for the tensor, wherever they are."""
    src = copy_src(sources, tmp_path)
    poisoned = with_nan_and_inf(src, "model.layers.7.mlp.down_proj.weight")
    calls = stream_everything(monkeypatch, 1000)
    s = hf_to_megatron(src, tmp_path / "meg", tp=2)
    assert calls["holes"] > 0
    assert [w for w in s.warnings if "NaN/Inf" in w] == [
        "layer 7: decoder.layers.7.mlp.linear_fc2.weight (from model.layers.7.mlp.down_proj.weight): 2 NaN/Inf values"]
    with pytest.raises(ConversionError, match=r"linear_fc2.weight .* 2 NaN/Inf values \(refused: --strict\)"):
        hf_to_megatron(src, tmp_path / "strict", tp=2, strict=True)
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob(".strict.partial-*"))
    back = DCPReader(tmp_path / "meg" / ITERATION_DIR).load("decoder.layers.7.mlp.linear_fc2.weight")
    assert torch.equal(back.view(torch.int16), poisoned.view(torch.int16))  # bit for bit, NaN included


def test_column_strips_without_the_plain_record_are_written_whole(sources, tmp_path, monkeypatch):
    """Where torch's record is not one `tensor_span` recognises, a strip is saved whole instead: the same files,
    NaN/Inf counted once, refused under --strict."""
    src = copy_src(sources, tmp_path)
    with_nan_and_inf(src, "model.layers.7.mlp.down_proj.weight")
    s_plain = hf_to_megatron(src, tmp_path / "plain", tp=2)
    calls = stream_everything(monkeypatch, 1000)
    monkeypatch.setattr(streamed, "tensor_span", lambda *a: None)
    s = hf_to_megatron(src, tmp_path / "fallback", tp=2)
    assert calls["holes"] > 0
    plain, fallback = data_files(tmp_path / "plain"), data_files(tmp_path / "fallback")
    assert plain.keys() == fallback.keys() and all(plain[k] == fallback[k] for k in plain)
    nan = [w for w in s.warnings if "NaN/Inf" in w]  # as the plain path, which checks each strip it reads
    assert nan == [w for w in s_plain.warnings if "NaN/Inf" in w] == [
        "layer 7: decoder.layers.7.mlp.linear_fc2.weight (from model.layers.7.mlp.down_proj.weight): 1 NaN/Inf values"]
    with pytest.raises(ConversionError, match=r"linear_fc2.weight .*NaN/Inf values \(refused: --strict\)"):
        hf_to_megatron(src, tmp_path / "strict", tp=2, strict=True)
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("tp", [1, 2])  # TP=2: down_proj's column strips, filled from one pass over its rows
def test_a_source_cut_short_while_streaming_fails_naming_the_tensor(sources, tmp_path, monkeypatch, tp):
    """The shard is truncated after the checks, during the conversion: the conversion fails naming the file
    and tensor, once, and publishes nothing."""
    src = copy_src(sources, tmp_path)
    stream_everything(monkeypatch)
    key = "model.layers.3.mlp.down_proj.weight"
    info = HFCheckpoint(src).tensors[key]
    real = HFCheckpoint.read_bytes

    def cut(self, name, start, buf):
        if name == key and start > 0:
            with open(info.file, "r+b") as f:
                f.truncate(info.offset + start)
        return real(self, name, start, buf)

    monkeypatch.setattr(HFCheckpoint, "read_bytes", cut)
    with pytest.raises(ConversionError) as e:
        hf_to_megatron(src, tmp_path / "meg", tp=tp, workers=2)
    lines = [x for x in str(e.value).splitlines() if "down_proj" in x or "linear_fc2" in x]
    assert lines == [f"layer 3: decoder.layers.3.mlp.linear_fc2.weight: CheckpointError: {info.file}: unexpected "
                     f"end of file reading tensor '{key}'"], str(e.value)
    assert not (tmp_path / "meg").exists() and not list(tmp_path.glob(".meg.partial-*"))


def test_pieces_that_are_not_the_chunks_bytes_are_refused_before_anything_is_written(tmp_path):
    t = torch.zeros(4, 4, dtype=torch.bfloat16)
    chunk = StreamedChunk(t.dtype, (4, 4), [(None, 30)], inspect=lambda b: None, failed=pytest.fail)
    with open(tmp_path / "f", "w+b") as f:
        with pytest.raises(ValueError, match="its pieces hold 30 bytes"):
            save_streamed(f, chunk, torch.empty(16, dtype=torch.uint8))
        assert f.tell() == 0
