"""Conversion under torchrun (CPU, gloo): same result as one process, byte-balanced split, clean failure.

Each torchrun job is a real multi-process run of the unchanged CLI, compared with the single-process
conversion of the same fixture: every tensor bit for bit, the DCP metadata's keys, shapes and chunk offsets,
and the HF side file by file.
"""

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hetero_convert.convert import hf_to_megatron, megatron_to_hf
from hetero_convert.demo import compare_checkpoints
from hetero_convert.convert.assign import plan_conversion
from hetero_convert.mappings import bind as bind_all
from hetero_convert.packing import balance
from hetero_convert.io.dcp import DCPReader
from hetero_convert.mappings import expected_hf_keys
from hetero_convert.plan import load_plan

SUPER_49B = Path(__file__).resolve().parents[1] / "fixtures" / "released" / "Llama-3_3-Nemotron-Super-49B-v1.json"


TESTS = Path(__file__).resolve().parent


def torchrun(nproc: int, *args, env: dict | None = None, module: str = "hetero_convert.cli") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *map(str, args)]
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})})


@pytest.fixture(scope="module")
def sources(tiny_sources):
    return tiny_sources


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_same_megatron(a: Path, b: Path):
    ra, rb = DCPReader(a / "release"), DCPReader(b / "release")
    ka, kb = ra.tensor_keys(), rb.tensor_keys()
    assert set(ka) == set(kb) and set(ra.object_keys()) == set(rb.object_keys())
    for key, md in ka.items():
        assert md.size == kb[key].size and md.properties.dtype == kb[key].properties.dtype, key
        chunks = lambda m: sorted((tuple(c.offsets), tuple(c.sizes)) for c in m.chunks)  # noqa: E731
        assert chunks(md) == chunks(kb[key]), key
        assert torch.equal(bits(ra.load(key)), bits(rb.load(key))), key
    for name in ("hetero_convert.json", "metadata.json"):
        assert json.loads((a / "release" / name).read_text()) == json.loads((b / "release" / name).read_text())
    assert (a / "latest_checkpointed_iteration.txt").read_text() == (b / "latest_checkpointed_iteration.txt").read_text()


def assert_same_tree(a: Path, b: Path):
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for n in names:
        assert filecmp.cmp(a / n, b / n, shallow=False), n


def assert_files_hold_their_rank(it_dir: Path, tp: int):
    """Every chunk lies in a file named for the Megatron rank that owns it (rank = stage * TP + TP rank)."""
    from hetero_convert.io.megatron_checkpoint import read_plan
    from hetero_convert.mappings import bind

    maps = {m.megatron: m for m in bind(read_plan(it_dir), tp=tp, pp=json.loads(
        (it_dir / "hetero_convert.json").read_text())["pipeline_parallel"])}
    md = DCPReader(it_dir).metadata
    for index, info in md.storage_data.items():
        m = maps.get(index.fqn)
        if m is None:  # an extra-state object: written with its tensor's TP rank 0
            continue
        rank = m.stage * tp + next(c.tp_rank for c in m.chunks(tp) if tuple(c.offsets) == tuple(index.offset))
        assert info.relative_path.startswith(f"__{rank}_"), (index, info.relative_path)


def assert_no_output(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), list(out.parent.iterdir())


