"""hf-to-megatron / megatron-to-hf: exact round trips, Megatron layout, and failing closed on bad input."""

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import restate_description
from safetensors.torch import load_file

from hetero_convert.convert import ConversionError, hf_to_megatron, megatron_to_hf
from hetero_convert.demo import compare_checkpoints
from hetero_convert.io.dcp import DCPReader
from hetero_convert.io.hf_reader import CheckpointError, HFCheckpoint
from hetero_convert.io.megatron_checkpoint import ITERATION_DIR
from hetero_convert.layout import LayoutError
from hetero_convert.mappings import bind
from hetero_convert.plan import load_plan

FIXTURES = ["tiny-every-kind", "tiny-tied", "tiny-ultra-kinds", "tiny-llama"]


@pytest.fixture(scope="module")
def sources(tiny_sources):
    return tiny_sources


# ---- the mapping tables themselves ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_segments_are_a_bijection_on_rows(sources, name):
    """Reading the segments forward then backward returns every HF tensor unchanged (padding dropped)."""
    plan = load_plan(sources[name])
    for m in bind(plan, tp=2):
        hf = [torch.randn(s) for s in m.hf_shapes]
        full = torch.cat([hf[s.source][s.start:s.start + s.rows] if s.source is not None
                          else torch.zeros((s.rows,) + tuple(m.shape[1:])) for s in m.segments])
        assert tuple(full.shape) == m.shape
        for a, b in zip(hf, m.to_hf(full)):
            assert torch.equal(a, b), m.megatron


