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

# The test-only torchrun workers (megatron_saver, streaming_worker, failing_cli) are imported by module name.
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> dict[str, Path]:
    """The four bundled tiny configs as random-weight bf16 checkpoints, sharded (several files each), written
    once per test session and never modified (tests that corrupt a checkpoint copy it first)."""
    root = tmp_path_factory.mktemp("tiny_sources")
    return {name: write_random_checkpoint(name, root / name, seed=3, max_shard_bytes=400_000) for name in TINY}
