#!/usr/bin/env bash
# Conversion speed on the GPU host (its cores and NVMe disk; no GPU used), issue 14:
#
#   bash benchmarks/device_convert.sh profile [profile_convert.py options]   # where the time goes (py-spy)
#   bash benchmarks/device_convert.sh table [convert.py options]             # the throughput table
#
# py-spy's wheel travels in .whl/ (ignored by git; fetched beforehand with
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl py-spy==0.4.3)
# and is installed into /tmp/site. With $OUT set, the raw profiles and convert.jsonl land there.
set -euo pipefail
export PYTHONUNBUFFERED=1
export OUT=${OUT:-/tmp/convert-out}
mkdir -p "$OUT"
if [ ! -x /tmp/site/bin/py-spy ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/py_spy-*.whl
fi
export PATH="/tmp/site/bin:$PATH" PYTHONPATH="$PWD"
echo "$(nproc) cores; $(free -g | awk '/Mem:/{print $2}') GiB; $(df -h /tmp | awk 'NR==2{print $4}') free in /tmp;" \
     "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'); $(date -u '+%Y-%m-%d %H:%M')"
what=${1:-table}
shift || true
case "$what" in
  profile) python3 benchmarks/profile_convert.py "$@" ;;
  table) python3 benchmarks/convert.py "$@" ;;
  *) echo "usage: $0 profile|table [options]" >&2; exit 2 ;;
esac
