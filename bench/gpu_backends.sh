#!/usr/bin/env bash
# Guidance cost per attention library on one GPU: `python -m lib_vsf.bench --backend B` for sdpa, flash,
# xformers and sage (unguided, CFG and VSF fast, attention call and whole forward, all on B). A library
# that is not installed exits 2 and is listed as unavailable, not as a failure.
#   OUT=/tmp/out PRESET=sd35-large bash bench/gpu_backends.sh
set -u
OUT=$(realpath -m "${OUT:-bench_out}")
PY=${PYTHON:-python3}
PRESET=${PRESET:-sd35-large}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
status=0
$PY -m pytest -q tests/test_attention_backends.py 2>&1 | tail -3 | tee "$OUT/pytest_backends.txt"
for b in sdpa flash xformers sage; do
  timeout 240 $PY -m lib_vsf.bench --preset "$PRESET" --backend "$b" --repeats 20 --json "$OUT/backend_$b.json" \
    >"$OUT/backend_$b.txt" 2>&1
  rc=$?
  tail -25 "$OUT/backend_$b.txt"
  if [ $rc -eq 2 ]; then echo "backend $b: unavailable"; elif [ $rc -ne 0 ]; then echo "backend $b: failed ($rc)"; status=1; fi
done
exit $status
