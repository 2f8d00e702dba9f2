"""megatron-to-hf on a checkpoint that megatron-core itself saved, chunked at TP=2 PP=2 as a training run at
that layout chunks it, with only what such a run leaves behind (its args in common.pt, no description of
ours). The converted HF model must reproduce megatron's own logits for that checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hetero_convert.launch import run_under_torchrun
from hetero_convert.convert import megatron_to_hf
from hetero_convert.hf import DeciLMForCausalLM
from hetero_convert.io.dcp import DCPReader
from hetero_convert.plan import load_plan
from hetero_convert.resources import shipped_dir

REL_TOL = 1e-5


def test_training_run_checkpoint_to_hf_reproduces_megatron_logits(tmp_path):
    config = json.loads((shipped_dir("fixtures", "tiny-every-kind.json") / "tiny-every-kind.json").read_text())
    plan = load_plan(config)
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_json()))
    ids = torch.randint(0, plan.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "inputs.pt")
    ckpt = tmp_path / "iter_0000100"
    run_under_torchrun(
        ["--plan-json", tmp_path / "plan.json", "--ckpt", ckpt, "--out", tmp_path / "megatron.pt", "--tp", 2,
         "--pp", 2, "--dtype", "fp32", "--device", "cpu", "--input-ids", tmp_path / "inputs.pt",
         "--save-random", 11, "--init-std", "0.08", "--training-args"],
        nproc=4, timeout=300, log_file=tmp_path / "save.log", module="megatron_saver",
        extra_path=[str(Path(__file__).resolve().parent)])
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("100")

    # What megatron wrote: its own file per rank, tensors in TP chunks, none of our metadata.
    assert {p.name.split("_")[2] for p in ckpt.glob("*.distcp")} == {"0", "1", "2", "3"}  # __{rank}_{k}.distcp
    assert not (ckpt / "hetero_convert.json").exists()
    qkv = DCPReader(ckpt).tensor_keys()["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert len(qkv.chunks) == 2

    megatron_to_hf(tmp_path, tmp_path / "hf")  # the root: found through the tracker file
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["block_configs"] == plan.hf_block_configs()
    assert written["vocab_size"] == plan.vocab_size  # megatron's padding to 1024 rows stripped

    model = DeciLMForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = model(ids).logits
    meg_logits = torch.load(tmp_path / "megatron.pt", weights_only=True)["logits"][..., : plan.vocab_size]
    rel = ((hf_logits - meg_logits).abs().max() / meg_logits.abs().max()).item()
    assert rel <= REL_TOL, rel
