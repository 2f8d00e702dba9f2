"""One-line errors everywhere (issue #11, phase 2): every bad input, run through the CLI, gives a non-zero exit and one
line on stderr naming the file and the field, layer or tensor; never a traceback (that is what --debug is for).
Also: a description that contradicts its tensors, its source record or itself is refused; verify refuses
before megatron-core's loader sees an unsafe or inconsistent checkpoint."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import cli_refuses, restate_description

from hetero_convert.convert import ConversionError, hf_to_megatron

SOURCE = "tiny-every-kind"


@pytest.fixture(scope="module")
def good(tiny_sources, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("good")
    hf_to_megatron(tiny_sources[SOURCE], root / "meg", tp=2)
    return {"hf": tiny_sources[SOURCE], "meg": root / "meg"}


def shard_of(src: Path, key: str) -> Path:
    return src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][key]


def rewrite_header(shard: Path, edit) -> None:
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = edit(json.loads(data[8:8 + n]))
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def edit_tensors(key: str, edit) -> callable:
    """Rewrite the shard holding `key` with `edit(tensors)` applied (a valid file, as another tool saves it)."""
    def damage(src: Path):
        from safetensors.torch import load_file, save_file

        shard = shard_of(src, key)
        tensors = load_file(shard)
        edit(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
    return damage


def edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    result = edit(value)
    path.write_text(json.dumps(value if result is None else result))


def set_in(d: dict, dotted: str, value):
    *parents, last = dotted.split(".")
    for k in parents:
        d = d[int(k)] if isinstance(d, list) else d[k]
    d[int(last) if isinstance(d, list) else last] = value
    return d


DESC = "release/hetero_convert.json"
EMBED = "model.embed_tokens.weight"
K_PROJ = "model.layers.0.self_attn.k_proj.weight"
EVIL = "model.layers.0.evil\n\x1b[2Jname.weight"  # a newline and a terminal escape, from a stranger's file

# name: (which checkpoint, damage, what the one line must say)
HF_CASES = {
    "config a JSON list": (lambda s: (s / "config.json").write_text("[1, 2]"), ["config.json: a JSON list, not an object"]),
    "config not JSON": (lambda s: (s / "config.json").write_text("{'a': 1"), ["config.json: not valid JSON"]),
    "config missing": (lambda s: (s / "config.json").unlink(), ["no config.json at"]),
    "config 10^9 layers": (lambda s: edit_json(s / "config.json", lambda c: c.update(num_hidden_layers=10**9)),
                           ["config.json: num_hidden_layers must be a positive integer up to 2048, got 1000000000"]),
    "a fused weight of two dtypes": (edit_tensors(K_PROJ, lambda t: t.update({K_PROJ: t[K_PROJ].float()})), [
        "problem(s) with the HF checkpoint", "layer 0: 'decoder.layers.0.self_attention.linear_qkv.weight' fuses "
        "tensors of different dtypes (", f"'{K_PROJ}' float32", "one Megatron tensor has one dtype, so choose it "
        "with --dtype"]),
    "a tensor name with control characters": (lambda s: (
        edit_tensors(K_PROJ, lambda t: t.update({EVIL: torch.zeros(4)}))(s),
        edit_json(s / "model.safetensors.index.json", lambda i: i["weight_map"].update({EVIL: shard_of(s, K_PROJ).name}))),
        ["unexpected tensor 'model.layers.0.evil\\n\\x1b[2Jname.weight' [4]"]),
    "config NaN eps": (lambda s: (s / "config.json").write_text(
        (s / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN')),
        ["config.json: rms_norm_eps"]),
    "header a JSON list": (lambda s: rewrite_header(shard_of(s, EMBED), lambda h: [1, 2]),
                           [".safetensors: ", "not an object"]),
    "header negative offsets": (lambda s: rewrite_header(shard_of(s, EMBED), lambda h: {
        k: (dict(v, data_offsets=[-8, 0]) if k == EMBED else v) for k, v in h.items()}),
        [".safetensors: tensor 'model.embed_tokens.weight': data_offsets [-8, 0] are not [begin, end]"]),
    "index a JSON list": (lambda s: (s / "model.safetensors.index.json").write_text("[]"),
                          ["model.safetensors.index.json: ", "not an object"]),
    "index path traversal": (lambda s: edit_json(s / "model.safetensors.index.json", lambda i: i["weight_map"].update(
        {EMBED: "../outside.safetensors"})),
        ["model.safetensors.index.json: tensor 'model.embed_tokens.weight' maps to '../outside.safetensors', not a "
         "plain file name"]),
    "truncated shard": (lambda s: shard_of(s, EMBED).write_bytes(shard_of(s, EMBED).read_bytes()[:-1000]),
                        [".safetensors: truncated: tensor '"]),
    "config contradicts tensors": (lambda s: edit_json(s / "config.json", lambda c: set_in(
        c, "block_configs.1.attention.n_heads_in_group", 2) and None),
        ["problem(s) with the HF checkpoint", "nothing written: layer 1: tensor 'model.layers.1.self_attn.k_proj.weight'"
         " has shape [32, 128], the config implies [64, 128]"]),
}


def tracker(text):
    return lambda m: (m / "latest_checkpointed_iteration.txt").write_text(text)


def desc(edit):
    return lambda m: edit_json(m / DESC, lambda d: edit(d) and None)


def garble_chunk(m: Path):
    """The second TP chunk of the embedding: its record's bytes overwritten (DCP's own load would raise a
    CheckpointException, a BaseException)."""
    from hetero_convert.io.dcp import DCPReader

    md = DCPReader(m / "release").metadata
    info = [v for k, v in md.storage_data.items() if k.fqn == "embedding.word_embeddings.weight"][1]
    f = m / "release" / info.relative_path
    data = bytearray(f.read_bytes())
    data[info.offset: info.offset + info.length] = b"\x00" * info.length
    f.write_bytes(bytes(data))


def stored_dtype(dtype):
    """The DCP metadata states `dtype` for one weight (torch can pickle any of its dtypes there)."""
    def damage(m: Path):
        import pickle

        path = m / "release" / ".metadata"
        md = pickle.loads(path.read_bytes())  # torch's own classes (the file is this test's: a plain unpickle)
        md.state_dict_metadata["decoder.layers.0.mlp.linear_fc1.weight"].properties.dtype = dtype
        path.write_bytes(pickle.dumps(md))
    return damage


def pickle_payload(m: Path):
    import torch

    class Payload:
        def __reduce__(self):
            import os
            return os.system, ("echo pwned",)

    torch.save({"args": Payload()}, m / "release" / "common.pt")


MEGATRON_CASES = {
    "tracker abc": (tracker("abc"), ["latest_checkpointed_iteration.txt: holds 'abc', neither 'release' nor an "
                                     "iteration number"]),
    "tracker of bytes that are no text": (lambda m: (m / "latest_checkpointed_iteration.txt").write_bytes(
        b"\xff\xfe\x00"), ["latest_checkpointed_iteration.txt: holds '\ufffd\ufffd\\x00', neither 'release' nor an "
                             "iteration number"]),
    "a weight stored as qint8": (stored_dtype(torch.qint8), [
        "problem(s) with the Megatron checkpoint", "layer 0: 'decoder.layers.0.mlp.linear_fc1.weight' is stored as "
        "torch.qint8, no dtype a weight is kept in (float32, bfloat16, float16, float64)"]),
    "a weight stored as fp8": (stored_dtype(torch.float8_e4m3fn), [
        "'decoder.layers.0.mlp.linear_fc1.weight' is stored as torch.float8_e4m3fn, no dtype a weight is kept in"]),
    "tracker to a missing iteration": (tracker("5"), ["latest_checkpointed_iteration.txt points to iter_0000005, "
                                                      "which does not exist"]),
    "description not JSON": (lambda m: (m / DESC).write_text("{plan"), ["hetero_convert.json: not valid JSON"]),
    "description a JSON list": (lambda m: (m / DESC).write_text("[]"),
                                ["hetero_convert.json: a JSON list, not an object"]),
    "description without a plan": (desc(lambda d: d.pop("plan")),
                                   ["hetero_convert.json: plan is missing or not an object"]),
    "description plan layer a list": (desc(lambda d: set_in(d, "plan.layers.0", [1, 2])),
                                      ["hetero_convert.json: plan: malformed (TypeError: "]),
    "description plan hidden size a string": (desc(lambda d: set_in(d, "plan.hidden_size", "128")),
                                              ["hetero_convert.json: plan: malformed ("]),
    "description plan 10^9 heads": (desc(lambda d: set_in(d, "plan.num_attention_heads", 10**9)),
                                    ["hetero_convert.json: plan: num_attention_heads must be a positive integer"]),
    "description plan ffn_mult of another width": (desc(lambda d: set_in(d, "plan.layers.0.ffn.ffn_mult", 4.0)),
                                                   ["hetero_convert.json: plan.layers[0].ffn.ffn_mult: 4.0 here, "
                                                    "3.0 there (the plan rebuilt from its own config form): the plan "
                                                    "contradicts itself"]),
    "description plan ffn_mult stated otherwise": (desc(lambda d: set_in(d, "plan.layers.0.ffn.ffn_mult", 3.0)),
                                                   ["hetero_convert.json: hf_block_configs[0].ffn.ffn_mult: 2.0 here, "
                                                    "3.0 there (from the plan): the description contradicts its "
                                                    "plan"]),
    "description vocab smaller than the rows": (desc(lambda d: set_in(d, "plan.vocab_size", 500)),
                                                ["hetero_convert.json: plan.vocab_size: 500 here, 1000 there (from the "
                                                 "recorded source config.json): the description contradicts its "
                                                 "source record"]),
    "description rope theta contradicts the source": (desc(lambda d: set_in(d, "plan.rope_theta", 10000.0)),
                                                      ["plan.rope_theta: 10000.0 here, 500000.0 there", "contradicts "
                                                       "its source record"]),
    "description eps contradicts the source": (desc(lambda d: set_in(d, "plan.rms_norm_eps", 1e-6)),
                                               ["plan.rms_norm_eps: 1e-06 here, 1e-05 there"]),
    "description block configs contradict the plan": (desc(lambda d: set_in(
        d, "hf_block_configs.3.attention.no_op", False)), ["hetero_convert.json: hf_block_configs[3].attention.no_op: "
                                                          "false here, true there (from the plan)"]),
    "description tensor_parallel a bool": (desc(lambda d: set_in(d, "tensor_parallel", True)),
                                           ["hetero_convert.json: tensor_parallel is true, not a positive integer"]),
    "description dtype": (desc(lambda d: set_in(d, "dtype", "float8")),
                          ["hetero_convert.json: dtype is \"float8\", not one of"]),
    "description dtype contradicts the tensors": (desc(lambda d: set_in(d, "dtype", "float16")),
                                                  ["hetero_convert.json: dtype is float16, the stored tensors are "
                                                   "['bfloat16']"]),
    "description padded vocab contradicts the rows": (desc(lambda d: set_in(d, "padded_vocab_size", 1280)),
                                                      ["hetero_convert.json: padded_vocab_size is 1280, but the "
                                                       "vocabulary of 1000 padded for TP=2 is 1024",
                                                       "'embedding.word_embeddings.weight' stores 1024 vocabulary "
                                                       "rows"]),
    "description tensor_parallel contradicts the chunks": (desc(lambda d: set_in(d, "tensor_parallel", 4)),
                                                           ["'embedding.word_embeddings.weight' is stored in 2 row "
                                                            "chunk(s), the description says tensor_parallel 4"]),
    "description pipeline_parallel no layout": (desc(lambda d: set_in(d, "pipeline_parallel", 11)),
                                                ["hetero_convert.json: tensor_parallel 2 and pipeline_parallel 11 are "
                                                 "no layout this model can be written at: model: pipeline_parallel: 10 layers cannot fill PP=11 "
                                                 "stages"]),
    "forged description, vocab cut within the padding": (
        lambda m: restate_description(m, lambda c: c.update(vocab_size=900)),
        ["hetero_convert.json: vocab_size 900 would cut real rows: row 900 of 'embedding.word_embeddings.weight' "
         "lies beyond it and is not the zero padding this tool writes there"]),
    "forged description, another width": (
        lambda m: restate_description(m, lambda c: set_in(c, "block_configs.0.ffn.ffn_mult", 4.0)),
        ["problem(s) with the Megatron checkpoint", "nothing written: layer 0: 'decoder.layers.0.mlp.linear_fc1.weight'"
         " has shape [512, 128], the plan implies [1024, 128]"]),
    "forged description, tied": (lambda m: restate_description(m, lambda c: c.update(tie_word_embeddings=True)),
                                 ["unexpected tensor 'output_layer.weight'"]),
    "garbled chunk at TP 2": (garble_chunk, ["model: cannot read 'embedding.word_embeddings.weight'", ".distcp: the "
                                             "chunk of 'embedding.word_embeddings.weight' at [512, 0]"]),
    "missing data file": (lambda m: (m / "release" / "__1_0.distcp").unlink(), ["__1_0.distcp is missing"]),
    "common.pt payload (no description)": (lambda m: ((m / DESC).unlink(), pickle_payload(m)),
                                           ["common.pt: refused: the pickle asks for the global 'posix.system'"]),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_bad_hf_input_is_one_line(good, tmp_path, case):
    damage, expected = HF_CASES[case]
    src = Path(shutil.copytree(good["hf"], tmp_path / "src"))
    damage(src)
    line = cli_refuses(["hf-to-megatron", src, tmp_path / "out", "--tp", "2"], *expected)
    assert str(src) in line
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


@pytest.mark.parametrize("case", list(MEGATRON_CASES))
def test_bad_megatron_input_is_one_line(good, tmp_path, case):
    damage, expected = MEGATRON_CASES[case]
    meg = Path(shutil.copytree(good["meg"], tmp_path / "meg"))
    damage(meg)
    line = cli_refuses(["megatron-to-hf", meg, tmp_path / "out"], *expected)
    assert str(meg) in line
    assert "pwned" not in line
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["meg"]


def test_the_same_refusals_from_a_real_process(good, tmp_path):
    """What a shell sees (no test runner between): one line, also for megatron-to-megatron and inspect."""
    meg = Path(shutil.copytree(good["meg"], tmp_path / "meg"))
    MEGATRON_CASES["description plan layer a list"][0](meg)
    for args in (["megatron-to-hf", meg, tmp_path / "a"], ["megatron-to-megatron", meg, tmp_path / "b", "--tp", "1"],
                 ["inspect", meg]):
        cli_refuses(args, f"{meg / DESC}: plan: malformed (TypeError: ", in_process=False)


def test_debug_shows_the_traceback_and_a_bug_is_named_as_one(good, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hetero_convert.cli import app
    from hetero_convert.errors import CheckpointError

    meg = Path(shutil.copytree(good["meg"], tmp_path / "meg"))
    tracker("abc")(meg)
    r = CliRunner().invoke(app, ["--debug", "megatron-to-hf", str(meg), str(tmp_path / "out")])
    assert isinstance(r.exception, Exception) and "neither 'release' nor an iteration number" in str(r.exception)
    tracker("release")(meg)

    from hetero_convert.convert import to_hf

    def bug(*a, **k):
        return {}["no such key"]

    monkeypatch.setattr(to_hf, "plan_hf_shards", bug)
    line = cli_refuses(["megatron-to-hf", meg, tmp_path / "out"], "internal error, a bug in hetero-convert: KeyError: "
                       "'no such key' (run `hetero-convert --debug COMMAND ...` for the traceback, and please report it)")
    assert line.count("error") == 2
    r = CliRunner().invoke(app, ["--debug", "megatron-to-hf", str(meg), str(tmp_path / "out")])
    assert isinstance(r.exception, KeyError)
    assert not isinstance(r.exception, CheckpointError) and not (tmp_path / "out").exists()


def test_dcp_checkpoint_exception_is_one_line(good, tmp_path, monkeypatch):
    """DCP's own load (still used where megatron-core loads) raises CheckpointException, a BaseException: the
    CLI names it on one line."""
    from torch.distributed.checkpoint.api import CheckpointException

    from hetero_convert.convert import to_hf

    def failing(*a, **k):
        raise CheckpointException("load failed", {0: (RuntimeError("PytorchStreamReader failed reading zip "
                                                                   "archive: failed finding central directory"), "tb")})

    monkeypatch.setattr(to_hf, "plan_hf_shards", failing)
    cli_refuses(["megatron-to-hf", good["meg"], tmp_path / "out"], "torch.distributed.checkpoint could not load the "
                "checkpoint (RuntimeError: PytorchStreamReader failed reading zip archive")


# ---- verify: nothing unsafe reaches megatron-core's loader -------------------------------------------------------


def test_verify_refuses_before_megatron_core_loads(good, tmp_path):
    """megatron-core unpickles .metadata with plain pickle: a payload there must be refused before any worker
    starts (the marker file proves the payload never ran), on one line."""
    import pickle

    from hetero_convert.io.safe_pickle import METADATA_FILE

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    meg = Path(shutil.copytree(good["meg"], tmp_path / "meg"))
    md = meg / "release" / METADATA_FILE
    data = pickle.loads(md.read_bytes())
    data.planner_data = Payload()  # megatron-core's loader would run it; valid metadata otherwise
    md.write_bytes(pickle.dumps(data))
    cli_refuses(["verify", "--hf", good["hf"], "--megatron", meg], f"{md}: refused: the pickle asks for the global "
                "'posix.system'", in_process=False)
    assert not marker.exists()
    # Every stored tensor must be the plan's, as for megatron-to-hf, before the workers start (shown without the
    # structural comparison with the HF side, which would refuse this pair first).
    from hetero_convert.parity import verify_many

    meg2 = Path(shutil.copytree(good["meg"], tmp_path / "meg2"))
    restate_description(meg2, lambda c: c.update(tie_word_embeddings=True))
    with pytest.raises(ConversionError, match="unexpected tensor 'output_layer.weight'"):
        verify_many([(good["hf"], meg2)], structural_check=False, workdir=tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_a_failed_megatron_worker_is_named_by_its_exception_line(tmp_path):
    """verify's own torchrun job: the line the user sees is the worker's exception, not torchrun's."""
    from hetero_convert.launch import first_error

    log = tmp_path / "megatron.log"
    log.write_text("W1130 starting\n[rank1]: Traceback (most recent call last):\n[rank1]:   File \"w.py\", line 3\n"
                   "[rank1]:     load()\n[rank1]: CheckpointingException: Missing key in checkpoint state_dict: "
                   "decoder.layers.0.self_attention.linear_proj._extra_state/shard_0_1.\nE1130 failed\n"
                   "Traceback (most recent call last):\n  File \"run.py\"\ntorch.distributed.elastic.ChildFailedError\n")
    assert first_error(log) == ("CheckpointingException: Missing key in checkpoint state_dict: "
                                "decoder.layers.0.self_attention.linear_proj._extra_state/shard_0_1.")
    log.write_text("no traceback at all\n")
    assert first_error(log) is None and first_error(tmp_path / "absent.log") is None


@pytest.mark.parametrize("case", ["forged description, vocab cut within the padding", "garbled chunk at TP 2"])
def test_the_same_lines_with_streaming_on(good, tmp_path, monkeypatch, case):
    """megatron-to-hf with every tensor that can stream streamed: the padding read on its own finds the forged
    vocabulary, and a garbled record is given up on and loaded whole, which refuses it as before."""
    from hetero_convert.convert import to_hf

    monkeypatch.setattr(to_hf, "STREAM_MIN_BYTES", 0)
    test_bad_megatron_input_is_one_line(good, tmp_path, case)
