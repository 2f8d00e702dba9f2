"""hetero_convert.megatron: megatron-core's own GPTModel, loaded at every (TP, PP) from a checkpoint megatron saved.

No converter is involved: one torchrun launch at TP1/PP1 builds a seeded random model with megatron,
saves it with `dist_checkpointing.save` and evaluates it; three more launches load the same directories at
(2,1), (1,2) and (2,2). Each launch handles both model variants (untied and tied embeddings), because
starting torchrun and importing megatron costs far more than a forward of these tiny models. The logits
(and every layer's output) must agree across layouts to fp32 rounding.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hetero_convert.launch import PACKAGE_ROOT, run_under_torchrun
from hetero_convert.megatron.model import _masks
from hetero_convert.layout import check_layout
from hetero_convert.plan import GQA, LINEAR, NONE, SWIGLU, load_plan

pytestmark = pytest.mark.megatron

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
VARIANTS = ["untied", "tied"]
SEQ, PAD_FROM = 24, 15  # row 1 of the batch holds PAD_FROM real tokens, then right padding
REL_TOL = 1e-5
LAUNCH_TIMEOUT = 240
TESTS = str(Path(__file__).resolve().parent)


def tiny_config(tied: bool) -> dict:
    """Every layer kind, GQA with 4/2/1/8 KV heads, FFN widths that divide by TP=2 only (not by 256)."""
    gqa = lambda kv: {"num_key_value_heads": kv}  # noqa: E731
    ffn = lambda width: {"intermediate_size": width}  # noqa: E731
    blocks = [
        {"attention": gqa(4), "ffn": ffn(256)},
        {"attention": gqa(2), "ffn": {"replace_with_linear": True}},
        {"attention": {"replace_with_linear": True}, "ffn": ffn(384)},
        {"attention": {"no_op": True}, "ffn": ffn(130)},
        {"attention": gqa(1), "ffn": {"no_op": True}},  # 1 KV head: fewer than TP=2
        {"attention": {"no_op": True}, "ffn": {"no_op": True}},  # dummy layer
        {"attention": gqa(8), "ffn": ffn(192)},
    ]
    return {
        "model_type": "nemotron-nas",
        "hidden_size": 128,
        "num_attention_heads": 8,
        "num_hidden_layers": len(blocks),
        "vocab_size": 1000,  # not a multiple of 128: megatron pads it to 1024 (at TP1 and TP2)
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072,
        "tie_word_embeddings": tied,
        "block_configs": blocks,
    }


PLANS = {v: load_plan(tiny_config(v == "tied")) for v in VARIANTS}
KV1_LAYER = 4


def inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, SEQ), generator=gen)
    ids[1, :PAD_FROM] = ids[0, :PAD_FROM]  # row 1 = a prefix of row 0, then padding
    ids[1, PAD_FROM:] = -100  # a pad id outside the vocabulary must be harmless
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, PAD_FROM:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(tp, pp): {variant: worker output}} plus the checkpoint directories."""
    root = tmp_path_factory.mktemp("mcore_runtime")
    torch.save(inputs(), root / "inputs.pt")
    plan_files, ckpts = [], []
    for v in VARIANTS:
        (root / f"{v}.json").write_text(json.dumps(PLANS[v].to_json()))
        plan_files.append(str(root / f"{v}.json"))
        ckpts.append(str(root / f"ckpt_{v}"))
    results = {}
    for tp, pp in LAYOUTS:
        outs = [str(root / f"out_{v}_tp{tp}_pp{pp}.pt") for v in VARIANTS]
        args = ["--plan-json", *plan_files, "--ckpt", *ckpts, "--out", *outs, "--tp", tp, "--pp", pp,
                "--dtype", "fp32", "--device", "cpu", "--input-ids", root / "inputs.pt", "--hidden"]
        module = "hetero_convert.megatron.worker"
        if (tp, pp) == (1, 1):
            # std 0.08 rather than megatron's 0.02: attention far from uniform, so RoPE and masks matter.
            args += ["--save-random", "1234", "--init-std", "0.08"]
            module = "megatron_saver"
        run_under_torchrun(args, nproc=tp * pp, timeout=LAUNCH_TIMEOUT, log_file=root / f"tp{tp}_pp{pp}.log",
                           module=module, extra_path=[TESTS])
        results[(tp, pp)] = {v: torch.load(o, weights_only=True) for v, o in zip(VARIANTS, outs)}
    return {"results": results, "ckpts": dict(zip(VARIANTS, ckpts)), "root": root, "plans": plan_files}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_plan_covers_every_layer_kind():
    layers = PLANS["untied"].layers
    assert {l.attention.kind for l in layers} == {GQA, LINEAR, NONE}
    assert {l.ffn.kind for l in layers} == {SWIGLU, LINEAR, NONE}
    assert sorted({l.attention.num_kv_heads for l in layers if l.attention.kind == GQA}) == [1, 2, 4, 8]
    assert any(l.is_dummy for l in layers)
    assert layers[KV1_LAYER].attention.num_kv_heads == 1
    for tp, pp in LAYOUTS:
        assert check_layout(PLANS["untied"], tp, pp).ok


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=lambda l: f"tp{l[0]}pp{l[1]}")
def test_logits_agree_across_layouts(runs, variant, layout):
    ref = runs["results"][(1, 1)][variant]["logits"]
    got = runs["results"][layout][variant]["logits"]
    assert ref.dtype == got.dtype == torch.float32
    assert ref.shape == got.shape == (2, SEQ, 1000)  # vocab padding stripped
    assert torch.isfinite(got).all()
    assert ref.abs().max() > 1.0  # not a degenerate all-zero model
    assert rel_diff(got, ref) <= REL_TOL, (variant, layout, rel_diff(got, ref))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l[0]}pp{l[1]}")
