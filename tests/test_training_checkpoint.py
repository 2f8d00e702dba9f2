"""megatron-to-hf on checkpoints that megatron-core itself saved, with only what a training run leaves behind
(its args in the common state: common.pt up to megatron-core 0.18, the common_state object in 0.19; no
description of ours). The converted HF model must reproduce megatron's own logits for that checkpoint.

1. megatron's own save of a model chunked at TP=2 PP=2, as a run at that layout chunks it.
2. A run's checkpoint as Megatron-LM's save_checkpoint lays it out (tests/run_like_checkpoint.py): after a real
   optimizer step, with the DistributedOptimizer's state, RNG, scheduler and rerun state beside the model's, in
   an iter_ folder; a heterogeneous model (per-layer keys), and a homogeneous Llama (stacked layers, only a
   padded vocabulary size in its args). Under 0.19 the heterogeneous one also has megatron's integrity.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hetero_convert.launch import PACKAGE_ROOT, run_under_torchrun
from hetero_convert.convert import ConversionError, hf_to_megatron, megatron_to_hf, megatron_to_megatron
from hetero_convert.errors import VerifyError
from hetero_convert.hf import DeciLMForCausalLM
from hetero_convert.io.dcp import DCPReader
from hetero_convert.io.megatron_checkpoint import NON_MODEL_PREFIXES
from hetero_convert.mappings import bind
from hetero_convert.megatron.compat import COMMON_STATE_KEY, installed_version, read_common_state
from hetero_convert.plan import load_plan
from hetero_convert.resources import shipped_dir
from conftest import dtype_kwarg

pytestmark = pytest.mark.megatron
REL_TOL = 1e-5
TESTS = Path(__file__).resolve().parent


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

    model = DeciLMForCausalLM.from_pretrained(tmp_path / "hf", **dtype_kwarg(torch.float32)).eval()
    with torch.no_grad():
        hf_logits = model(ids).logits
    meg_logits = torch.load(tmp_path / "megatron.pt", weights_only=True)["logits"][..., : plan.vocab_size]
    rel = ((hf_logits - meg_logits).abs().max() / meg_logits.abs().max()).item()
    assert rel <= REL_TOL, rel


def llama_config() -> dict:
    """The bundled tiny Llama, untied and with llama3 RoPE scaling: GQA (2 KV groups of 3 heads), TP=2 works."""
    config = json.loads((shipped_dir("fixtures", "tiny-llama.json") / "tiny-llama.json").read_text())
    config.update(tie_word_embeddings=False, max_position_embeddings=131072,
                  rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})
    return config


def _rchar() -> int:
    """Bytes this process has read through read(2) and friends, all threads (Linux)."""
    return int(next(l for l in Path("/proc/self/io").read_text().splitlines() if l.startswith("rchar:")).split()[1])


def _common_state_without_megatron(it: Path) -> str:
    """Read the run's common state in a fresh interpreter and report whether megatron got imported."""
    script = ("import sys; from hetero_convert.megatron.compat import read_common_state; "
              f"s = read_common_state({str(it)!r}); "
              "print(s['args'].num_layers, type(s['args'].attention_backend).__name__, "
              "any(m == 'megatron' or m.startswith('megatron.') for m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


@pytest.mark.parametrize("kind", ["heterogeneous", "llama"])
def test_training_run_with_distributed_optimizer_exports_bit_exactly(tmp_path, kind):
    """The run's checkpoint exports to HF bit-exactly: every tensor comes back unchanged through hf-to-megatron,
    and the HF model computes megatron's own logits for the checkpoint. Optimizer, RNG, scheduler and rerun
    state are never read: with every byte of them overwritten, the export is the same, and the process reads
    no more than the model's bytes and the metadata."""
    hetero = kind == "heterogeneous"
    config = json.loads((shipped_dir("fixtures", "tiny-every-kind.json") / "tiny-every-kind.json").read_text()) \
        if hetero else llama_config()
    plan = load_plan(config)
    tp = 1 if hetero else 2  # heterogeneous: DP=2 shards the optimizer state; llama: TP=2 chunks each layer
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, plan.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "inputs.pt")
    root = tmp_path / "run"
    run_under_torchrun([root, tmp_path / "config.json", "--kind", kind, "--tp", tp, "--input-ids",
                        tmp_path / "inputs.pt", "--out", tmp_path / "megatron.pt", *(["--integrity"] if hetero else [])],
                       nproc=2, timeout=600, log_file=tmp_path / "run.log", module="run_like_checkpoint",
                       extra_path=[str(TESTS)])

    # What the run left: an iter_ folder, the common state where this megatron-core puts it, optimizer state.
    it = root / "iter_0000100"
    reader = DCPReader(it)
    v019 = installed_version() >= (0, 19)
    assert not (it / "hetero_convert.json").exists()
    assert (it / "common.pt").is_file() != v019 and (COMMON_STATE_KEY in reader.object_keys()) == v019
    assert any(k.startswith("optimizer.") for k in reader.tensor_keys())
    assert any(k.startswith("rng_state/") for k in reader.object_keys())
    stacked = [k for k in reader.tensor_keys() if k.startswith("decoder.layers.") and not k.split(".")[2].isdigit()]
    assert bool(stacked) != hetero
    state = read_common_state(it)
    assert state["args"].num_layers == plan.num_layers and "opt_param_scheduler" in state
    manifest = it / "integrity.json"
    if v019:
        assert manifest.is_file() == hetero
    if hetero:  # the args hold megatron enums: read through stand-ins, megatron never imported
        assert _common_state_without_megatron(it) == [str(plan.num_layers), "AttnBackend", "False"]

    s = megatron_to_hf(root, tmp_path / "hf")  # the root: found through the tracker file
    if manifest.is_file():
        assert s.layout["integrity_verified_files"] == len(json.loads(manifest.read_text())["files"])
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    if hetero:
        assert written["block_configs"] == plan.hf_block_configs() and written["vocab_size"] == plan.vocab_size
    else:  # only the padded size is recorded: it is exported, and the summary says so
        assert written["architectures"] == ["LlamaForCausalLM"] and written["vocab_size"] == 512
        assert written["rope_scaling"]["factor"] == 4.0 and written["num_key_value_heads"] == 2
        assert any("padded_vocab_size = 512" in w for w in s.warnings)

    # Megatron's own logits for the checkpoint (fp32, from the same bf16 weights).
    if hetero:
        model = DeciLMForCausalLM.from_pretrained(tmp_path / "hf", **dtype_kwarg(torch.float32)).eval()
    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(tmp_path / "hf", **dtype_kwarg(torch.float32)).eval()
    with torch.no_grad():
        hf_logits = model(ids).logits
    meg_logits = torch.load(tmp_path / "megatron.pt", weights_only=True)["logits"][..., : hf_logits.shape[-1]]
    assert ((hf_logits - meg_logits).abs().max() / meg_logits.abs().max()).item() <= REL_TOL

    # Bit-exact: back through hf-to-megatron at the run's TP, every model tensor equals the run's own.
    hf_to_megatron(tmp_path / "hf", tmp_path / "back", tp=tp)
    back = DCPReader(tmp_path / "back" / "release")
    reader.view_stacked_layers(plan.num_layers)
    exported = load_plan(tmp_path / "hf")
    for m in bind(exported, tp):
        a, b = reader.load(m.megatron), back.load(m.megatron)
        rows = m.vocab_rows if m.vocab_padded else a.shape[0]  # beyond them: megatron's padding, not exported
        assert torch.equal(a[:rows], b[:rows]), m.megatron

    # Overwrite every byte of optimizer, RNG and rerun state: an export that read (or unpickled) any of it fails.
    model_bytes = other = 0
    for index, info in reader.metadata.storage_data.items():
        if index.fqn.startswith(NON_MODEL_PREFIXES):
            with open(it / info.relative_path, "r+b") as f:
                f.seek(info.offset)
                f.write(b"\xff" * info.length)
            other += info.length
        else:
            model_bytes += info.length
    assert other > model_bytes  # the run's folder is mostly optimizer state
    if manifest.is_file():  # now the data files differ from the manifest: refused, nothing written
        with pytest.raises(ConversionError, match=r"__\d+_\d+\.distcp: sha256 [0-9a-f]+\.\.\., integrity.json says"):
            megatron_to_hf(root, tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
    before = _rchar()
    s2 = megatron_to_hf(root, tmp_path / "hf2", verify_integrity=False)
    read = _rchar() - before
    assert read < model_bytes + (it / ".metadata").stat().st_size + (1 << 20) < model_bytes + other, (read, model_bytes)
    first, again = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    # Every tensor streamed (megatron's own records; the llama's stacked layers at their offsets in chunks holding
    # one layer each, its row-parallel weights in column strips): the same file.
    with pytest.MonkeyPatch.context() as mp:
        from hetero_convert.convert import to_hf

        from hetero_convert.io.hf_checkpoint import ShardedWriter

        streamed, real = [], ShardedWriter.write_streamed
        mp.setattr(to_hf, "STREAM_MIN_BYTES", 0)
        mp.setattr(to_hf, "BLOCK_BYTES", 1000)  # a few whole rows: the widest (down_proj's) is 512 bytes
        mp.setattr(ShardedWriter, "write_streamed", lambda self, key, *a: (streamed.append(key), real(self, key, *a)))
        megatron_to_hf(root, tmp_path / "hf3", verify_integrity=False)
    assert {"model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.o_proj.weight",
            "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight",
            "model.layers.1.input_layernorm.weight"} <= set(streamed)  # (the llama's at TP=2: column strips)
    assert (tmp_path / "hf3" / "model.safetensors").read_bytes() == (tmp_path / "hf2" / "model.safetensors").read_bytes()
    if manifest.is_file():
        assert any("integrity.json: not verified" in w for w in s2.warnings)

    if not hetero:
        # A stacked checkpoint re-laid out per layer equals hf-to-megatron of its export; verify says what to do.
        megatron_to_megatron(root, tmp_path / "relaid", tp=tp)
        relaid = DCPReader(tmp_path / "relaid" / "release")
        assert set(relaid.tensor_keys()) == set(back.tensor_keys())
        for key in back.tensor_keys():
            assert torch.equal(relaid.load(key), back.load(key)), key
        from hetero_convert import verify

        with pytest.raises(VerifyError, match="stacked"):
            verify(tmp_path / "hf", root)
