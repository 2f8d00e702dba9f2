"""`hetero-convert demo`: the main job on the bundled example, end to end, in seconds on two CPU cores."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def compare_checkpoints(a: Path, b: Path) -> tuple[int, list[str]]:
    """Number of tensors compared, and the names of those that differ in any bit (or exist on one side)."""
    import torch
    from safetensors.torch import load_file

    def load_all(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    ta, tb = load_all(a), load_all(b)
    bad = sorted(set(ta) ^ set(tb))
    bad += [k for k in sorted(set(ta) & set(tb))
            if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k])]
    return len(ta), bad


def run_demo(workdir: Path, tp: int, pp: int, console: Console, verify: bool = True) -> bool:
    import json

    from .convert import hf_to_megatron, megatron_to_hf
    from .fixtures import write_random_checkpoint
    from .plan import load_plan

    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    src = write_random_checkpoint("tiny-every-kind", workdir / "hf", seed=0, max_shard_bytes=1 << 20)
    plan = load_plan(src)
    console.print(f"1. wrote the bundled heterogeneous example to {src}", highlight=False)
    s1 = hf_to_megatron(src, workdir / "megatron", tp=tp, pp=pp, overwrite=True)
    console.print(f"2. hf-to-megatron TP={tp} PP={pp}: {s1.chunks} chunks of {s1.tensors} tensors in {s1.layout['files']} files, "
                  f"{s1.seconds:.2f}s -> {workdir / 'megatron'}", highlight=False)
    s2 = megatron_to_hf(workdir / "megatron", workdir / "hf-roundtrip", max_shard_size="1MB", overwrite=True)
    console.print(f"3. megatron-to-hf: {s2.tensors} tensors, {s2.seconds:.2f}s -> {workdir / 'hf-roundtrip'}",
                  highlight=False)
    n, bad = compare_checkpoints(src, workdir / "hf-roundtrip")
    same_blocks = (json.loads((src / "config.json").read_text())["block_configs"]
                   == json.loads((workdir / "hf-roundtrip" / "config.json").read_text())["block_configs"])

    t = Table(title="bundled example: per-layer round trip")
    for col in ("layer", "attention", "FFN", "params", "stage", "bit-exact"):
        t.add_column(col)
    stages = {}
    from .layout import pipeline_split

    split = pipeline_split(plan, pp)
    for layer in plan.layers:
        prefix = f"model.layers.{layer.index}."
        layer_bad = [k for k in bad if k.startswith(prefix)]
        stages[layer.index] = split.stage_of_layer(layer.index)
        a, f = (sub.spec.describe(sub) for sub in layer.parts)
        t.add_row(str(layer.index), a, f, str(plan.layer_parameters(layer)["total"]), str(stages[layer.index]),
                  "[red]NO[/]" if layer_bad else ("[green]yes[/]" if plan.layer_parameters(layer)["total"] else "(empty)"))
    console.print(t)
    ok = not bad and same_blocks
    if verify:
        from .parity import print_report, verify as run_verify

        console.print(f"4. verify: HF model vs megatron-core GPTModel at TP={tp} PP={pp} on CPU (gloo, fp32)")
        report = run_verify(src, workdir / "megatron", tp=tp, pp=pp, device="cpu", dtype="fp32", batch=2, seq_len=32)
        print_report(report, console)
        ok = ok and report.ok
    console.print(f"{n} tensors compared: {'[green]all bit-exact[/]' if not bad else f'[red]{len(bad)} differ: {bad[:5]}[/]'}; "
                  f"block_configs {'equal' if same_blocks else '[red]differ[/]'}; total {time.time() - t0:.1f}s")
    return ok