def test_hidden_states_keyed_by_global_layer(runs, layout):
    for v in VARIANTS:
        hidden = runs["results"][layout][v]["hidden"]
        assert sorted(hidden) == list(range(PLANS[v].num_layers))  # every stage's layers reached rank 0
        ref = runs["results"][(1, 1)][v]["hidden"]
        for i, h in hidden.items():
            assert h.shape == (2, SEQ, 128)
            assert rel_diff(h, ref[i]) <= REL_TOL, (v, layout, i)
        # The dummy layer passes its input through untouched.
        assert torch.equal(hidden[5], hidden[4])


def test_variants_differ(runs):
    """Tying changes the model: the two variants must not produce the same logits (the tied run really
    read the embedding as its output weight)."""
    out = runs["results"][(1, 1)]
    assert rel_diff(out["tied"]["logits"], out["untied"]["logits"]) > 0.1


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l[0]}pp{l[1]}")
def test_right_padding_is_harmless(runs, layout):
    """Row 1 is row 0's first PAD_FROM tokens plus padding (ids -100): its real positions must match."""
    for v in VARIANTS:
        logits = runs["results"][layout][v]["logits"]
        assert torch.isfinite(logits).all()
        assert rel_diff(logits[1, :PAD_FROM], logits[0, :PAD_FROM]) <= REL_TOL


def test_fewer_kv_heads_than_tp(runs):
    """Layer 4 has one KV head; at TP=2 megatron all-gathers QKV. Its output must match TP=1's."""
    assert PLANS["untied"].layers[KV1_LAYER].attention.num_kv_heads == 1
    for layout in [(2, 1), (2, 2)]:
        for v in VARIANTS:
            got = runs["results"][layout][v]["hidden"][KV1_LAYER]
            ref = runs["results"][(1, 1)][v]["hidden"][KV1_LAYER]
            assert rel_diff(got, ref) <= REL_TOL


