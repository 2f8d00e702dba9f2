"""Writer version x loader version, with megatron-core's own save and load.

Every interpreter in HC_MEGATRON_PYTHONS (os.pathsep-separated; default: this one; .ci/run gives one with
megatron-core 0.16.1 and one with 0.19.2) saves a training run's checkpoint with its own megatron-core
(`dist_checkpointing.save`, args in the common state), and then loads, with its own `dist_checkpointing.load`,
every checkpoint every writer made and the three forms hf-to-megatron writes (--megatron-core any, 0.16, 0.19).
Each loads to the same logits in every version, except the folders whose common state exists only as 0.19's
common_state object (what 0.19 saves, and what --megatron-core 0.19 writes): 0.16 .. 0.18 cannot load those,
and must fail on the missing common.pt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hetero_convert.convert import hf_to_megatron
from hetero_convert.fixtures import write_random_checkpoint
from hetero_convert.launch import PACKAGE_ROOT, run_under_torchrun

pytestmark = pytest.mark.megatron
PYTHONS = [p for p in os.environ.get("HC_MEGATRON_PYTHONS", sys.executable).split(os.pathsep) if p]
TESTS = str(Path(__file__).resolve().parent)


def _version(python: str) -> tuple[int, ...]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([python, "-c", "from hetero_convert.megatron.compat import installed_version as v; "
                                        "print(*v())"], capture_output=True, text=True, env=env, check=True)
    return tuple(map(int, out.stdout.split()))


def test_every_writer_loads_in_every_loader(tmp_path):
    hf = write_random_checkpoint("tiny-every-kind", tmp_path / "hf", seed=3)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.save(ids, tmp_path / "ids.pt")
    versions = {py: _version(py) for py in PYTHONS}
    folders: dict[str, tuple[Path, bool]] = {}  # name -> (iteration folder, loads only in 0.19)
    for target in ("any", "0.16", "0.19"):
        hf_to_megatron(hf, tmp_path / target, tp=2, megatron_core=target)
        folders[f"hf-to-megatron --megatron-core {target}"] = (tmp_path / target / "release", target == "0.19")
    for k, (py, v) in enumerate(versions.items()):
        out = tmp_path / f"saved-{k}"
        run_under_torchrun(["--plan-json", hf / "config.json", "--ckpt", out, "--out", tmp_path / f"saved-{k}.pt",
                            "--input-ids", tmp_path / "ids.pt", "--save-random", 11, "--training-args"],
                           nproc=1, timeout=300, log_file=tmp_path / f"save-{k}.log", module="megatron_saver",
                           extra_path=[TESTS], python=py)
        assert (out / "common.pt").is_file() != (v >= (0, 19))  # where this version keeps the common state
        folders[f"megatron-core {'.'.join(map(str, v))} save"] = (out, v >= (0, 19))

    logits: dict[str, list[torch.Tensor]] = {name: [] for name in folders}
    for k, (py, v) in enumerate(versions.items()):
        cases = {name: [str(folder), str(tmp_path / f"load-{k}-{j}.pt")] for j, (name, (folder, _)) in
                 enumerate(folders.items())}
        spec = {"plan": str(hf / "config.json"), "inputs": str(tmp_path / "ids.pt"),
                "result": str(tmp_path / f"result-{k}.json"), "cases": cases}
        (tmp_path / f"spec-{k}.json").write_text(json.dumps(spec))
        run_under_torchrun([tmp_path / f"spec-{k}.json"], nproc=1, timeout=300, log_file=tmp_path / f"load-{k}.log",
                           module="load_matrix_worker", extra_path=[TESTS], python=py)
        result = json.loads((tmp_path / f"result-{k}.json").read_text())
        assert tuple(result["version"]) == v
        for name, (folder, only_019) in folders.items():
            outcome = result["cases"][name]
            if only_019 and v < (0, 19):
                assert outcome != "ok" and "common.pt" in outcome, f"{name} in megatron-core {v}: {outcome}"
            else:
                assert outcome == "ok", f"megatron-core {v} cannot load {name}: {outcome}"
                logits[name].append(torch.load(cases[name][1], weights_only=True)["logits"])
    for name, (_, only_019) in folders.items():  # every version that loads it computes the same logits
        got = logits[name]
        assert len(got) == sum(not (only_019 and v < (0, 19)) for v in versions.values()), name
        assert all(torch.equal(got[0], g) for g in got), name
    ours = [g for name, got in logits.items() if name.startswith("hf-to-megatron") for g in got]
    assert all(torch.equal(ours[0], g) for g in ours)  # the three forms hold the same weights
