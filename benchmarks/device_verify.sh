#!/usr/bin/env bash
# `verify` at real size on the GPU machine, in one call (docs/parity.md, "At size"):
#
#   bash benchmarks/device_verify.sh [benchmarks/verify_at_size.py options]
#
# Uses one GPU, and two when present (TP=2 and PP=2 layouts). Prints its tables; with $OUT set, writes
# $OUT/verify_at_size.json and $OUT/verify_at_size.md after every stage, and skips (and lists) a stage that would
# not end within --limit seconds (560).
# The device has torch and transformers but not megatron-core: its cp312 wheel travels in .whl/ (ignored by
# git), fetched here beforehand with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl megatron-core==0.19.2
set -euo pipefail
# NVLink multicast stays off on shared multi-GPU hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
wheel=$(ls .whl/megatron_core-*.whl | sort -V | tail -1)
want=$(basename "$wheel" | cut -d- -f2)
have=$(PYTHONPATH=/tmp/site python3 -c "import megatron.core as m; print(m.__version__)" 2>/dev/null || true)
if [ "$have" != "$want" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel"
fi
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/verify_at_size.py --device cuda --out "${OUT:-/tmp/verify-out}" "$@"