# ---- real torchrun jobs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("nproc,name,tp,pp,module", [
    (2, "tiny-every-kind", 2, 2, "hetero_convert.cli"),  # 4 Megatron ranks over 2 processes
    (4, "tiny-ultra-kinds", 1, 2, "hetero_convert.cli"),  # 2 Megatron ranks over 4 processes
    (2, "tiny-llama", 1, 1, "hetero_convert.cli"),  # 1 Megatron rank; a Llama comes back a Llama
    (2, "tiny-every-kind", 2, 2, "streamed_cli"),  # every chunk and HF tensor that can stream, streamed
])
def test_distributed_matches_single_process(sources, tmp_path, nproc, name, tp, pp, module):
    src = sources[name]
    hf_to_megatron(src, tmp_path / "meg1", tp=tp, pp=pp)
    megatron_to_hf(tmp_path / "meg1", tmp_path / "hf1", max_shard_size="300KB")

    def streamed(r) -> list[int]:  # per process (streamed_cli only)
        return [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("streamed: ")]

    r = torchrun(nproc, "hf-to-megatron", src, tmp_path / "megN", "--tp", tp, "--pp", pp, "--workers", 2, "--json",
                 module=module)
    assert r.returncode == 0, r.stderr[-3000:]
    assert module == "hetero_convert.cli" or (len(streamed(r)) == nproc and min(streamed(r)) > 0), r.stderr[-3000:]
    summary = json.loads(r.stdout)  # rank 0 alone prints it
    assert summary["layout"]["processes"] == nproc
    assert_same_megatron(tmp_path / "meg1", tmp_path / "megN")
    # Whole tensors go to processes, and each process writes its own files per Megatron rank: every process
    # wrote, and every file holds the chunks of exactly the rank its name says.
    files = sorted(p.name for p in (tmp_path / "megN" / "release").glob("*.distcp"))
    assert {f.split("_p")[1].split("_")[0] for f in files} == {str(p) for p in range(nproc)}
    assert_files_hold_their_rank(tmp_path / "megN" / "release", tp)

    r = torchrun(nproc, "megatron-to-hf", tmp_path / "megN", tmp_path / "hfN", "--max-shard-size", "300KB",
                 module=module)
    assert r.returncode == 0, r.stderr[-3000:]
    assert module == "hetero_convert.cli" or (len(streamed(r)) == nproc and min(streamed(r)) > 0), r.stderr[-3000:]
    assert_same_tree(tmp_path / "hf1", tmp_path / "hfN")
    n, bad = compare_checkpoints(src, tmp_path / "hfN")
    assert n > 0 and bad == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_distributed_export_shares_one_shard_between_processes(sources, tmp_path):
    """megatron-to-hf's unit of work is a Megatron tensor, not a shard: with the whole model in one
    safetensors file, every process still writes its share of the bytes (balanced), into that one file."""
    src = sources["tiny-ultra-kinds"]
    hf_to_megatron(src, tmp_path / "meg", tp=2)
    megatron_to_hf(tmp_path / "meg", tmp_path / "one")
    r = torchrun(3, "megatron-to-hf", tmp_path / "meg", tmp_path / "three", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    shares = json.loads(r.stdout)["layout"]["bytes_written_per_process"]
    assert len(shares) == 3 and min(shares) > 0.5 * max(shares)
    assert [p.name for p in (tmp_path / "three").glob("*.safetensors")] == ["model.safetensors"]
    assert_same_tree(tmp_path / "one", tmp_path / "three")


@pytest.mark.parametrize("direction,fail_rank", [("hf-to-megatron", 1), ("megatron-to-hf", 0)])
def test_a_failed_rank_fails_the_job_and_leaves_nothing(sources, tmp_path, direction, fail_rank):
    src = sources["tiny-every-kind"]
    if direction == "hf-to-megatron":
        args = ["hf-to-megatron", src, tmp_path / "out", "--tp", 2]
    else:
        hf_to_megatron(src, tmp_path / "meg", tp=2)
        args = ["megatron-to-hf", tmp_path / "meg", tmp_path / "out", "--max-shard-size", "300KB"]
    r = torchrun(2, *args, env={"FAIL_RANK": str(fail_rank)}, module="failing_cli")
    assert r.returncode != 0
    msg = " ".join(r.stderr.split())  # rich wraps long lines
    expect = (f"rank {fail_rank} of 2 failed while converting its share: RuntimeError: injected failure on "
              f"rank {fail_rank}")
    assert expect in msg and msg.count("error:") == 1, r.stderr[-3000:]
    assert_no_output(tmp_path / "out")


def test_distributed_export_checks_the_integrity_manifest(sources, tmp_path):
    """megatron's integrity.json under torchrun: each process hashes a share of the listed files while it
    converts; the coordinator compares them all before the commit (a changed byte: nothing written)."""
    from test_mcore_compat import write_manifest

    hf_to_megatron(sources["tiny-every-kind"], tmp_path / "meg", tp=2)
    it = tmp_path / "meg" / "release"
    files = write_manifest(it)
    r = torchrun(2, "megatron-to-hf", tmp_path / "meg", tmp_path / "ok", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["layout"]["integrity_verified_files"] == len(files)
    info = next(i for k, i in DCPReader(it).metadata.storage_data.items() if k.fqn == "output_layer.weight"
                and i.relative_path.startswith("__1_"))
    with open(it / info.relative_path, "r+b") as f:
        f.seek(info.offset + info.length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    r = torchrun(2, "megatron-to-hf", tmp_path / "meg", tmp_path / "bad")
    msg = " ".join(r.stderr.split())
    assert r.returncode != 0 and f"{info.relative_path}: sha256" in msg and msg.count("error:") == 1, r.stderr[-3000:]
    assert_no_output(tmp_path / "bad")


# ---- assignment and planning, in process ----------------------------------------------------------------


def test_balance_is_largest_first_and_deterministic():
    costs = [1, 9, 1, 1, 5, 4, 1, 0]
    bins = balance(costs, 3)
    assert sorted(i for b in bins for i in b) == list(range(len(costs)))
    assert [sum(costs[i] for i in b) for b in bins] == [9, 7, 6]  # 9 | 5+1+1 | 4+1+1+0
    assert bins == balance(costs, 3)


def test_tensors_balanced_by_bytes_not_count():
    """Ultra-253B puts 425,984-wide FFNs beside dummy layers: processes get tensors by bytes."""
    plan = load_plan(SUPER_49B)
    d = plan_conversion(SUPER_49B, 8, tp=8)
    counts = [r["tensors"] for r in d["per_rank"]]
    assert sum(counts) == len(bind_all(plan)) and max(counts) > 2 * min(counts)  # very unequal counts...
    assert d["max_over_mean"] < 1.01  # ...equal bytes


def test_plan_convert_full_size_without_weights():
    plan = load_plan(SUPER_49B)
    hf_bytes = 2 * sum(torch.Size(s).numel() for s in expected_hf_keys(plan).values())
    d = plan_conversion(SUPER_49B, 4, tp=8, pp=2)
    assert d["granularity"] == "tensor" and d["megatron_ranks"] == 16
    assert d["total_read_bytes"] == hf_bytes  # every source byte read exactly once across the job
    assert d["max_over_mean"] < 1.01
    d = plan_conversion(SUPER_49B, 16, direction="megatron-to-hf")
    assert d["total_write_bytes"] == hf_bytes and len(d["per_rank"]) == 16
    r = subprocess.run([sys.executable, "-m", "hetero_convert.cli", "plan-convert", str(SUPER_49B), "--ranks", "3",
                        "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["total_read_bytes"] == hf_bytes


def test_distributed_reshard_matches_single_process(sources, tmp_path):
    """megatron-to-megatron over 2 processes: the same checkpoint as one process writes (files tagged per
    process, DCP finds chunks through .metadata)."""
    from hetero_convert.convert import megatron_to_megatron

    src = sources["tiny-every-kind"]
    hf_to_megatron(src, tmp_path / "meg", tp=2, pp=2)
    megatron_to_megatron(tmp_path / "meg", tmp_path / "one", tp=1, pp=2)
    r = torchrun(2, "megatron-to-megatron", tmp_path / "meg", tmp_path / "two", "--tp", 1, "--pp", 2, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["layout"]["processes"] == 2
    ra, rb = DCPReader(tmp_path / "one" / "release"), DCPReader(tmp_path / "two" / "release")
    assert set(ra.tensor_keys()) == set(rb.tensor_keys())
    for key in ra.tensor_keys():
        assert torch.equal(bits(ra.load(key)), bits(rb.load(key))), key
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
