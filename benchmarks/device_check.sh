#!/usr/bin/env bash
# Issue 10's quiet-machine figures in one run on a lent GPU machine (see device_check.py for the steps).
#   OUT=/tmp/x bash benchmarks/device_check.sh --tiny     # dry run on tiny shapes, CPU only
# Writes $OUT/results.json and $OUT/device_check.log; stops itself within 7 minutes (LIMIT=seconds to change:
# pass a matching --budget).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
{
  echo "== $(date -u) $(uname -srm); $(nproc) cpus; load $(cut -d' ' -f1-3 /proc/loadavg)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  timeout -k 10 "${LIMIT:-410}" "$PY" benchmarks/device_check.py --out "$OUT" "$@"
  echo "== exit $? at $(date -u)"
} 2>&1 | tee "$OUT/device_check.log"
