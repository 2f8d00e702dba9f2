"""megatron-to-hf streaming HF tensors from the stored records through a small buffer (dcp.StoredRows and
StreamingSafetensorsWriter.write_streamed): the same files as loading each tensor whole, the same checks, the
same failures, and no memory budget taken for what streams."""

import gc
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from test_io import raw_bytes, read_rows

from hetero_convert.convert import ConversionError, hf_to_megatron, megatron_to_hf
from hetero_convert.convert import to_hf
from hetero_convert.io import dcp, hf_checkpoint
from hetero_convert.io.dcp import DCPReader
from hetero_convert.io.megatron_checkpoint import ITERATION_DIR
from hetero_convert.io.streamed import StreamedChunk
from hetero_convert.mappings import bind
from hetero_convert.plan import load_plan

FIXTURES = ["tiny-every-kind", "tiny-tied", "tiny-ultra-kinds", "tiny-llama"]
LAYOUTS = [(1, 1), (2, 2)]


@pytest.fixture(scope="module")
def megatron(tiny_sources, tmp_path_factory) -> dict[tuple[str, int, int], Path]:
    """Every fixture converted at each layout, once for the module (never modified: tests copy first)."""
    root = tmp_path_factory.mktemp("streamed_to_hf")
    out = {}
    for name in FIXTURES:
        for tp, pp in LAYOUTS:
            out[(name, tp, pp)] = root / f"{name}-{tp}-{pp}"
            hf_to_megatron(tiny_sources[name], out[(name, tp, pp)], tp=tp, pp=pp)
    return out


