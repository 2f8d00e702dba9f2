"""The parsers of untrusted bytes, tried as a hostile user would (issue #11, phase 1).

Property tests generate malformed safetensors headers, index files, configs and DCP metadata, at least 1,000
cases per class. Each case must either be read exactly (compared with the safetensors library's own reader,
with the tensors that were written, with DCP's own load) or be refused with the project's error class in
one line that names the file; any other exception fails the test. The DCP cases include pickles whose
payloads would write a marker file when unpickled with plain pickle; the marker must never appear.
Plain tests below pin each named finding with the message it now gives.
"""

from __future__ import annotations

import builtins
import copy
import io
import json
import math
import os
import pickle
import random
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from hetero_convert.config_checks import MAX_LAYERS
from hetero_convert.io.dcp import DCPReader, dcp_failures_named
from hetero_convert.megatron.compat import read_common_state
from hetero_convert.io.hf_index import INDEX_FILE, CheckpointError
from hetero_convert.io.hf_reader import HFCheckpoint
from hetero_convert.io.safe_pickle import (
    UnsafePickleError,
    load_common,
    load_dcp_metadata,
    validate_dcp_metadata,
)
from hetero_convert.plan import PlanError, load_config, load_plan

# DCP's own load, the reference for multi-chunk reads, warns that it runs without a process group: it does
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

ROOT = Path(__file__).resolve().parents[1]
CASES = settings(max_examples=1000, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much])

# A file every pickle payload below would create; it must never exist.
MARKER = Path(tempfile.gettempdir()) / f"hetero-convert-pwned-{os.getpid()}"


def write_marker():
    MARKER.write_text("code ran")


class SystemPayload:
    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


class ExecPayload:
    def __reduce__(self):
        return builtins.exec, (f"open({str(MARKER)!r}, 'w').write('x')",)


class EvalPayload:
    def __reduce__(self):
        return builtins.eval, (f"open({str(MARKER)!r}, 'w').write('x') and 0",)


class LocalPayload:
    def __reduce__(self):
        return write_marker, ()


PAYLOADS = [SystemPayload, ExecPayload, EvalPayload, LocalPayload]


def assert_not_pwned():
    assert not MARKER.exists(), "a pickle payload ran"


def assert_one_line(err: BaseException, *names: str) -> str:
    msg = str(err)
    assert msg.strip() and "\n" not in msg and "\r" not in msg, repr(msg)
    assert "Traceback" not in msg
    assert any(n in msg for n in names), (names, msg)
    return msg


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


# ==== safetensors headers ====================================================================================

ST_DTYPES = {"F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
             "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
             "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1)}
NON_STR = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                    st.lists(st.integers(-5, 5), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(),
                                                                              max_size=2))
HOSTILE = st.one_of(NON_STR, st.text(max_size=4))
HEADER_MUTATIONS = ["none", "none", "none", "swap_same_size", "negative", "overlap", "gap", "count", "duplicate",
                    "extra_key", "missing_key", "wrong_type", "metadata_bad", "metadata_ok", "not_object",
                    "trailing", "truncate", "header_len", "flip", "nan", "surrogate", "non_utf8", "deep",
                    "unknown_dtype", "empty_header"]


def tensor_specs():
    name = st.one_of(st.sampled_from(["a", "b.weight", "model.layers.0.mlp.up_proj.weight", "", "x y", "é"]),
                     st.text(min_size=1, max_size=6))
    spec = st.tuples(name, st.sampled_from(sorted(ST_DTYPES)), st.lists(st.integers(0, 4), max_size=3))
    return st.lists(spec, min_size=0, max_size=4, unique_by=lambda s: s[0])


def header_file(specs, mutation: str, seed: int, draw) -> bytes:
    """The bytes of a safetensors file with these tensors, then damaged as `mutation` says."""
    rng = random.Random(seed)
    entries, at = [], 0
    for name, dt, shape in specs:
        n = math.prod(shape) * ST_DTYPES[dt][1]
        entries.append([name, {"dtype": dt, "shape": list(shape), "data_offsets": [at, at + n]}])
        at += n
    data = bytes(rng.getrandbits(8) for _ in range(at))
    meta = None
    raw_text = None
    if entries:
        k = rng.randrange(len(entries))
        e = entries[k][1]
        if mutation == "negative":
            e["data_offsets"][0] = -rng.randint(1, 8)
        elif mutation == "overlap" and k > 0:
            shift = rng.randint(1, 4)
            e["data_offsets"] = [max(0, e["data_offsets"][0] - shift), max(0, e["data_offsets"][1] - shift)]
        elif mutation == "gap":
            e["data_offsets"] = [e["data_offsets"][0] + 1, e["data_offsets"][1] + 1]
        elif mutation == "count":
            e["shape"] = e["shape"] + [2]
        elif mutation == "extra_key":
            e["extra"] = 1
        elif mutation == "missing_key":
            del e[rng.choice(["dtype", "shape", "data_offsets"])]
        elif mutation == "wrong_type":
            e[rng.choice(["dtype", "shape", "data_offsets"])] = draw(HOSTILE)
        elif mutation == "unknown_dtype":
            e["dtype"] = rng.choice(["F8_E4M3", "U16", "f32", "X", "C64"])
        elif mutation == "swap_same_size":
            same = [j for j, (_, other) in enumerate(entries) if j != k and
                    other["data_offsets"][1] - other["data_offsets"][0] == e["data_offsets"][1] - e["data_offsets"][0]]
            if same:
                j = rng.choice(same)
                e["data_offsets"], entries[j][1]["data_offsets"] = entries[j][1]["data_offsets"], e["data_offsets"]
    if mutation == "metadata_bad":
        meta = rng.choice([{"format": 1}, ["pt"], "pt", {"a": None}, {"a": {"b": "c"}}])
    elif mutation == "metadata_ok":
        meta = {"format": "pt", "note": "x"}
    obj = dict(entries)
    if meta is not None:
        obj = {"__metadata__": meta, **obj}
    if mutation == "duplicate" and entries:
        name, e = rng.choice(entries)
        body = [json.dumps(n) + ":" + json.dumps(v) for n, v in entries] + [json.dumps(name) + ":" + json.dumps(e)]
        raw_text = "{" + ",".join(body) + "}"
    elif mutation == "not_object":
        raw_text = json.dumps(rng.choice([[], [1, 2], "str", 3, None, True]))
    elif mutation == "nan" and entries:
        raw_text = json.dumps(obj).replace("[0, ", "[NaN, ", 1)
    elif mutation == "surrogate":
        raw_text = json.dumps({"\ud800x": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}, **obj})
    elif mutation == "deep":
        raw_text = '{"t": ' + "[" * 100_000 + "]" * 100_000 + "}"
    elif mutation == "empty_header":
        raw_text = ""
    text = (raw_text if raw_text is not None else json.dumps(obj)).encode("utf-8", "surrogatepass")
    if mutation == "non_utf8":
        text = text + b"\xff\xfe"
    blob = struct.pack("<Q", len(text)) + text + data
    if mutation == "trailing":
        blob += b"\0" * rng.randint(1, 9)
    elif mutation == "truncate" and len(blob) > 0:
        blob = blob[: rng.randrange(len(blob))]
    elif mutation == "header_len":
        blob = struct.pack("<Q", rng.choice([0, 1, len(text) - 1, len(text) + 1, 2**64 - 1, 10**8 + 1])) + blob[8:]
    elif mutation == "flip" and len(blob) > 8:
        b = bytearray(blob)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(8, len(b))] ^= 1 << rng.randrange(8)
        blob = bytes(b)
    return blob


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@CASES
@given(specs=tensor_specs(), mutation=st.sampled_from(HEADER_MUTATIONS), seed=st.integers(0, 2**32),
       data=st.data())