def test_qkv_interleave_is_per_layer_groups():
    plan = load_plan(Path(__file__).parents[1] / "fixtures" / "tiny-every-kind.json")
    hd, heads = plan.head_dim, plan.num_attention_heads
    for m in bind(plan):
        if not m.megatron.endswith("linear_qkv.weight"):
            continue
        groups = plan.layers[m.layer].attention.num_kv_heads
        # Megatron order: for each group g, (heads/groups) q heads, then k_g, then v_g.
        expect = []
        for g in range(groups):
            expect += [(0, (g * heads // groups + j) * hd) for j in range(heads // groups)] + [(1, g * hd), (2, g * hd)]
        got = []
        for seg in m.segments:
            got += [(seg.source, seg.start + k * hd) for k in range(seg.rows // hd)]
        assert got == expect, m.megatron


def test_swiglu_chunks_split_gate_and_up_separately():
    plan = load_plan(Path(__file__).parents[1] / "fixtures" / "tiny-every-kind.json")
    fc1 = next(m for m in bind(plan, tp=2) if m.megatron == "decoder.layers.0.mlp.linear_fc1.weight")
    w = plan.layers[0].ffn.width
    assert [c.offsets[0] for c in fc1.chunks(2)] == [0, w // 2, w, w + w // 2]
    assert [c.tp_rank for c in fc1.chunks(2)] == [0, 1, 0, 1]


# ---- round trips ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_round_trip_bit_exact(sources, tmp_path, name, tp, pp):
    src = sources[name]
    hf_to_megatron(src, tmp_path / "meg", tp=tp, pp=pp, workers=2)
    megatron_to_hf(tmp_path / "meg", tmp_path / "back", max_shard_size="300KB", workers=2)
    n, bad = compare_checkpoints(src, tmp_path / "back")
    assert n > 0 and bad == []
    a = json.loads((src / "config.json").read_text())
    b = json.loads((tmp_path / "back" / "config.json").read_text())
    if "block_configs" in a:
        assert a["block_configs"] == b["block_configs"]
        assert b["auto_map"]["AutoModelForCausalLM"] == "modeling_decilm.DeciLMForCausalLM"
        assert (tmp_path / "back" / "modeling_decilm.py").is_file()
    else:  # a Llama comes back as a Llama
        assert b["model_type"] == "llama" and b["num_key_value_heads"] == a["num_key_value_heads"]
    for key in ("hidden_size", "num_attention_heads", "vocab_size", "rope_theta", "rope_scaling",
                "tie_word_embeddings", "num_hidden_layers"):
        assert a.get(key) == b.get(key), key
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(HFCheckpoint(src).tensors)


def test_megatron_layout_matches_a_megatron_run(sources, tmp_path):
    src = sources["tiny-every-kind"]
    hf_to_megatron(src, tmp_path / "meg", tp=2, pp=2, workers=1)
    it = tmp_path / "meg" / ITERATION_DIR
    assert (tmp_path / "meg" / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert json.loads((it / "metadata.json").read_text()) == {
        "sharded_backend": "torch_dist", "sharded_backend_version": 1,
        "common_backend": "torch", "common_backend_version": 1}
    assert torch.load(it / "common.pt", weights_only=True)["checkpoint_version"] == 3.0
    reader = DCPReader(it)
    md = reader.tensor_keys()
    # no key prefix, global layer indices, dummy layer 6 has nothing
    assert "embedding.word_embeddings.weight" in md and not any(k.startswith("model.") for k in md)
    assert not any(k.startswith("decoder.layers.6.") for k in md)
    assert md["embedding.word_embeddings.weight"].size == torch.Size([1024, 128])  # 1000 padded to 128*TP
    assert [tuple(c.offsets) for c in md["decoder.layers.0.self_attention.linear_proj.weight"].chunks] == [(0, 0), (0, 64)]
    objects = set(reader.object_keys())
    assert "decoder.layers.2.self_attention._extra_state/shard_0_1" in objects  # linear replacement
    assert "decoder.layers.4.mlp._extra_state/shard_0_1" in objects
    assert "decoder.layers.0.mlp.linear_fc2._extra_state/shard_0_1" in objects
    # each rank's chunks in its own files: rank = pp_stage * TP + tp_rank
    names = sorted(p.name for p in it.glob("*.distcp"))
    assert names == ["__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"]
    stored = reader.metadata.storage_data
    files_of = {}
    for idx, info in stored.items():
        files_of.setdefault(idx.fqn, set()).add(info.relative_path)
    assert files_of["embedding.word_embeddings.weight"] == {"__0_0.distcp", "__1_0.distcp"}
    assert files_of["output_layer.weight"] == {"__2_0.distcp", "__3_0.distcp"}
    desc = json.loads((it / "hetero_convert.json").read_text())
    assert desc["tensor_parallel"] == 2 and desc["padded_vocab_size"] == 1024
    import hashlib

    assert desc["source"]["file_sha256"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                             for p in src.glob("*.safetensors")}


def test_cli_records_source_hashes_unless_told_not_to(sources, tmp_path):
    """The CLI hashes the source while torch is imported (its own FileHashes, handed to the converter);
    --no-checksums records none, and the checkpoint is otherwise the same."""
    import hashlib
    import subprocess
    import sys

    src = sources["tiny-tied"]
    for flag, out in (([], "with"), (["--no-checksums"], "without")):
        r = subprocess.run([sys.executable, "-m", "hetero_convert.cli", "hf-to-megatron", str(src), str(tmp_path / out),
                            "--json", *flag], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    desc = {k: json.loads((tmp_path / k / "release" / "hetero_convert.json").read_text()) for k in ("with", "without")}
    assert desc["with"]["source"]["file_sha256"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                                     for p in src.glob("*.safetensors")}
    assert not desc["without"]["source"].get("file_sha256")
    ra, rb = DCPReader(tmp_path / "with" / "release"), DCPReader(tmp_path / "without" / "release")
    assert all(torch.equal(ra.load(k), rb.load(k)) for k in ra.tensor_keys())


def test_dtype_conversion_and_back(sources, tmp_path):
    src = sources["tiny-tied"]
    hf_to_megatron(src, tmp_path / "meg", dtype="fp32")
    assert all(m.properties.dtype == torch.float32 for m in DCPReader(tmp_path / "meg" / "release").tensor_keys().values())
    megatron_to_hf(tmp_path / "meg", tmp_path / "back", dtype="bf16")
    n, bad = compare_checkpoints(src, tmp_path / "back")  # bf16 -> fp32 -> bf16 is exact
    assert bad == []


def test_megatron_checkpoint_at_one_tp_reads_back_whatever_tp(sources, tmp_path):
    src = sources["tiny-every-kind"]
    hf_to_megatron(src, tmp_path / "m1", tp=1)
    hf_to_megatron(src, tmp_path / "m2", tp=2, pp=2)
    r1, r2 = DCPReader(tmp_path / "m1" / "release"), DCPReader(tmp_path / "m2" / "release")
    for key, md in r1.tensor_keys().items():
        a, b = r1.load(key), r2.load(key)
        rows = min(a.shape[0], b.shape[0])
        assert torch.equal(a[:rows], b[:rows]), key


def test_progress_reports_every_byte_and_the_total_first(sources, tmp_path):
    """The bars advance by bytes written and end exactly at the total (megatron-to-hf learns its total from
    the checkpoint, so it is told before the first byte)."""
    src = sources["tiny-every-kind"]
    h2m = []
    s = hf_to_megatron(src, tmp_path / "meg", tp=2, pp=2, workers=2, progress=h2m.append)
    padding = 2 * 24 * 128 * 2  # 1000 -> 1024 rows, embedding and output layer, bf16
    assert sum(h2m) == s.bytes_written == HFCheckpoint(src).total_bytes() + padding

    class Bar(list):
        total = None

        def __call__(self, n):
            self.append(n)

        def set_total(self, n):
            assert not self, "total must come before any progress"
            self.total = n

    m2h = Bar()
    s = megatron_to_hf(tmp_path / "meg", tmp_path / "back", workers=2, progress=m2h)
    assert m2h.total == sum(m2h) == s.bytes_written == HFCheckpoint(src).total_bytes()


# ---- fail closed ----------------------------------------------------------------------------------------------


def copy_src(sources, tmp_path, name="tiny-every-kind") -> Path:
    return Path(shutil.copytree(sources[name], tmp_path / "src"))


def assert_nothing_written(tmp_path, out="meg"):
    assert not (tmp_path / out).exists()
    assert not list(tmp_path.glob(f".{out}.partial-*"))


def test_truncated_shard(sources, tmp_path):
    src = copy_src(sources, tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated: tensor '.*' needs bytes up to"):
        hf_to_megatron(src, tmp_path / "meg")
    assert_nothing_written(tmp_path)


def test_corrupt_header(sources, tmp_path):
    src = copy_src(sources, tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[0:8] = struct.pack("<Q", 1 << 40)
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header length .* exceeds the file size"):
        hf_to_megatron(src, tmp_path / "meg")


def test_missing_shard(sources, tmp_path):
    src = copy_src(sources, tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"missing shard file\(s\) \['{shard.name}'\]"):
        hf_to_megatron(src, tmp_path / "meg")
    assert_nothing_written(tmp_path)


def test_index_names_absent_tensor(sources, tmp_path):
    src = copy_src(sources, tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"].values())[0]
    index["weight_map"]["model.layers.3.self_attn.q_proj.weight"] = first
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"the index names 1 tensor\(s\) that are not in the shard.*"
                                              r"model.layers.3.self_attn.q_proj.weight"):
        hf_to_megatron(src, tmp_path / "meg")


def test_config_contradicts_tensors(sources, tmp_path):
    src = copy_src(sources, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["block_configs"][1]["attention"]["n_heads_in_group"] = 2  # says 4 KV heads, tensors have 2
    cfg["block_configs"][3]["attention"] = {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 2}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError) as e:
        hf_to_megatron(src, tmp_path / "meg")
    msg = str(e.value)
    assert "layer 1: tensor 'model.layers.1.self_attn.k_proj.weight' has shape [32, 128], the config implies [64, 128]" in msg
    assert "layer 3: missing tensor 'model.layers.3.self_attn.q_proj.weight' (expected shape [128, 128])" in msg
    assert_nothing_written(tmp_path)


def test_leftover_tensor_is_refused(sources, tmp_path):
    src = copy_src(sources, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["block_configs"][2]["attention"] = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"unexpected tensor 'model.layers.2.input_layernorm.weight'"):
        hf_to_megatron(src, tmp_path / "meg")


def test_infeasible_layout_refused_up_front(sources, tmp_path):
    with pytest.raises(LayoutError, match="6 heads are not divisible by TP=4"):
        hf_to_megatron(sources["tiny-llama"], tmp_path / "meg", tp=4)
    assert_nothing_written(tmp_path)


def write_nan(src: Path, key: str):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"][key]
    tensors = load_file(shard)
    tensors[key][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(tensors, shard, metadata={"format": "pt"})


def test_nan_warns_or_refuses_with_strict(sources, tmp_path):
    src = copy_src(sources, tmp_path)
    write_nan(src, "model.layers.7.mlp.up_proj.weight")
    s = hf_to_megatron(src, tmp_path / "meg")
    assert any("layer 7: decoder.layers.7.mlp.linear_fc1.weight" in w and "NaN/Inf" in w for w in s.warnings)
    with pytest.raises(ConversionError, match=r"layer 7: decoder.layers.7.mlp.linear_fc1.weight .* 1 NaN/Inf values "
                                              r"\(refused: --strict\)"):
        hf_to_megatron(src, tmp_path / "meg2", strict=True)
    assert_nothing_written(tmp_path, "meg2")


def test_existing_output_needs_overwrite(sources, tmp_path):
    """--overwrite replaces a previous output of the same kind, never a directory of something else."""
    (tmp_path / "meg").mkdir()
    (tmp_path / "meg" / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="exists and is not empty"):
        hf_to_megatron(sources["tiny-tied"], tmp_path / "meg")
    with pytest.raises(ConversionError, match="--overwrite refused: it has no latest_checkpointed_iteration.txt"):
        hf_to_megatron(sources["tiny-tied"], tmp_path / "meg", overwrite=True)
    assert (tmp_path / "meg" / "keep.txt").read_text() == "x"
    hf_to_megatron(sources["tiny-tied"], tmp_path / "meg2")
    (tmp_path / "meg2" / "release" / "__7_0.distcp").write_text("from a previous run at a larger world size")
    hf_to_megatron(sources["tiny-tied"], tmp_path / "meg2", overwrite=True)
    assert not (tmp_path / "meg2" / "release" / "__7_0.distcp").exists()
    assert (tmp_path / "meg2" / "release" / ".metadata").is_file()


def test_failure_mid_write_leaves_nothing(sources, tmp_path, monkeypatch):
    from hetero_convert.mappings import TensorMapping

    calls = {"n": 0}
    real = TensorMapping.read_chunk

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk vanished")
        return real(*a, **k)

    monkeypatch.setattr(TensorMapping, "read_chunk", flaky)
    with pytest.raises(ConversionError, match="disk vanished"):
        hf_to_megatron(sources["tiny-every-kind"], tmp_path / "meg", tp=2, workers=2)
    assert_nothing_written(tmp_path)


def test_megatron_side_missing_and_unexpected_keys(sources, tmp_path):
    hf_to_megatron(sources["tiny-every-kind"], tmp_path / "meg")

    def layer6_swiglu(cfg):  # layer 6 (dummy, no tensors) said to have layer 0's SwiGLU FFN: its tensors are missing
        cfg["block_configs"][6]["ffn"] = dict(cfg["block_configs"][0]["ffn"])

    restate_description(tmp_path / "meg", layer6_swiglu)
    with pytest.raises(ConversionError, match=r"layer 6: missing tensor 'decoder.layers.6.mlp.linear_fc1.weight'"):
        megatron_to_hf(tmp_path / "meg", tmp_path / "back")

    def layer0_no_ffn(cfg):  # and layer 0's FFN said to be removed: its stored tensors are then left over
        cfg["block_configs"][6]["ffn"] = {"no_op": True, "ffn_mult": None}
        cfg["block_configs"][0]["ffn"] = {"no_op": True, "ffn_mult": None}

    restate_description(tmp_path / "meg", layer0_no_ffn)
    with pytest.raises(ConversionError, match=r"unexpected tensor 'decoder.layers.0.mlp.linear_fc1.weight'"):
        megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    assert_nothing_written(tmp_path, "back")


def test_megatron_side_wrong_shape(sources, tmp_path):
    hf_to_megatron(sources["tiny-every-kind"], tmp_path / "meg")
    restate_description(tmp_path / "meg", lambda cfg: cfg["block_configs"][1]["attention"].update(n_heads_in_group=2))
    with pytest.raises(ConversionError, match=r"layer 1: 'decoder.layers.1.self_attention.linear_qkv.weight' has "
                                              r"shape \[192, 128\], the plan implies \[256, 128\]"):
        megatron_to_hf(tmp_path / "meg", tmp_path / "back")


def test_megatron_side_truncated_or_missing_data_file(sources, tmp_path):
    """Caught from file sizes before anything is written, naming layer, tensor and file."""
    hf_to_megatron(sources["tiny-every-kind"], tmp_path / "meg", tp=2, pp=2)
    it = tmp_path / "meg" / "release"
    data = it / "__3_0.distcp"  # last stage, tp rank 1: holds a half of output_layer.weight
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ConversionError, match=r"model: 'output_layer.weight': __3_0.distcp is truncated"):
        megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    data.unlink()
    with pytest.raises(ConversionError, match=r"'output_layer.weight': data file __3_0.distcp is missing"):
        megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    assert_nothing_written(tmp_path, "back")


def test_megatron_side_corrupt_chunk_names_the_tensor(sources, tmp_path):
    hf_to_megatron(sources["tiny-every-kind"], tmp_path / "meg")
    reader = DCPReader(tmp_path / "meg" / "release")
    key = "decoder.layers.0.mlp.linear_fc2.weight"
    (info,) = [v for i, v in reader.metadata.storage_data.items() if i.fqn == key]
    with open(reader.path / info.relative_path, "r+b") as f:  # the chunk's zip directory: same size, garbage
        f.seek(info.offset + info.length - 30)
        f.write(b"\xff" * 30)
    with pytest.raises(ConversionError, match=r"layer 0: cannot read 'decoder.layers.0.mlp.linear_fc2.weight'"):
        megatron_to_hf(tmp_path / "meg", tmp_path / "back", workers=2)
    assert_nothing_written(tmp_path, "back")


def test_megatron_to_hf_disk_full_names_tensor_and_shard(sources, tmp_path, monkeypatch):
    from hetero_convert.io.safetensors_writer import StreamingSafetensorsWriter

    hf_to_megatron(sources["tiny-every-kind"], tmp_path / "meg")
    real = StreamingSafetensorsWriter._pwrite

    def pwrite(self, buf, at):
        if at > 0 and at == self.data_start + self.layout.get("model.layers.3.mlp.down_proj.weight", (0, 0, -1))[2]:
            raise OSError(28, "No space left on device")
        return real(self, buf, at)

    monkeypatch.setattr(StreamingSafetensorsWriter, "_pwrite", pwrite)
    with pytest.raises(ConversionError, match=r"layer 3: writing 'model.layers.3.mlp.down_proj.weight' to "
                                              r"\S*/\.back\.partial-\S+/model-\d+-of-\d+.safetensors: .*No space left"):
        megatron_to_hf(tmp_path / "meg", tmp_path / "back", max_shard_size="300KB", workers=2)
    assert_nothing_written(tmp_path, "back")


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_in_place_reads_equal_dcp_load(sources, tmp_path, monkeypatch, tp, pp):
    """DCPReader.load reads every chunk's bytes straight into the assembled tensor (row-split chunks as one
    block, column-split ones row by row); it must equal DCP's own load, in value, dtype and shape, and the
    torch.load fallback must not be what produced it. (test_safety_parsers also compares multi-chunk tensors
    with DCP's own load; tests/test_torch_record.py the records the in-place read declines.)"""
    import torch.distributed.checkpoint as dcp

    from hetero_convert.io import dcp as dcp_io

    hf_to_megatron(sources["tiny-ultra-kinds"], tmp_path / "meg", tp=tp, pp=pp, workers=2)
    reader = DCPReader(tmp_path / "meg" / "release")
    # The writer threads skipped torch.save's CRC32 (a per-thread switch in torch): the records carry 0 there.
    for f in reader.path.glob("*.distcp"):
        assert {i.CRC for i in zipfile.ZipFile(f).infolist()} == {0}, f.name
    monkeypatch.setattr(dcp_io, "_MIN_RUN_BYTES", 0)  # the tiny model's column chunks are narrow
    fallbacks = []
    real = DCPReader._read_chunk
    monkeypatch.setattr(DCPReader, "_read_chunk", lambda self, key, *a: fallbacks.append(key) or real(self, key, *a))
    split = 0
    for key, md in reader.tensor_keys().items():
        split += len(md.chunks) > 1
        ours = reader.load(key)
        theirs = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype)}
        dcp.load(theirs, storage_reader=dcp.FileSystemReader(str(reader.path)), no_dist=True)
        assert ours.dtype == theirs[key].dtype and torch.equal(ours, theirs[key]), key
    assert fallbacks == []
    assert split > 0 if tp > 1 else split == 0


def test_not_a_megatron_checkpoint(tmp_path):
    with pytest.raises(ConversionError, match="neither a Megatron checkpoint root"):
        megatron_to_hf(tmp_path, tmp_path / "back")


def test_tokenizer_files_are_copied(sources, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    hf_to_megatron(sources["tiny-tied"], tmp_path / "meg")
    megatron_to_hf(tmp_path / "meg", tmp_path / "back", tokenizer_from=tok)
    assert (tmp_path / "back" / "tokenizer.json").read_text() == "{}"
    gen = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2}


# ---- megatron-to-megatron --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-every-kind", "tiny-tied", "tiny-ultra-kinds"])
@pytest.mark.parametrize("src_layout,dst_layout", [((1, 1), (2, 2)), ((2, 2), (1, 1)), ((2, 1), (1, 2))])
def test_reshard_equals_direct_conversion(sources, tmp_path, name, src_layout, dst_layout):
    """Resharding a checkpoint gives, chunk for chunk and bit for bit, what hf-to-megatron writes at the target
    layout directly (vocab padding redone for the target TP), and it converts back to the same HF weights."""
    from hetero_convert.convert import megatron_to_megatron

    src = sources[name]
    hf_to_megatron(src, tmp_path / "a", tp=src_layout[0], pp=src_layout[1])
    hf_to_megatron(src, tmp_path / "direct", tp=dst_layout[0], pp=dst_layout[1])
    s = megatron_to_megatron(tmp_path / "a", tmp_path / "b", tp=dst_layout[0], pp=dst_layout[1], workers=2)
    assert s.layout["tp"] == dst_layout[0] and s.tensors == len(bind(load_plan(src)))
    direct, resharded = DCPReader(tmp_path / "direct" / "release"), DCPReader(tmp_path / "b" / "release")
    kd, kr = direct.tensor_keys(), resharded.tensor_keys()
    assert set(kd) == set(kr) and set(direct.object_keys()) == set(resharded.object_keys())
    for key, md in kd.items():
        chunks = lambda m: sorted((tuple(c.offsets), tuple(c.sizes)) for c in m.chunks)  # noqa: E731
        assert chunks(md) == chunks(kr[key]) and md.properties.dtype == kr[key].properties.dtype, key
        assert torch.equal(direct.load(key).view(torch.uint8), resharded.load(key).view(torch.uint8)), key
    desc = json.loads((tmp_path / "b" / "release" / "hetero_convert.json").read_text())
    assert (desc["tensor_parallel"], desc["pipeline_parallel"]) == dst_layout
    assert desc["resharded_from"]["tensor_parallel"] == src_layout[0]
    megatron_to_hf(tmp_path / "b", tmp_path / "back")
    n, bad = compare_checkpoints(src, tmp_path / "back")
    assert n > 0 and bad == []


def test_reshard_refuses_an_infeasible_layout_and_writes_nothing(sources, tmp_path):
    from hetero_convert.convert import megatron_to_megatron

    hf_to_megatron(sources["tiny-llama"], tmp_path / "a")
    with pytest.raises(LayoutError, match="TP=4"):
        megatron_to_megatron(tmp_path / "a", tmp_path / "b", tp=4)
    assert not (tmp_path / "b").exists()


# ---- what travels with the weights ------------------------------------------------------------------------------


def test_tokenizer_generation_config_and_token_ids_travel_through_megatron(sources, tmp_path):
    """A source with a tokenizer, a full generation config, an unk_token_id and transformers-5's `dtype` key
    comes back with all of them, through megatron-to-megatron too, with no --tokenizer-from."""
    from hetero_convert.convert import megatron_to_megatron

    src = Path(shutil.copytree(sources["tiny-every-kind"], tmp_path / "src"))
    (src / "tokenizer.json").write_text('{"model": "tiny"}')
    (src / "tokenizer_config.json").write_text('{"model_max_length": 4096}')
    gen = {"bos_token_id": 1, "eos_token_id": [2, 3], "temperature": 0.6, "top_p": 0.95, "do_sample": True}
    (src / "generation_config.json").write_text(json.dumps(gen))
    cfg = json.loads((src / "config.json").read_text())
    cfg["unk_token_id"] = 0
    cfg["dtype"] = cfg.pop("torch_dtype")
    (src / "config.json").write_text(json.dumps(cfg))

    hf_to_megatron(src, tmp_path / "meg", tp=2)
    desc = json.loads((tmp_path / "meg" / "release" / "hetero_convert.json").read_text())
    assert sorted(desc["hf_files"]["files"]) == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert desc["hf_files"]["from"] == str(src)
    megatron_to_megatron(tmp_path / "meg", tmp_path / "meg2", pp=2)
    s = megatron_to_hf(tmp_path / "meg2", tmp_path / "back")
    assert not any("tokenizer" in w for w in s.warnings)
    back = tmp_path / "back"
    assert (back / "tokenizer.json").read_text() == '{"model": "tiny"}'
    assert (back / "tokenizer_config.json").read_text() == '{"model_max_length": 4096}'
    assert json.loads((back / "generation_config.json").read_text()) == gen
    written = json.loads((back / "config.json").read_text())
    assert written["unk_token_id"] == 0 and written["dtype"] == "bfloat16" and "torch_dtype" not in written


def test_no_tokenizer_is_said_plainly(sources, tmp_path):
    hf_to_megatron(sources["tiny-tied"], tmp_path / "meg")
    s = megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    assert any(w.startswith("no tokenizer written") for w in s.warnings)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    umask = os.umask(0)
    os.umask(umask)
    # Shards are readable by everyone the umask allows, like the other files (not 0600 like a temp file).
    assert (tmp_path / "back" / "model.safetensors").stat().st_mode & 0o777 == 0o644 & ~umask
