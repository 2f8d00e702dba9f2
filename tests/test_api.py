"""The public API (hetero_convert/__init__.py): what code imports and calls."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

from conftest import REPO


def test_api_functions_are_not_shadowed_by_modules():
    """Importing every submodule (as the CLI and tests do) leaves `verify` and `prune` the functions: no module
    of the package has those names."""
    import hetero_convert as hc

    for name in ("parity", "pruning", "reference", "convert", "megatron.streaming", "describe"):
        importlib.import_module(f"hetero_convert.{name}")
    assert callable(hc.verify) and hc.verify.__module__ == "hetero_convert"
    assert callable(hc.prune) and hc.prune.__module__ == "hetero_convert"
    for name in hc.__all__:
        assert hasattr(hc, name), name


def test_importing_the_package_is_cheap():
    """`import hetero_convert` loads neither torch nor megatron-core nor transformers."""
    code = ("import sys, hetero_convert; "
            "print(sorted(m for m in ('torch', 'megatron', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"


def test_verify_gives_every_rank_the_report(tiny_sources, tmp_path):
    """Under the user's own torchrun (TP=2), `hetero_convert.verify` returns the same report on both ranks."""
    from hetero_convert import hf_to_megatron

    hf_to_megatron(tiny_sources["tiny-tied"], tmp_path / "meg")
    script = tmp_path / "v.py"
    script.write_text(
        "import json, os, sys\n"
        "import hetero_convert as hc\n"
        f"r = hc.verify({str(tiny_sources['tiny-tied'])!r}, {str(tmp_path / 'meg')!r}, tp=2, seq_len=16,\n"
        f"              workdir={str(tmp_path / 'w')!r})\n"
        f"open(os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK']), 'w').write(json.dumps([r.ok, r.tp]))\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                                             if p)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text() == "[true, 2]"