def test_property_safetensors_headers(scratch, specs, mutation, seed, data):
    d = scratch / "st"
    d.mkdir(exist_ok=True)
    path = d / "model.safetensors"
    path.write_bytes(header_file(specs, mutation, seed, data.draw))
    try:
        ckpt = HFCheckpoint(d)
        ours = {name: ckpt.read(name) for name in ckpt.tensors}
    except CheckpointError as e:
        assert_one_line(e, "model.safetensors")
        assert mutation not in ("none", "metadata_ok", "swap_same_size"), str(e)  # valid files are read
        event(f"{mutation}: refused")
        return
    event(f"{mutation}: read")
    # Accepted: the safetensors library must accept it too, and give the same tensors bit for bit.
    with safe_open(str(path), framework="pt") as f:
        theirs = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(ours) == sorted(theirs)
    for name, t in ours.items():
        assert same_bytes(t, theirs[name]), name


def test_safetensors_files_written_by_the_library_are_read_exactly(tmp_path):
    """The positive side: what safetensors itself writes, every dtype and a 0-d and an empty tensor."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{k}": (torch.randn(3, 5, generator=g) * 10).to(dt) for k, (dt, _) in enumerate(ST_DTYPES.values())}
    tensors |= {"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4, dtype=torch.bfloat16)}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ckpt = HFCheckpoint(tmp_path)
    for name, t in tensors.items():
        assert same_bytes(ckpt.read(name), t), name


# ==== index files ================================================================================================

SHARDS = {"model-00001-of-00003.safetensors": ["a", "b"], "model-00002-of-00003.safetensors": ["c"],
          "model-00003-of-00003.safetensors": ["d", "e"]}
INDEX_MUTATIONS = ["none", "none", "drop", "add", "wrong_shard", "traversal", "absolute", "subdir", "empty_name",
                   "dot", "dotdot", "nul", "backslash", "non_str", "duplicate", "weight_map_type", "no_weight_map",
                   "not_object", "nan", "garbage", "metadata_type", "metadata_ok", "empty_map", "missing_file",
                   "extra_top_key"]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    d = root / "ckpt"
    d.mkdir()
    g = torch.Generator().manual_seed(1)
    expected = {}
    for shard, names in SHARDS.items():
        ts = {n: torch.randn(2, 3, generator=g).to(torch.bfloat16) for n in names}
        save_file(ts, str(d / shard))
        expected |= ts
    (d / "sub").mkdir()
    save_file({"a": torch.zeros(2, 3, dtype=torch.bfloat16)}, str(d / "sub" / "x.safetensors"))
    save_file({"a": torch.zeros(2, 3, dtype=torch.bfloat16)}, str(root / "outside.safetensors"))
    return d, expected


def index_text(mutation: str, seed: int, draw) -> str:
    rng = random.Random(seed)
    wm = {n: s for s, names in SHARDS.items() for n in names}
    name = rng.choice(sorted(wm))
    top: dict = {"metadata": {"total_size": 60}, "weight_map": wm}
    bad_names = {"traversal": "../outside.safetensors", "absolute": str(Path("/tmp/x.safetensors").absolute()),
                 "subdir": "sub/x.safetensors", "empty_name": "", "dot": ".", "dotdot": "..",
                 "nul": "model-00001-of-00003.safetensors\x00", "backslash": "..\\outside.safetensors",
                 "missing_file": "model-00009-of-00009.safetensors"}
    if mutation == "drop":
        del wm[name]
    elif mutation == "add":
        wm["zz"] = "model-00002-of-00003.safetensors"
    elif mutation == "wrong_shard":
        wm[name] = next(s for s in SHARDS if s != wm[name])
    elif mutation in bad_names:
        wm[name] = bad_names[mutation]
    elif mutation == "non_str":
        wm[name] = draw(NON_STR)
    elif mutation == "weight_map_type":
        top["weight_map"] = draw(st.one_of(NON_STR.filter(lambda v: not isinstance(v, dict)), st.text(max_size=4)))
    elif mutation == "no_weight_map":
        del top["weight_map"]
    elif mutation == "metadata_type":
        top["metadata"] = rng.choice([1, "x", [1]])
    elif mutation == "metadata_ok":
        top["metadata"] = {"total_size": 60, "format": "pt"}
    elif mutation == "empty_map":
        top["weight_map"] = {}
    elif mutation == "extra_top_key":
        top["other"] = [1, 2]
    if mutation == "duplicate":
        pairs = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in wm.items()]
        pairs.append(f"{json.dumps(name)}: {json.dumps(rng.choice(sorted(SHARDS)))}")
        return '{"weight_map": {' + ", ".join(pairs) + "}}"
    if mutation == "not_object":
        return json.dumps(rng.choice([[wm], "weight_map", 7, None]))
    if mutation == "nan":
        return json.dumps(top).replace("60", "NaN")
    if mutation == "garbage":
        return "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randint(0, 40)))
    return json.dumps(top)


@CASES
@given(mutation=st.sampled_from(INDEX_MUTATIONS), seed=st.integers(0, 2**32), data=st.data())
def test_property_index_files(index_dir, mutation, seed, data):
    d, expected = index_dir
    (d / INDEX_FILE).write_text(index_text(mutation, seed, data.draw))
    try:
        ckpt = HFCheckpoint(d)
        ours = {name: ckpt.read(name) for name in ckpt.tensors}
    except CheckpointError as e:
        msg = assert_one_line(e, INDEX_FILE, ".safetensors")
        assert mutation not in ("none", "metadata_ok", "extra_top_key"), msg
        if mutation in ("traversal", "absolute", "subdir", "empty_name", "dot", "dotdot", "nul", "backslash"):
            assert "not a plain file name inside the checkpoint directory" in msg  # refused before any open
        event(f"{mutation}: refused")
        return
    event(f"{mutation}: read")
    # Accepted: the index is consistent with the shards it names (dropping the only tensor of a shard drops
    # that shard), and we read exactly what the safetensors library reads from them.
    assert mutation in ("none", "metadata_ok", "extra_top_key", "drop"), mutation
    named = set(json.loads((d / INDEX_FILE).read_text())["weight_map"].values())
    theirs = {}
    for shard in sorted(named):
        theirs |= load_file(str(d / shard))
    assert sorted(ours) == sorted(theirs) and set(ours) <= set(expected)
    assert mutation == "drop" or sorted(ours) == sorted(expected)
    for name, t in ours.items():
        assert same_bytes(t, theirs[name]), name


# ==== configs ================================================================================================

BASE_CONFIGS = {p.stem: json.loads(p.read_text()) for p in
                [*sorted((ROOT / "fixtures").glob("tiny-*.json")), *sorted((ROOT / "fixtures" / "released").glob("*.json"))]}
TOP_FIELDS = ["hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "tie_word_embeddings", "hidden_act", "torch_dtype", "bos_token_id", "eos_token_id", "rope_scaling",
              "block_configs", "num_key_value_heads_per_layer", "attention_bias", "mlp_bias"]
BLOCK_FIELDS = [("attention", "n_heads_in_group"), ("attention", "no_op"), ("attention", "replace_with_linear"),
                ("attention", "num_key_value_heads"), ("ffn", "ffn_mult"), ("ffn", "no_op"),
                ("ffn", "intermediate_size"), ("ffn", "replace_with_linear")]
ROPE_FIELDS = ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "rope_type"]
EXTREME = st.sampled_from([0, -1, -8, 1, 2, 3, 7, MAX_LAYERS + 1, 10**6 + 1, 10**9, 2**63, 10**5000, -(10**400), [10**5000],
                           0.5, 2.0, -0.0, 1e-9, 1e308,
                           math.nan, math.inf, -math.inf, "", "8", "silu", True, False, None, [], [1], {}, {"a": 1}])


@CASES
@given(base=st.sampled_from(sorted(BASE_CONFIGS)), where=st.sampled_from(["top", "block", "rope", "list"]),
       top=st.sampled_from(TOP_FIELDS), block=st.sampled_from(BLOCK_FIELDS), rope=st.sampled_from(ROPE_FIELDS),
       value=st.one_of(EXTREME, HOSTILE), layer=st.integers(0, 200), delta=st.integers(-3, 3))
def test_property_configs(base, where, top, block, rope, value, layer, delta):
    cfg = copy.deepcopy(BASE_CONFIGS[base])
    blocks = cfg.get("block_configs")
    field = top
    if where == "block" and blocks:
        i = layer % len(blocks)
        part, key = block
        blocks[i].setdefault(part, {})
        blocks[i][part][key] = value
        field = f"layer {i}"
    elif where == "rope":
        cfg["rope_scaling"] = dict(cfg.get("rope_scaling") or {"rope_type": "llama3", "factor": 8.0,
                                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                               "original_max_position_embeddings": 8192})
        cfg["rope_scaling"][rope] = value
        field = "rope_scaling"
    elif where == "list" and blocks:
        # a list shorter or longer than the layer count it claims, or a claim far beyond the list
        if delta > 0:
            cfg["num_hidden_layers"] = len(blocks) + 10**delta * 10**5
        else:
            del blocks[: -delta or 1]
        field = "num_hidden_layers" if delta > 0 else "block_configs"
    else:
        cfg[top] = value
    start = time.monotonic()
    try:
        plan = load_plan(cfg)
    except PlanError as e:
        msg = assert_one_line(e, field, "config has no", "is not divisible", "is inconsistent", "not supported",
                              "needs", "contradicts", "both no_op", "block_configs", "num_key_value_heads")
        assert time.monotonic() - start < 2.0, msg
        event(f"{where}: refused")
        return
    event(f"{where}: planned")
    assert time.monotonic() - start < 2.0
    # Accepted: every count the plan holds is a positive int and every number finite.
    assert plan.num_layers == cfg["num_hidden_layers"] and plan.num_layers <= MAX_LAYERS
    if blocks is not None:
        assert plan.num_layers == len(blocks)
    for n in (plan.hidden_size, plan.num_attention_heads, plan.vocab_size, plan.max_position_embeddings):
        assert type(n) is int and n > 0
    assert math.isfinite(plan.rms_norm_eps) and plan.rms_norm_eps > 0 and math.isfinite(plan.rope_theta)
    for layer_plan in plan.layers:
        kv, width = layer_plan.attention.num_kv_heads, layer_plan.ffn.width
        assert kv is None or (type(kv) is int and 0 < kv <= plan.num_attention_heads)
        assert width is None or (type(width) is int and width > 0)
    assert plan.kv_cache_bytes_per_token() >= 0 and plan.num_parameters() > 0


CONFIG_TEXTS = st.one_of(
    st.sampled_from(['[]', '"config"', '3', 'null', '{"a": 1, "a": 2}', '{"hidden_size": 1', '',
                     '{"x": ' + "[" * 50_000 + "]" * 50_000 + "}", '\ufeff{}', '{"vocab_size": 1e999}']),
    st.text(max_size=30), st.binary(max_size=30).map(lambda b: b.decode("latin-1")))


@CASES
@given(text=CONFIG_TEXTS)
def test_property_config_files(scratch, text):
    path = scratch / "config.json"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        cfg = load_config(path)
    except PlanError as e:
        assert_one_line(e, str(path))
        return
    assert isinstance(cfg, dict)
    try:
        load_plan(cfg)
    except PlanError as e:
        assert_one_line(e, "config")


# ==== DCP metadata ==============================================================================================

DCP_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool, torch.int16]
SAME_SIZE = {torch.bfloat16: torch.float16, torch.float16: torch.bfloat16, torch.int16: torch.bfloat16,
             torch.float32: torch.int32, torch.int64: torch.float64, torch.uint8: torch.int8, torch.bool: torch.uint8}
DCP_MUTATIONS = ["none", "none", "none", "payload", "payload", "chunk_outside", "chunk_overlap", "chunk_gap",
                 "no_storage", "traversal", "absolute", "negative", "short_record", "shared_record", "dtype_lie",
                 "shape_lie", "type_swap", "flip", "truncate", "opcode", "not_metadata", "protocol0"]  # DCP: >= 4


def dcp_case():
    tensor = st.tuples(st.sampled_from(DCP_DTYPES), st.lists(st.integers(1, 4), max_size=2),
                       st.integers(1, 3), st.integers(0, 1))
    return st.lists(tensor, min_size=1, max_size=3)


def build_dcp(d: Path, specs, seed: int):
    """A DCP directory written the way DCP writes one: each chunk a torch.save record in `__0_0.distcp`,
    `.metadata` the pickled Metadata. Returns (metadata, {key: tensor}, {key: object})."""
    g = torch.Generator().manual_seed(seed)
    sdm, storage, tensors, objects = {}, {}, {}, {}
    with open(d / "__0_0.distcp", "wb") as f:
        for k, (dtype, shape, parts, dim) in enumerate(specs):
            # names are untrusted too: a newline or a quote in one must not break a message's single line
            key = f"decoder.layers.{k}.weight" + ["", "", "", "\n", "'", "\x1b[2J", " é"][(seed + k) % 7]
            t = (torch.randn(shape, generator=g) * 50).to(dtype)
            tensors[key] = t
            dim = min(dim, max(len(shape) - 1, 0))
            chunks = []
            if shape:
                bounds = sorted({0, shape[dim], *[shape[dim] * j // parts for j in range(1, parts)]})
                pieces = [(a, b) for a, b in zip(bounds, bounds[1:])]
            else:
                pieces = [None]
            for piece in pieces:
                if piece is None:
                    offsets, part = [], t
                else:
                    offsets = [0] * len(shape)
                    offsets[dim] = piece[0]
                    part = t.narrow(dim, piece[0], piece[1] - piece[0])
                sizes = list(part.shape)
                at = f.tell()
                torch.save(part.clone(), f)
                chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
                storage[MetadataIndex(key, offsets, len(chunks) - 1)] = _StorageInfo("__0_0.distcp", at,
                                                                                     f.tell() - at)
            sdm[key] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(shape), chunks)
        key = "decoder.layers.0.mlp._extra_state/shard_0_1"
        buf = io.BytesIO()
        torch.save([None], buf)
        at = f.tell()
        f.write(buf.getvalue())
        sdm[key] = BytesStorageMetadata()
        storage[MetadataIndex(key)] = _StorageInfo("__0_0.distcp", at, len(buf.getvalue()))
        objects[key] = [None]
    md = Metadata(sdm, planner_data=None, storage_data=storage, storage_meta=StorageMeta(checkpoint_id=str(d)),
                  version="1.0.0")
    return md, tensors, objects


HANDMADE_PICKLES = [
    # BUILD on a class object: would set TensorProperties.__setstate__ for the whole process
    b"\x80\x04" + b"\x8c\x27torch.distributed.checkpoint.metadata\x94\x8c\x10TensorProperties\x94\x93\x94"
    b"}\x94\x8c\x0c__setstate__\x94Ns\x86\x94b.",
    # REDUCE of an allowed callable with a non-tuple argument
    b"\x80\x04\x8c\x05torch\x8c\x04Size\x93]\x94R.",
    # APPEND onto something that is not a list
    b"\x80\x04\x8c\x05torch\x8c\x04Size\x93)R\x94K\x01a.",
    # the copyreg extension registry
    b"\x80\x04\x82\x01.",
    # a persistent id
    b"\x80\x04K\x01Q.",
    # protocol-0 INST of os.system
    b"(S'touch /nonexistent'\nios\nsystem\n.",
]


def mutate_dcp(md, tensors, rng: random.Random, mutation: str, d: Path) -> bytes:
    keys = sorted(tensors)
    key = rng.choice(keys)
    entry = md.state_dict_metadata[key]
    chunk = rng.choice(entry.chunks)
    info = md.storage_data[MetadataIndex(key, chunk.offsets)]
    protocol = rng.choice([2, 3, 4, 5])
    if mutation == "payload":
        payload = rng.choice(PAYLOADS)()
        where = rng.choice(["planner_data", "version", "modules", "entry", "chunks", "storage", "key"])
        if where == "planner_data":
            md.planner_data = {"x": payload}
        elif where == "version":
            md.version = payload
        elif where == "modules":
            md.storage_meta.modules = [payload]
        elif where == "entry":
            md.state_dict_metadata[key] = payload
        elif where == "chunks":
            entry.chunks.append(payload)
        elif where == "storage":
            md.storage_data[MetadataIndex(key, chunk.offsets)] = payload
        else:
            md.state_dict_metadata[payload] = entry
    elif mutation == "chunk_outside" and entry.size:
        entry.chunks[0] = ChunkStorageMetadata(torch.Size(list(entry.chunks[0].offsets)),
                                               torch.Size([s + 1 for s in entry.chunks[0].sizes]))
    elif mutation == "chunk_overlap" and len(entry.chunks) > 1:
        entry.chunks[1] = entry.chunks[0]
    elif mutation == "chunk_gap":
        entry.chunks.pop(rng.randrange(len(entry.chunks)))
    elif mutation == "no_storage":
        del md.storage_data[MetadataIndex(key, chunk.offsets)]
    elif mutation == "traversal":
        info.relative_path = rng.choice(["../__0_0.distcp", "sub/__0_0.distcp", "..", "", "a\x00b"])
    elif mutation == "absolute":
        info.relative_path = str(d / "__0_0.distcp")
    elif mutation == "negative":
        setattr(info, rng.choice(["offset", "length"]), rng.choice([-rng.randint(1, 10), 2**64, 10**5000]))
    elif mutation == "short_record":
        info.length = rng.randint(0, max(0, info.length - 1))
    elif mutation == "shared_record" and len(md.storage_data) > 1:
        other = next(v for i, v in md.storage_data.items() if v is not info)
        info.offset, info.length = other.offset, other.length
    elif mutation == "dtype_lie":
        entry.properties.dtype = SAME_SIZE[entry.properties.dtype]
    elif mutation == "shape_lie" and entry.size:
        entry.size = torch.Size([s * 2 for s in entry.size])
        entry.chunks.append(ChunkStorageMetadata(torch.Size([s // 2 for s in entry.size]),
                                                 torch.Size([s // 2 for s in entry.size])))
    elif mutation == "type_swap":
        target = rng.choice(["size", "dtype", "chunks", "fqn", "relative", "sdm"])
        hostile = rng.choice([None, "x", 1.5, [1, 2], (1,), {"a": 1}, -1, True])
        if target == "size":
            entry.size = hostile
        elif target == "dtype":
            entry.properties.dtype = hostile
        elif target == "chunks":
            entry.chunks = hostile
        elif target == "fqn":
            md.state_dict_metadata[hostile if isinstance(hostile, (int, float, tuple)) else 7] = entry
        elif target == "relative":
            info.relative_path = hostile
        else:
            md.state_dict_metadata = hostile
    elif mutation == "not_metadata":
        return pickle.dumps(rng.choice([{"state_dict_metadata": {}}, [md], None, "metadata", md.storage_meta]))
    elif mutation == "opcode":
        return rng.choice(HANDMADE_PICKLES)
    data = pickle.dumps(md, protocol=protocol if mutation != "protocol0" else 0)
    if mutation == "flip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        data = bytes(b)
    elif mutation == "truncate":
        data = data[: rng.randrange(len(data))]
    return data


@CASES
@given(specs=dcp_case(), mutation=st.sampled_from(DCP_MUTATIONS), seed=st.integers(0, 2**32))
def test_property_dcp_metadata(scratch, specs, mutation, seed):
    d = scratch / "dcp"
    d.mkdir(exist_ok=True)
    for p in d.iterdir():
        p.unlink()
    rng = random.Random(seed)
    md, tensors, objects = build_dcp(d, specs, seed)
    (d / ".metadata").write_bytes(mutate_dcp(md, tensors, rng, mutation, d))
    try:
        reader = DCPReader(d)
        ours = {k: reader.load(k) for k in reader.tensor_keys()}
        got_objects = {k: reader.load_object(k) for k in reader.object_keys()}
    except CheckpointError as e:
        assert_not_pwned()
        assert_one_line(e, ".metadata", "__0_0.distcp")
        assert mutation != "none", str(e)
        event(f"{mutation}: refused")
        return
    event(f"{mutation}: read")
    assert_not_pwned()
    # Accepted. The metadata is what plain pickle gives (safe to call now: the content passed the allow-list),
    # every tensor is what DCP's own load reads with it, and unless bits were flipped (which can rename a key
    # consistently: no checksum can tell) exactly what was written.
    assert mutation in ("none", "chunk_outside", "chunk_overlap", "shape_lie", "shared_record", "flip"), mutation
    assert load_dcp_metadata(d / ".metadata") == pickle.loads((d / ".metadata").read_bytes())
    assert_not_pwned()
    for k, t in ours.items():
        entry = reader.metadata.state_dict_metadata[k]
        theirs = {k: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)}
        dcp.load(theirs, storage_reader=dcp.FileSystemReader(str(d)), no_dist=True)
        assert same_bytes(t, theirs[k]), k
    if mutation != "flip":
        assert sorted(ours) == sorted(tensors) and got_objects == objects
        for k, t in ours.items():
            assert same_bytes(t, tensors[k]), k


def test_dcp_reads_equal_dcp_own_load_at_several_chunks(tmp_path):
    """DCPReader assembles multi-chunk tensors itself; the result equals DCP's own load, value and dtype."""
    md, tensors, _ = build_dcp(tmp_path, [(torch.bfloat16, [4, 3], 3, 0), (torch.float32, [2, 4], 2, 1),
                                          (torch.int64, [], 1, 0)], seed=5)
    (tmp_path / ".metadata").write_bytes(pickle.dumps(md))
    reader = DCPReader(tmp_path)
    for key, entry in reader.tensor_keys().items():
        theirs = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)}
        dcp.load(theirs, storage_reader=dcp.FileSystemReader(str(tmp_path)), no_dist=True)
        assert same_bytes(reader.load(key), theirs[key]) and same_bytes(reader.load(key), tensors[key])
        assert same_bytes(reader.load(key, torch.float64), theirs[key].double())


