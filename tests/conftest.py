"""Shared test fixtures: where the bundled configs are, and the tiny random checkpoints most tests convert."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hetero_convert.fixtures import write_random_checkpoint

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
FIXTURES_DIR = REPO / "fixtures"
RELEASED = FIXTURES_DIR / "released"
TINY = ["tiny-every-kind", "tiny-tied", "tiny-ultra-kinds", "tiny-llama"]



def dtype_kwarg(dtype) -> dict:
    """`from_pretrained`'s dtype keyword: `dtype` since transformers 4.56, `torch_dtype` before (4.51 is
    the oldest version CI runs, and 5.x warns that `torch_dtype` is deprecated)."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


# The test-only torchrun workers (megatron_saver, streaming_worker, failing_cli) are imported by module name.
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> dict[str, Path]:
    """The four bundled tiny configs as random-weight bf16 checkpoints, sharded (several files each), written
    once per test session and never modified (tests that corrupt a checkpoint copy it first)."""
    root = tmp_path_factory.mktemp("tiny_sources")
    return {name: write_random_checkpoint(name, root / name, seed=3, max_shard_bytes=400_000) for name in TINY}


def restate_description(meg: Path, edit) -> dict:
    """Rewrite a Megatron checkpoint's description for another config, the way a careful forger would: `edit`
    changes the recorded source config.json, and the plan and every record derived from it are regenerated
    from that, so the description agrees with itself and with its source record; only the tensors can then
    contradict it. Returns the new description."""
    import json

    from hetero_convert.layout import padded_vocab_size
    from hetero_convert.plan import load_plan

    path = Path(meg) / "release" / "hetero_convert.json"
    desc = json.loads(path.read_text())
    edit(desc["source"]["source_config"])
    plan = load_plan(desc["source"]["source_config"])
    desc.update(plan=plan.to_json(), hf_block_configs=plan.hf_block_configs(),
                megatron_block_configs=plan.megatron_block_configs(),
                padded_vocab_size=padded_vocab_size(plan.vocab_size, desc["tensor_parallel"]))
    path.write_text(json.dumps(desc, indent=1))
    return desc


def cli_refuses(args, *expected: str, in_process: bool = True, env: dict | None = None, timeout: float = 300) -> str:
    """Run the CLI on a bad input and assert what a user must see: a non-zero exit, exactly one line on stderr
    (`error: ...`, containing each of `expected`), no traceback anywhere. Returns that line.

    In-process (typer's runner: fast, and an exception that escapes the command shows up as
    `result.exception`), or as a real `python -m hetero_convert.cli` process (what a shell sees)."""
    import os
    import subprocess
    import sys

    args = [str(a) for a in args]
    env = {k: v for k, v in (env or {}).items()}
    if in_process:
        from typer.testing import CliRunner

        from hetero_convert.cli import app

        r = CliRunner().invoke(app, args, env={"HETERO_CONVERT_DEBUG": None, **env})
        code, out, err = r.exit_code, r.stdout, r.stderr
        assert r.exception is None or isinstance(r.exception, SystemExit), \
            f"{type(r.exception).__name__} escaped the command: {r.exception}"
    else:
        full = {k: v for k, v in os.environ.items() if k != "HETERO_CONVERT_DEBUG"} | {"PYTHONPATH": str(REPO)} | env
        p = subprocess.run([sys.executable, "-m", "hetero_convert.cli", *args], capture_output=True, text=True,
                           env=full, timeout=timeout, stdin=subprocess.DEVNULL)
        code, out, err = p.returncode, p.stdout, p.stderr
    assert code != 0, f"exit code 0 for a bad input; stdout: {out}"
    assert "Traceback" not in out + err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line on stderr:\n{err}"
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]