def stream_everything(monkeypatch, block: int = 8000) -> dict:
    """Every tensor that can stream does (the fixtures' tensors are all below the size streamed by default),
    through a block buffer of `block` bytes so tensors span many blocks; returns the count of HF tensors
    written streamed."""
    monkeypatch.setattr(to_hf, "STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(to_hf, "BLOCK_BYTES", block)
    calls = {"n": 0}
    real = hf_checkpoint.ShardedWriter.write_streamed

    def counted(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(hf_checkpoint.ShardedWriter, "write_streamed", counted)
    return calls


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


# ---- the rows ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_stored_rows_are_the_rows_load_gives(megatron, tiny_sources, name, tp, pp):
    """Every tensor is seen as byte ranges of its chunks (column strips for a row-parallel weight saved at
    TP > 1), and any run of rows read through them is those rows of the loaded tensor: read whole, and block by
    block through a buffer of a few rows (a strip's rows gathered per block)."""
    reader = DCPReader(megatron[(name, tp, pp)] / ITERATION_DIR)
    for m in bind(load_plan(tiny_sources[name])):
        full = reader.load(m.megatron)
        n = full.shape[0]
        with reader.stored_rows(m.megatron) as rows:
            assert rows.unit == (rows.row_bytes if tp > 1 and m.tp_rule == "cols" else 1), m.megatron
            for a, b in ((0, n), (0, 1), (n // 3, n - n // 3), (n - 1, n)):
                assert read_rows(rows, a, b) == raw_bytes(full[a:b]), (m.megatron, a, b)
                block = torch.empty(3 * rows.row_bytes + 5, dtype=torch.uint8)
                scratch = torch.empty_like(block)
                chunk = StreamedChunk(full.dtype, tuple(full[a:b].shape), rows.pieces(a, b, scratch),
                                      lambda t: None, lambda e: pytest.fail(repr(e)), rows.unit)
                assert torch.equal(chunk.materialize(block), full[a:b]), (m.megatron, a, b)


@pytest.mark.parametrize("tp", [1, 2])
def test_a_record_that_is_not_plain_is_loaded_instead(megatron, monkeypatch, tp):
    """Given up on, with the files it opened closed again (an unclosed file warns when it is collected)."""
    reader = DCPReader(megatron[("tiny-every-kind", tp, tp)] / ITERATION_DIR)
    spans = []
    real = dcp.tensor_span
    monkeypatch.setattr(dcp, "tensor_span", lambda *a: (spans.append(1), real(*a) if len(spans) < tp else None)[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        assert reader.stored_rows("embedding.word_embeddings.weight") is None
        gc.collect()
    assert len(spans) == tp  # at TP=2 the first chunk's record was fine, the second not
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


# ---- whole conversions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_streamed_conversion_writes_the_same_files(megatron, tmp_path, monkeypatch, name, tp, pp):
    megatron_to_hf(megatron[(name, tp, pp)], tmp_path / "plain", max_shard_size="150KB", workers=2)
    calls = stream_everything(monkeypatch)
    s = megatron_to_hf(megatron[(name, tp, pp)], tmp_path / "streamed", max_shard_size="150KB", workers=2)
    plain, streamed = files(tmp_path / "plain"), files(tmp_path / "streamed")
    assert calls["n"] > 0 and len([k for k in plain if k.endswith(".safetensors")]) > 1
    assert plain.keys() == streamed.keys() and all(plain[k] == streamed[k] for k in plain)
    assert s.bytes_written == sum(len(v) for k, v in plain.items() if k.endswith(".safetensors")) - sum(
        8 + int.from_bytes(v[:8], "little") for k, v in plain.items() if k.endswith(".safetensors"))


def test_a_dtype_conversion_is_not_streamed(megatron, tmp_path, monkeypatch):
    calls = stream_everything(monkeypatch)
    megatron_to_hf(megatron[("tiny-every-kind", 1, 1)], tmp_path / "hf", dtype="fp32")
    assert calls["n"] == 0


def test_streamed_tensors_take_no_memory_budget(megatron, tiny_sources, tmp_path, monkeypatch):
    """The writer threads' budget counts the tensors loaded whole: none once everything streams, and at TP=2
    the row-parallel weights when their rows are wider than the block (gathered from column strips, a block
    holds whole rows)."""
    stream_everything(monkeypatch)
    taken = []
    real = dcp.ByteBudget.acquire

    def acquire(self, n):
        taken.append(n)
        return real(self, n)

    monkeypatch.setattr(dcp.ByteBudget, "acquire", acquire)
    src = megatron[("tiny-every-kind", 2, 2)]
    megatron_to_hf(src, tmp_path / "hf", workers=3)
    assert taken == []
    monkeypatch.setattr(to_hf, "BLOCK_BYTES", 300)  # whole-row tensors still stream; strips of rows > 300 bytes not
    megatron_to_hf(src, tmp_path / "hf2", workers=3)
    reader = DCPReader(src / ITERATION_DIR)
    maps = bind(load_plan(tiny_sources["tiny-every-kind"]))
    wide = [reader.tensor_bytes(m.megatron) for m in maps if m.tp_rule == "cols" and m.shape[1] * 2 > 300]
    assert wide and sorted(taken) == sorted(wide)
    assert files(tmp_path / "hf") == files(tmp_path / "hf2")


def stored_span(meg: Path, key: str) -> tuple[Path, int]:
    """The data file and offset of the first byte of `key`'s first chunk of rows."""
    with DCPReader(meg / ITERATION_DIR).stored_rows(key) as rows:
        return Path(rows.strips[0].file.name), rows.strips[0].offset


def test_nan_in_a_streamed_tensor_is_counted_and_refused_with_strict(megatron, tmp_path, monkeypatch):
    meg = Path(shutil.copytree(megatron[("tiny-every-kind", 1, 1)], tmp_path / "meg"))
    path, offset = stored_span(meg, "decoder.layers.7.mlp.linear_fc1.weight")
    nan = torch.tensor([float("nan"), float("inf")], dtype=torch.bfloat16)
    with open(path, "r+b") as f:  # the first two values of gate_proj's first row
        f.seek(offset)
        f.write(raw_bytes(nan))
    calls = stream_everything(monkeypatch)
    s = megatron_to_hf(meg, tmp_path / "hf")
    assert calls["n"] > 0
    assert [w for w in s.warnings if "NaN/Inf" in w] == ["layer 7: model.layers.7.mlp.gate_proj.weight: 2 NaN/Inf "
                                                         "values"]
    with pytest.raises(ConversionError, match=r"layer 7: model\.layers\.7\.mlp\.gate_proj\.weight: 2 NaN/Inf values "
                                              r"\(refused: --strict\)"):
        megatron_to_hf(meg, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob(".strict*"))


def test_a_file_cut_short_while_streaming_fails_naming_the_tensor(megatron, tmp_path, monkeypatch):
    """A data file that shrinks after its sizes were checked: the read that finds its end fails the job,
    naming the tensor, the file and the chunk; nothing is published."""
    meg = Path(shutil.copytree(megatron[("tiny-every-kind", 1, 1)], tmp_path / "meg"))
    key = "decoder.layers.2.mlp.linear_fc2.weight"
    path, offset = stored_span(meg, key)
    real = DCPReader.stored_rows

    def cut_after_checking(self, k):
        rows = real(self, k)
        if k == key:
            with open(path, "r+b") as f:
                f.truncate(offset + 10)
        return rows

    stream_everything(monkeypatch)
    monkeypatch.setattr(DCPReader, "stored_rows", cut_after_checking)
    with pytest.raises(ConversionError) as e:
        megatron_to_hf(meg, tmp_path / "hf")
    text = str(e.value)
    assert f"layer 2: cannot read '{key}'" in text and path.name in text
    assert f"the chunk of '{key}' at [0, 0]: the file ends inside the chunk's data" in text
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["meg"]


@pytest.mark.parametrize("name,beyond", [
    ("tiny-every-kind", 1),  # vocabulary 1000: 1024 rows at TP=1 and at TP=2
    ("tiny-tied", 223),  # vocabulary 777: 896 rows at TP=1, 1024 at TP=2 (saved): row 1000 is past TP=1's padding
])
def test_padding_rows_are_checked_when_the_embedding_streams(megatron, tiny_sources, tmp_path, monkeypatch, name,
                                                             beyond):
    """The vocabulary's padding rows, every one stored, read on their own: a non-zero one is refused as when
    the embedding is loaded whole."""
    meg = Path(shutil.copytree(megatron[(name, 2, 2)], tmp_path / "meg"))
    plan = load_plan(tiny_sources[name])
    vocab, bad = plan.vocab_size, plan.vocab_size + beyond
    reader = DCPReader(meg / ITERATION_DIR)
    key = "embedding.word_embeddings.weight"
    stored = reader.tensor_keys()[key].size[0]
    assert stored > bad
    with reader.stored_rows(key) as rows:
        strip = next(s for s in rows.strips if s.first <= bad < s.first + s.rows)
        at = strip.offset + (bad - strip.first) * rows.row_bytes
        path = Path(strip.file.name)
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(raw_bytes(torch.ones(2, dtype=torch.bfloat16)))
    stream_everything(monkeypatch)
    padding_reads = []
    real = to_hf.StreamedChunk.materialize
    monkeypatch.setattr(to_hf.StreamedChunk, "materialize",
                        lambda self, *a: padding_reads.append(self.shape) or real(self, *a))
    with pytest.raises(ConversionError, match=rf"vocab_size {vocab} would cut real rows: row {bad} of '{key}'"):
        megatron_to_hf(meg, tmp_path / "hf")
    assert padding_reads == [(stored - vocab, plan.hidden_size)]  # the embedding's only: the output layer's are not checked
    assert not (tmp_path / "hf").exists()
    monkeypatch.setattr(to_hf, "STREAM_MIN_BYTES", 1 << 40)  # the same refusal when loaded whole
    with pytest.raises(ConversionError, match=rf"vocab_size {vocab} would cut real rows: row {bad} of '{key}'"):
        megatron_to_hf(meg, tmp_path / "hf")
    assert len(padding_reads) == 1


def test_a_data_file_that_cannot_be_opened_names_the_tensor(megatron, tmp_path, monkeypatch):
    meg = Path(shutil.copytree(megatron[("tiny-every-kind", 1, 1)], tmp_path / "meg"))
    stream_everything(monkeypatch)

    def refused(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(dcp, "open", refused, raising=False)
    with pytest.raises(ConversionError, match=r"^model: cannot read 'embedding\.word_embeddings\.weight': "
                                              r"PermissionError: .*Permission denied"):
        megatron_to_hf(meg, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_the_safetensors_writer_checks_a_streamed_tensor_like_a_whole_one(tmp_path):
    from hetero_convert.io.safetensors_writer import StreamingSafetensorsWriter
    from hetero_convert.io.streamed import StreamedChunk

    t = torch.randn(5, 3).to(torch.bfloat16)
    raw = raw_bytes(t)

    def chunk(n: int, shape=(5, 3)) -> StreamedChunk:
        return StreamedChunk(torch.bfloat16, shape, [(lambda buf, at: buf.__setitem__(slice(None), raw[at:at + len(buf)]),
                                                      n)], lambda b: None, pytest.fail)

    buf = torch.empty(8, dtype=torch.uint8)
    w = StreamingSafetensorsWriter(tmp_path / "a.safetensors", [("x", torch.bfloat16, (5, 3)), ("y", torch.bfloat16, (1,))])
    with pytest.raises(ValueError, match="planned torch.bfloat16"):
        w.write_streamed("x", chunk(len(raw), (3, 5)), buf)
    with pytest.raises(ValueError, match=f"its pieces hold {len(raw) - 2} bytes, not {len(raw)}"):
        w.write_streamed("x", chunk(len(raw) - 2), buf)
    w.write_streamed("x", chunk(len(raw)), buf)  # (refused before it was claimed)
    with pytest.raises(ValueError, match="written twice"):
        w.write_streamed("x", chunk(len(raw)), buf)
    with pytest.raises(ValueError, match=r"1 tensors were never written \(first: 'y'\)"):
        w.close()
    assert torch.equal(torch.frombuffer(bytearray((tmp_path / "a.safetensors").read_bytes()[-len(raw):]),
                                        dtype=torch.bfloat16).view(5, 3), t)


def test_an_empty_chunk_materializes_empty():
    chunk = StreamedChunk(torch.bfloat16, (0, 4), [], lambda t: None, lambda e: pytest.fail(repr(e)))
    assert chunk.materialize().shape == (0, 4)