# ==== the named findings ========================================================================================


@pytest.fixture(scope="module")
def megatron_ckpt(tmp_path_factory):
    from hetero_convert.convert import hf_to_megatron
    from hetero_convert.fixtures import write_random_checkpoint

    root = tmp_path_factory.mktemp("finding")
    src = write_random_checkpoint("tiny-every-kind", root / "src", seed=3, max_shard_bytes=400_000)
    hf_to_megatron(src, root / "meg", tp=2)
    return src, root / "meg"


def fresh_copy(megatron_ckpt, tmp_path) -> Path:
    import shutil

    out = tmp_path / "meg"
    shutil.copytree(megatron_ckpt[1], out)
    return out


def test_finding1_metadata_payload_that_also_returns_valid_data_is_refused(megatron_ckpt, tmp_path):
    """Plain pickle would run the payload and go on (PASS in verify); the restricted one refuses first."""
    from hetero_convert.convert import ConversionError, megatron_to_hf

    meg = fresh_copy(megatron_ckpt, tmp_path)
    it = meg / "release"
    md = pickle.loads((it / ".metadata").read_bytes())
    md.planner_data = SystemPayload()  # os.system returns 0: the metadata is otherwise intact
    (it / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(UnsafePickleError) as e:
        megatron_to_hf(meg, tmp_path / "hf")
    msg = assert_one_line(e.value, str(it / ".metadata"))
    assert "the pickle asks for the global 'posix.system'" in msg or "'nt.system'" in msg
    with pytest.raises(UnsafePickleError, match=r"\.metadata: refused: the pickle asks for the global 'posix\.system'"):
        validate_dcp_metadata(it)  # what verify runs before megatron-core's own loader unpickles it
    assert_not_pwned()
    assert not (tmp_path / "hf").exists()
    assert ConversionError  # the refusal is a CheckpointError, reported by the CLI like any other


def test_finding1_common_pt_payload_is_refused(megatron_ckpt, tmp_path):
    """A training run's common.pt (no description of ours): it was torch.load(weights_only=False)."""
    from hetero_convert.convert import megatron_to_hf

    meg = fresh_copy(megatron_ckpt, tmp_path)
    it = meg / "release"
    (it / "hetero_convert.json").unlink()
    torch.save({"args": ExecPayload(), "iteration": 1, "checkpoint_version": 3.0}, it / "common.pt")
    with pytest.raises(UnsafePickleError) as e:
        megatron_to_hf(meg, tmp_path / "hf")
    assert_one_line(e.value, str(it / "common.pt"))
    assert "the pickle asks for the global 'builtins.exec'" in str(e.value)
    with pytest.raises(UnsafePickleError, match=r"common\.pt: refused: the pickle asks for the global 'builtins\.exec'"):
        validate_dcp_metadata(it)
    assert_not_pwned()


def test_extra_state_payload_is_refused_by_the_reader_and_by_validate(tmp_path):
    """An `_extra_state` object record whose pickle calls a function: refused when read, and by the check
    `verify` runs before megatron-core's loader (which would torch.load it with torch's defaults)."""
    md, _, _ = build_dcp(tmp_path, [(torch.float32, [2, 2], 1, 0)], seed=0)
    buf = io.BytesIO()
    torch.save([LocalPayload()], buf)
    with open(tmp_path / "__0_0.distcp", "ab") as f:
        at = f.tell()
        f.write(buf.getvalue())
    key = "decoder.layers.0.mlp._extra_state/shard_0_1"
    md.storage_data[MetadataIndex(key)] = _StorageInfo("__0_0.distcp", at, len(buf.getvalue()))
    (tmp_path / ".metadata").write_bytes(pickle.dumps(md))
    for attempt in (lambda: DCPReader(tmp_path).load_object(key), lambda: validate_dcp_metadata(tmp_path)):
        with pytest.raises(UnsafePickleError) as e:
            attempt()
        msg = assert_one_line(e.value, "__0_0.distcp")
        assert f"object '{key}': refused: the pickle asks for the global '" in msg and "write_marker'" in msg
    assert_not_pwned()


def test_common_pt_of_a_training_run_loads_with_the_allow_list(tmp_path, monkeypatch):
    """The allow-list admits what a Megatron-LM run keeps there: its argparse namespace, Megatron's enums
    (matched by name: without megatron-core imported, a stand-in keeps the value), dtypes, numpy arrays."""
    import argparse
    import enum
    import sys
    import types

    import numpy as np

    name = "megatron.core.transformer.enums"
    real = sys.modules.get(name)
    if real is None:  # pickle needs the class importable under Megatron's name while saving: a fake module
        fake = types.ModuleType(name)
        fake.AttnBackend = enum.Enum("AttnBackend", {"flash": 1, "fused": 2, "unfused": 3, "local": 4, "auto": 5},
                                     module=name)
        for parent in ("megatron", "megatron.core", "megatron.core.transformer"):
            monkeypatch.setitem(sys.modules, parent, sys.modules.get(parent) or types.ModuleType(parent))
        monkeypatch.setitem(sys.modules, name, fake)
    backend = (real or sys.modules[name]).AttnBackend.auto
    args = argparse.Namespace(hidden_size=128, params_dtype=torch.bfloat16, attention_backend=backend)
    state = {"args": args, "iteration": 7, "rng": np.arange(3, dtype=np.uint32), "ns": types.SimpleNamespace(a=1)}
    torch.save(state, tmp_path / "common.pt")
    monkeypatch.undo()  # loading must not need megatron-core
    loaded = load_common(tmp_path / "common.pt")
    assert loaded["args"].hidden_size == 128 and loaded["args"].params_dtype == torch.bfloat16
    assert loaded["args"].attention_backend.value == 5
    assert type(loaded["args"].attention_backend).__name__ == "AttnBackend"
    assert loaded["iteration"] == 7 and loaded["rng"].tolist() == [0, 1, 2] and loaded["ns"].a == 1
    assert read_common_state(tmp_path)["iteration"] == 7


def test_common_pt_written_with_numpy_1_names_loads():
    """numpy 2 moved numpy.core to numpy._core; a run saved under numpy 1.x names the old path."""
    import zipfile

    import numpy as np

    buf = io.BytesIO()
    torch.save({"rng": np.arange(3)}, buf)
    old = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(old, "w") as zout:
        for name in zin.namelist():  # torch.save pickles with protocol 2: GLOBAL names end in a newline
            zout.writestr(name, zin.read(name).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    assert b"numpy.core.multiarray" in old.getvalue()
    assert load_common(old.getvalue())["rng"].tolist() == [0, 1, 2]


def test_finding4_safetensors_header_lies_are_refused(tmp_path):
    def write(header: str, data: bytes = b"\0" * 16):
        raw = header.encode()
        (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)

    cases = [
        ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, '
         '"b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}',
         "model.safetensors: tensor 'a': data_offsets [-8, 0] are not [begin, end] with 0 <= begin <= end"),
        ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
         '"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}',
         "model.safetensors: tensor 'b' at data offset 4 overlaps the tensor before it: corrupt header"),
        ('{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
         '"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}',
         "model.safetensors: corrupt safetensors header: the key 'a' appears twice in one object"),
        ('[1, 2]', "model.safetensors: corrupt safetensors header (a JSON list, not an object)"),
        ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
         "model.safetensors: the tensors end at data offset 8 but the data section has 16 bytes"),
    ]
    for header, message in cases:
        write(header)
        with pytest.raises(CheckpointError) as e:
            HFCheckpoint(tmp_path)
        assert message in assert_one_line(e.value, "model.safetensors"), (message, str(e.value))


