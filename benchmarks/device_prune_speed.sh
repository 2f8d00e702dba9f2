#!/usr/bin/env bash
# Prefill/decode throughput of SmolLM2-135M and its pruned variants on the GPU (docs/pruning.md).
#
# Throughput depends on the layer shapes only, not on the weight values, so the device gets the pruned
# models' config.json files (benchmarks/prune_configs/, written by benchmarks/prune_quality.py) and builds
# random-weight bf16 checkpoints of exactly those shapes; no weights need to travel.
#   bash benchmarks/device_prune_speed.sh [prune_speed.py options]
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD"
if ! python3 -c "import megatron.core" 2>/dev/null && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
W=/tmp/prune_speed; rm -rf "$W"; mkdir -p "$W"
python3 - "$W" <<'PY'
import json, sys, torch
from pathlib import Path
from hetero_convert.fixtures import write_random_checkpoint
for cfg in sorted(Path("benchmarks/prune_configs").glob("*.json")):
    write_random_checkpoint(json.loads(cfg.read_text()), Path(sys.argv[1]) / cfg.stem, dtype=torch.bfloat16,
                            max_shard_bytes=2 * 10**9)
PY
dirs=$(ls -d $W/*/ | grep -v parent)
python3 benchmarks/prune_speed.py "$W/parent" $dirs --json "${OUT:-/tmp}/prune_speed.json" "$@"
