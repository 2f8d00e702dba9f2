"""In-memory streaming between a live megatron-core GPTModel and HF tensors (hetero_convert.megatron.streaming),
at TP=2 x PP=2 on CPU, checked against the file-based conversion of the same checkpoint, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hetero_convert.convert import hf_to_megatron
from hetero_convert.fixtures import write_random_checkpoint
from hetero_convert.fixtures_modelopt import write_modelopt_checkpoint
from hetero_convert.io.quantized import open_checkpoint
from hetero_convert.launch import run_under_torchrun
from hetero_convert.mappings import expected_hf_keys
from hetero_convert.plan import load_plan

pytestmark = pytest.mark.megatron

TESTS = str(Path(__file__).resolve().parent)
# every layer kind; tied embeddings (a copy on the last stage); a ModelOpt NVFP4 export (read dequantized)
FIXTURES = ["tiny-every-kind", "tiny-tied", "nvfp4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    cases = {}
    for name in FIXTURES:
        hf = write_modelopt_checkpoint("tiny-every-kind", root / name / "hf", "NVFP4", seed=7) if name == "nvfp4" \
            else write_random_checkpoint(name, root / name / "hf", seed=7, max_shard_bytes=300_000)
        hf_to_megatron(hf, root / name / "meg", tp=2, pp=2)
        (root / name / "plan.json").write_text(json.dumps(load_plan(hf).to_json()))
        cases[name] = {"plan": str(root / name / "plan.json"), "megatron": str(root / name / "meg" / "release"), "hf": str(hf)}
    run_under_torchrun([2, 2, root, json.dumps(cases)], nproc=4, timeout=300, log_file=root / "streaming.log",
                       module="streaming_worker", extra_path=[TESTS])
    return root, cases


@pytest.mark.parametrize("name", FIXTURES)
def test_export_equals_the_hf_checkpoint(run, name):
    """What export_hf_weights yields from a model loaded through megatron's own loader is the HF source, every
    tensor bit for bit, in model order, with nothing extra (vocab padding stripped)."""
    root, cases = run
    exported = torch.load(root / f"{name}_exported.pt", weights_only=True)
    src = open_checkpoint(cases[name]["hf"])
    assert list(exported) == list(expected_hf_keys(load_plan(cases[name]["hf"])))
    for key, t in exported.items():
        ref = src.read(key)
        assert t.dtype == ref.dtype and t.shape == ref.shape, key
        assert torch.equal(t.view(torch.uint8) if t.numel() else t, ref.view(torch.uint8) if ref.numel() else ref), key


@pytest.mark.parametrize("name", FIXTURES)
def test_load_equals_megatron_load_on_every_rank(run, name):
    """load_hf_weights fills exactly the parameters megatron's dist_checkpointing.load of the converted
    checkpoint fills, with the same bits, on each of the 4 ranks; each rank yields its own stage's tensors
    with all_ranks=False and everything with all_ranks=True."""
    root, cases = run
    everything = set(expected_hf_keys(load_plan(cases[name]["hf"])))
    stage_keys = [set(), set()]
    for rank in range(4):
        r = torch.load(root / f"{name}_rank{rank}.pt", weights_only=True)
        assert r["differ"] == [], (rank, r["differ"])
        assert r["filled"] and r["params"] > 0
        assert set(r["all"]) == everything
        stage_keys[rank // 2] |= set(r["mine"])
    assert stage_keys[0] | stage_keys[1] == everything and not stage_keys[0] & stage_keys[1]