def test_saved_checkpoint_keys(runs):
    """What megatron's own save writes for the heterogeneous model (the converter must write the same)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    md = {v: FileSystemReader(runs["ckpts"][v]).read_metadata().state_dict_metadata for v in VARIANTS}
    keys = set(md["untied"])
    assert set(md["untied"]) - set(md["tied"]) == {"output_layer.weight"}
    for k in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"):
        assert isinstance(md["untied"][k], TensorStorageMetadata), k
    # megatron's own save writes its padded rows (a converter may write 1000: they load with a mismatch).
    assert list(md["untied"]["embedding.word_embeddings.weight"].size) == [1024, 128]
    # Global layer indices; the no-op halves and the dummy layer 5 have no entries.
    assert not any(k.startswith("decoder.layers.5.") for k in keys)
    assert not any(k.startswith("decoder.layers.3.self_attention") for k in keys)
    assert not any(k.startswith("decoder.layers.4.mlp") for k in keys)
    assert list(md["untied"]["decoder.layers.4.self_attention.linear_qkv.weight"].size) == [(8 + 2) * 16, 128]
    assert list(md["untied"]["decoder.layers.3.mlp.linear_fc1.weight"].size) == [2 * 130, 128]
    assert "decoder.layers.2.self_attention.layer_norm_weight" in keys
    assert "decoder.layers.1.mlp.layer_norm_weight" in keys
    extra = sorted(k for k in keys if "_extra_state" in k)
    assert "decoder.layers.2.self_attention._extra_state/shard_0_1" in extra
    assert "decoder.layers.0.mlp.linear_fc1._extra_state/shard_0_1" in extra
    assert all(isinstance(md["untied"][k], BytesStorageMetadata) for k in extra)


def test_missing_tensor_fails_the_load(runs, tmp_path):
    """The tied checkpoint has no output_layer.weight: loading it into the untied model must fail, and the
    launcher must raise with the log tail naming the key."""
    root = runs["root"]
    args = ["--plan-json", runs["plans"][0], "--ckpt", runs["ckpts"]["tied"], "--out", tmp_path / "x.pt",
            "--input-ids", root / "inputs.pt"]
    with pytest.raises(RuntimeError) as e:
        run_under_torchrun(args, nproc=1, timeout=LAUNCH_TIMEOUT, log_file=tmp_path / "fail.log")
    assert "output_layer.weight" in str(e.value)
    assert not (tmp_path / "x.pt").exists()


def test_single_process_without_torchrun_and_idempotent_patches(runs, tmp_path):
    """init_parallel(1, 1) works in a plain process (in-memory store), the patches apply once however often
    they are nested, are undone when the block ends, and the result equals the torchrun one. A subprocess,
    so nothing can leak into the pytest process."""
    script = textwrap.dedent(f"""
        import torch
        from hetero_convert.megatron import cpu, model as mcore, parallel
        from hetero_convert.megatron.worker import read_plan, read_inputs
        from megatron.core.pipeline_parallel import schedules
        real_current_device, real_schedules_torch = torch.cuda.current_device, schedules.torch
        with cpu.cpu_patches(), cpu.cpu_patches():
            parallel.init_parallel(1, 1, "cpu")
            with cpu.cpu_patches():
                assert isinstance(schedules.torch, cpu._CpuTorchForSchedules)
                assert not isinstance(schedules.torch._real, cpu._CpuTorchForSchedules)
            assert isinstance(schedules.torch, cpu._CpuTorchForSchedules)
            assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
            plan = read_plan({runs["plans"][0]!r})
            model = mcore.build_model(plan, 1, 1, "fp32", "cpu")
            mcore.load_checkpoint(model, {runs["ckpts"]["untied"]!r})
            ids, mask = read_inputs({str(runs["root"] / "inputs.pt")!r})
            torch.save(mcore.forward_logits(model, ids, mask, plan=plan), {str(tmp_path / "single.pt")!r})
            parallel.destroy_parallel()
        assert torch.cuda.current_device is real_current_device and schedules.torch is real_schedules_torch
        try:
            parallel.init_parallel(1, 1, "cpu")
        except RuntimeError as e:
            assert "cpu_patches" in str(e)
        else:
            raise AssertionError("init_parallel on CPU ran without the patches")
    """)
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, stdin=subprocess.DEVNULL,
                          stdout=open(tmp_path / "single.log", "w"), stderr=subprocess.STDOUT, timeout=240)
    assert proc.returncode == 0, (tmp_path / "single.log").read_text()[-4000:]
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    assert torch.equal(single, runs["results"][(1, 1)]["untied"]["logits"])


def test_masks_reject_left_padding():
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="right-padded"):
        _masks(ids, torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]), torch.device("cpu"))
    with pytest.raises(ValueError, match="no tokens"):
        _masks(ids, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), torch.device("cpu"))
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, -100, -100]])
    out_ids, pos, mask = _masks(ids, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), torch.device("cpu"))
    assert out_ids.tolist() == [[5, 6, 7, 8], [5, 6, 0, 0]]
    assert pos.tolist() == [[0, 1, 2, 3]] * 2
    assert mask.shape == (2, 1, 4, 4) and mask.dtype == torch.bool
    assert mask[0, 0].tolist() == torch.triu(torch.ones(4, 4, dtype=torch.bool), 1).tolist()
    # Padded keys are masked for every query; no row is fully masked.
    assert mask[1, 0, :, 2:].all() and not mask[1, 0, :, 0].any()