def test_finding4_tensor_named_twice_in_the_index_is_refused(megatron_ckpt, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(megatron_ckpt[0], src)
    text = (src / INDEX_FILE).read_text()
    wm = json.loads(text)["weight_map"]
    name = sorted(wm)[3]
    other = next(s for s in sorted(set(wm.values())) if s != wm[name])
    (src / INDEX_FILE).write_text(text.replace('"weight_map": {', f'"weight_map": {{"{name}": "{other}", ', 1))
    with pytest.raises(CheckpointError) as e:
        HFCheckpoint(src)
    assert assert_one_line(e.value, INDEX_FILE).endswith(
        f"{INDEX_FILE}: corrupt safetensors index: the key '{name}' appears twice in one object")


def test_finding4_metadata_lying_about_a_chunk_dtype_at_tp2_is_refused(megatron_ckpt, tmp_path):
    """One bf16 tensor declared fp16 at TP=2: DCP's own load would cast it silently (one fp16 tensor in a bf16
    export). Every chunk is now checked against .metadata."""
    from hetero_convert.convert import ConversionError, megatron_to_hf

    meg = fresh_copy(megatron_ckpt, tmp_path)
    it = meg / "release"
    md = pickle.loads((it / ".metadata").read_bytes())
    key = "decoder.layers.0.mlp.linear_fc1.weight"
    assert len(md.state_dict_metadata[key].chunks) == 4  # gate and up, each in two TP chunks
    md.state_dict_metadata[key].properties.dtype = torch.float16
    (it / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(ConversionError) as e:
        megatron_to_hf(meg, tmp_path / "hf")
    msg = assert_one_line(e.value, "__0_0.distcp", "__1_0.distcp")
    assert f"layer 0: cannot read '{key}': CheckpointError:" in msg
    assert f"the chunk of '{key}' at [0, 0] holds torch.bfloat16" in msg and ".metadata says torch.float16" in msg
    assert not (tmp_path / "hf").exists()


def test_garbled_chunk_at_tp2_names_the_tensor_and_dcp_exception_is_caught(megatron_ckpt, tmp_path):
    meg = fresh_copy(megatron_ckpt, tmp_path)
    it = meg / "release"
    reader = DCPReader(it)
    key = "decoder.layers.0.mlp.linear_fc1.weight"
    chunk = reader.metadata.state_dict_metadata[key].chunks[1]
    info = reader.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
    with open(it / info.relative_path, "r+b") as f:  # the record's first zip header: garbage
        f.seek(info.offset)
        f.write(b"\xff" * 30)
    with pytest.raises(CheckpointError) as e:
        reader.load(key)
    assert_one_line(e.value, info.relative_path)
    assert f"the chunk of '{key}' at {list(chunk.offsets)}: refused by the weights-only unpickler: Unsupported " \
           f"operand 255" in str(e.value)  # not a zip record: torch reads it as a legacy pickle, which starts 0xff
    # DCP's own load of the same chunk raises CheckpointException, a BaseException: named, one line
    target = {key: torch.empty(tuple(reader.metadata.state_dict_metadata[key].size), dtype=torch.bfloat16)}
    with pytest.raises(CheckpointError) as e, dcp_failures_named(f"{it}: '{key}'"):
        dcp.load(target, storage_reader=dcp.FileSystemReader(str(it)), no_dist=True)
    assert_one_line(e.value, key)


def test_finding5_config_bombs_and_nonsense_are_refused_fast(tmp_path):
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "num_attention_heads": 32, "num_hidden_layers": 10**9, "vocab_size": 128256,
             "intermediate_size": 14336}
    assert len(json.dumps(llama)) < 200
    start = time.monotonic()
    cases = [
        ({}, "num_hidden_layers must be a positive integer up to 2048, got 1000000000"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer up to 2048, got 0"),
        ({"num_hidden_layers": 32, "num_key_value_heads": -8},
         "num_key_value_heads must be a positive integer up to 100000, got -8"),
        ({"num_hidden_layers": 32, "hidden_size": 4096.0}, "hidden_size must be a positive integer, got 4096.0"),
        ({"num_hidden_layers": 32, "vocab_size": "128256"},
         'vocab_size must be a positive integer, got "128256"'),
        ({"num_hidden_layers": 32, "rms_norm_eps": math.nan},
         "rms_norm_eps must be a finite positive number below 1, got nan"),
        ({"num_hidden_layers": 32, "rope_theta": -1.0}, "rope_theta must be a finite positive number, got -1.0"),
        ({"num_hidden_layers": 32, "tie_word_embeddings": "false"},
         'tie_word_embeddings must be true or false, got "false"'),
        ({"num_hidden_layers": 3, "block_configs": [{}]}, "block_configs has 1 blocks but num_hidden_layers is 3"),
    ]
    for change, message in cases:
        with pytest.raises(PlanError) as e:
            load_plan({**llama, **change})
        assert str(e.value) == f"config: {message}"
    (tmp_path / "config.json").write_text(json.dumps(llama))  # what `inspect` on the 200-byte file gets
    with pytest.raises(PlanError) as e:
        load_plan(tmp_path)
    assert str(e.value) == f"{tmp_path / 'config.json'}: {cases[0][1]}"
    blocks = json.loads((ROOT / "fixtures" / "tiny-every-kind.json").read_text())
    blocks["block_configs"][4]["ffn"] = {"ffn_mult": 1e-5}
    with pytest.raises(PlanError, match=r"^config: layer 4: ffn.ffn_mult 1e-05 gives an FFN width of 0 at "
                                        r"hidden_size 128$"):
        load_plan(blocks)
    assert time.monotonic() - start < 1.0


def test_finding5_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(PlanError, match=r"config.json: a JSON list, not an object$"):
        load_plan(tmp_path)
    (tmp_path / INDEX_FILE).write_text('"weight_map"')
    with pytest.raises(CheckpointError, match=r"not a valid safetensors index \(a JSON str, not an object\)$"):
        HFCheckpoint(tmp_path)


def test_0_19_common_state_object_is_read_without_common_pt(tmp_path):
    """megatron-core 0.19 keeps common state inside the DCP data as a `common_state` object."""
    md, _, _ = build_dcp(tmp_path, [(torch.float32, [2, 2], 1, 0)], seed=1)
    buf = io.BytesIO()
    import argparse

    torch.save([{"args": argparse.Namespace(num_layers=3), "iteration": 9}], buf)
    with open(tmp_path / "__0_0.distcp", "ab") as f:
        at = f.tell()
        f.write(buf.getvalue())
    md.state_dict_metadata["common_state/shard_0_1"] = BytesStorageMetadata()
    md.storage_data[MetadataIndex("common_state/shard_0_1")] = _StorageInfo("__0_0.distcp", at, len(buf.getvalue()))
    (tmp_path / ".metadata").write_bytes(pickle.dumps(md))
    state = read_common_state(tmp_path)
    assert state["iteration"] == 9 and state["args"].num_layers == 3


def test_genuine_metadata_equals_plain_pickle(megatron_ckpt):
    it = megatron_ckpt[1] / "release"
    assert load_dcp_metadata(it / ".metadata") == pickle.loads((it / ".metadata").read_bytes())


def test_a_metadata_frame_longer_than_its_bytes_is_refused_as_plain_pickle_refuses_it(tmp_path):
    """Protocol-4 pickles are framed; a frame header that claims more bytes than follow is "truncated" to
    the C unpickler DCP uses. pickle's Python unpickler, on which the allow-list is built, would read on and
    rebuild a different Metadata (found by test_property_dcp_metadata flipping one bit of the length)."""
    md, _, _ = build_dcp(tmp_path, [(torch.float32, [], 1, 0)], seed=1)
    raw = bytearray(pickle.dumps(md, protocol=4))
    assert raw[2] == pickle.FRAME[0]
    raw[3:11] = (int.from_bytes(raw[3:11], "little") + 1024).to_bytes(8, "little")
    (tmp_path / ".metadata").write_bytes(bytes(raw))
    with pytest.raises(pickle.UnpicklingError, match="truncated"):
        pickle.loads(bytes(raw))
    with pytest.raises(CheckpointError, match=r"\.metadata: refused: the pickle declares a frame of \d+ bytes "
                                              r"where \d+ remain \(truncated\)"):
        DCPReader(tmp_path)


def test_layer_count_is_bounded_where_the_layout_search_stays_cheap():
    """The TP/PP layout search (`pipeline_split`, under `inspect` and `spec`) tries every first/last stage pair:
    a 700-byte config claiming 10^4 layers took 75 s and 6 GB there. The bound refuses such a claim in one line,
    and a config at the bound still gets its layout table."""
    from hetero_convert.layout import pipeline_options

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
           "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 256, "vocab_size": 1000,
           "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096}
    with pytest.raises(PlanError) as e:
        load_plan({**cfg, "num_hidden_layers": MAX_LAYERS + 1})
    assert "num_hidden_layers" in str(e.value) and "\n" not in str(e.value)
    plan = load_plan({**cfg, "num_hidden_layers": MAX_LAYERS})
    options = pipeline_options(plan)
    assert [o["pp"] for o in options] == [2, 4, 8]
    assert all(sum(o["layers_per_stage"]) == MAX_LAYERS for o in options)
