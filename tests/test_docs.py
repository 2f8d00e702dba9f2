"""The examples in docs/api.md run as written: every ```python block whose first line is `# example` (with
`torchrun=N`, under torchrun with N processes), each in an empty directory of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

BLOCK = re.compile(r"```python\n(# example[^\n]*)\n(.*?)```", re.S)
# an example that runs megatron-core: verify, the live-model API, or the megatron package itself
USES_MEGATRON = re.compile(r"\bverify\(|_hf_weights\(|hetero_convert\.megatron\b")


def examples(doc: str) -> list:
    text = (REPO / "docs" / doc).read_text()
    out = []
    for k, (head, body) in enumerate(BLOCK.findall(text)):
        m = re.search(r"torchrun=(\d+)", head)
        marks = [pytest.mark.megatron] if USES_MEGATRON.search(body) else []
        out.append(pytest.param(f"{doc}:{k}", int(m.group(1)) if m else 0, body, marks=marks, id=f"{doc}:{k}"))
    return out


@pytest.mark.parametrize("name,nproc,code", examples("api.md"))
def test_api_examples_run(tmp_path, name, nproc, code):
    script = tmp_path / "example.py"
    script.write_text(code)
    cmd = [sys.executable, str(script)] if not nproc else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{name}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
