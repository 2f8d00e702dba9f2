"""Property test (issue #11, phase 2): a malformed `hetero_convert.json` is converted exactly or refused in one line.

The genuine description of a tiny heterogeneous checkpoint (TP 2) gets one damage: a field anywhere in it (top
level, the plan, a layer's attention or FFN, the rope scaling, the recorded source config and its block configs,
the block-config records, the carried-files record) set to a hostile or a plausible wrong value, deleted, or
joined by an unknown key; layers swapped, dropped or repeated; or the file's bytes themselves damaged. Every case
must be either refused with a `HeteroConvertError` whose message, on one line, names the description (or the
checkpoint), or accepted, and then convert to exactly the genuine output: the same plan, the same shard layout,
the same config.json and remote code byte for byte (what the tensors become is a function of those and of the
untouched data files; the first accepted cases also run the whole conversion and compare every tensor).
A damage can never make the converter write something else and exit 0.
"""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hetero_convert.cli.failures import one_line
from hetero_convert.convert import hf_to_megatron, megatron_to_hf
from hetero_convert.convert.to_hf import ToHFJob
from hetero_convert.demo import compare_checkpoints
from hetero_convert.errors import HeteroConvertError

CASES = settings(max_examples=1000, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
FULL_CONVERSIONS = 8  # accepted cases that also run the whole conversion (0.3 s each)


@pytest.fixture(scope="module")
def genuine(tiny_sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("descriptions")
    meg = root / "meg"
    hf_to_megatron(tiny_sources["tiny-every-kind"], meg, tp=2)
    megatron_to_hf(meg, root / "ref")
    path = meg / "release" / "hetero_convert.json"
    job = ToHFJob(meg, root / "x", "5GB", "keep", False, None)
    job.write_metadata(root / "ref-meta")
    return {"root": root, "meg": meg, "path": path, "text": path.read_text(), "desc": json.loads(path.read_text()),
            "plan": job.plan, "layout": job.shard_layout, "meta": root / "ref-meta", "ref": root / "ref",
            "full": [0]}


def leaves(value, path=()):
    """Every (path, value) in a JSON value, containers included."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, path + (i,))


HOSTILE = st.sampled_from([0, -1, 1, 2, 3, 10**9, 2**63, 10**400, 0.5, 1.0, 1e-12, math.nan, math.inf, -math.inf,
                           "", "x", "4096", "bfloat16", "llama", "gqa", "none", True, False, None, [], [1, 2], {},
                           {"kind": "gqa"}, "a" * 300, "line\nbreak [red]x[/red]"])


def plausible(value):
    """Near misses: what a careless edit or a forger would try."""
    if isinstance(value, bool):
        return st.just(not value)
    if isinstance(value, int):
        return st.sampled_from([value + 1, value - 1, value * 2, max(1, value // 2), float(value)])
    if isinstance(value, float):
        return st.sampled_from([value * 2, value / 2, value + 1e-9, int(value) if math.isfinite(value) else 0])
    if isinstance(value, str):
        return st.sampled_from([value + "x", value.upper(), value[:-1]])
    return HOSTILE


@st.composite
def damages(draw, desc: dict):
    """(a name for the statistics, a function that damages a copy of `desc`)."""
    # A section first (top-level key, the plan's layers, the source config's block configs), then a place in it:
    # the many block-config leaves would otherwise crowd out the few top-level fields.
    paths = [p for p, _ in leaves(desc) if p]
    sections = sorted({p[:2] if p[:2] in (("plan", "layers"), ("source", "source_config")) else p[:1] for p in paths})
    section = draw(st.sampled_from(sections))
    paths = [p for p in paths if p[:len(section)] == section]
    how = draw(st.sampled_from(["set", "set", "set", "delete", "add key", "layers"]))
    if how == "set":
        p = draw(st.sampled_from(paths))
        new = draw(st.one_of(HOSTILE, plausible(get(desc, p))))
        return f"set {'.'.join(map(str, section))}", lambda d: put(d, p, new)
    if how == "delete":
        p = draw(st.sampled_from(paths))
        return f"delete {'.'.join(map(str, section))}", lambda d: remove(d, p)
    if how == "add key":
        p = draw(st.sampled_from([()] + [p for p in paths if isinstance(get(desc, p), dict)]))
        key = draw(st.sampled_from(["extra", "kind", "format", "vocab_size", "__proto__"]))
        value = draw(HOSTILE)
        return "add key", lambda d: put(d, p + (key,), value)
    change = draw(st.sampled_from(["swap", "drop", "repeat", "swap-source"]))
    n = len(desc["plan"]["layers"])
    i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))

    def edit(d):
        if change == "swap-source":
            blocks = d["source"]["source_config"]["block_configs"]
            blocks[i], blocks[j] = blocks[j], blocks[i]
            return
        ls = d["plan"]["layers"]
        if change == "swap":
            ls[i], ls[j] = ls[j], ls[i]
        elif change == "drop":
            del ls[i]
        else:
            ls.insert(i, copy.deepcopy(ls[j]))

    return f"layers {change}", edit


def get(d, path):
    for k in path:
        d = d[k]
    return d


def put(d, path, value):
    get(d, path[:-1])[path[-1]] = value


def remove(d, path):
    parent = get(d, path[:-1])
    del parent[path[-1]]


RAW = st.sampled_from(["", "[]", "null", "{", "{\"plan\": {}}", "{\"a\": 1, \"a\": 2}", "\ufeff{}",
                       "{\"x\": " + "[" * 50_000 + "]" * 50_000 + "}", "{\"plan\": NaN}"])


def check_case(genuine, text: str, what: str):
    genuine["path"].write_text(text)
    try:
        job = ToHFJob(genuine["meg"], genuine["root"] / "out", "5GB", "keep", False, None)
        meta = genuine["root"] / "meta"
        shutil.rmtree(meta, ignore_errors=True)
        meta.mkdir()
        job.write_metadata(meta)
    except HeteroConvertError as e:
        msg = one_line(str(e))
        assert str(genuine["meg"]) in msg, (what, msg)
        assert "Traceback" not in msg and len(msg) < 4100
        event(f"{what}: refused")
        return
    event(f"{what}: accepted")
    # Accepted: exactly what the genuine description gives.
    assert job.plan == genuine["plan"], what
    assert job.shard_layout == genuine["layout"], what
    names = sorted(p.name for p in meta.iterdir())
    assert names == sorted(p.name for p in genuine["meta"].iterdir()), what
    for n in names:
        assert (meta / n).read_bytes() == (genuine["meta"] / n).read_bytes(), (what, n)
    if genuine["full"][0] < FULL_CONVERSIONS:
        genuine["full"][0] += 1
        megatron_to_hf(genuine["meg"], genuine["root"] / "out", overwrite=True)
        count, bad = compare_checkpoints(genuine["root"] / "out", genuine["ref"])
        assert count and not bad, (what, bad)


@CASES
@given(data=st.data())
def test_property_descriptions(genuine, data):
    desc = copy.deepcopy(genuine["desc"])
    what, edit = data.draw(damages(genuine["desc"]))
    try:
        edit(desc)
        text = json.dumps(desc)
    except (IndexError, KeyError, TypeError, ValueError, OverflowError):  # the damage itself made no sense here
        text = genuine["text"]
        what = "unchanged"
    try:
        check_case(genuine, text, what)
    finally:
        genuine["path"].write_text(genuine["text"])


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(RAW, st.text(max_size=40)))
def test_property_description_files(genuine, raw):
    try:
        check_case(genuine, raw, "raw")
    finally:
        genuine["path"].write_text(genuine["text"])
