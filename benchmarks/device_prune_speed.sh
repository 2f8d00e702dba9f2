#!/usr/bin/env bash
# Speed of `hetero-convert prune` on one GPU (docs/pruning.md), in one device call, about 6 minutes:
#
#   bash benchmarks/device_prune_speed.sh                 # prune wall time at the defaults: a SmolLM2-135M-shaped
#                                                         # parent (goal < 30 s) and an 8B Llama-layout parent
#                                                         # streamed layer by layer (goal < 10 min), then
#                                                         # --reuse-scores at another budget; prints a table
#   bash benchmarks/device_prune_speed.sh throughput [benchmarks/prune_speed.py options]
#                                                         # prefill/decode throughput of pruned SmolLM2 shapes
#
# Needs only torch, transformers, safetensors and tokenizers (on the device already); no wheels, no weights: the
# parents are synthetic (speed depends on shapes, not values). Results go to $OUT (or /tmp) as JSON.
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD"
if [ "${1:-}" = "throughput" ]; then
  shift
  # Throughput depends on the layer shapes only, so the device gets the pruned models' config.json files
  # (benchmarks/prune_configs/, written by benchmarks/prune_quality.py) and builds random-weight bf16
  # checkpoints of exactly those shapes.
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
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
df -h /tmp | tail -1
# The 8B run needs ~50 GB of disk under /tmp: parent 16 GB, fit store ~17 GB, pruned model ~13 GB.
timeout 470 python3 benchmarks/prune_timing.py --device cuda --models smollm2,llama8b --work /tmp/prune_timing \
  --json "${OUT:-/tmp}/prune_timing.json" 2>&1 | tee "${OUT:-/tmp}/prune_timing.log"
