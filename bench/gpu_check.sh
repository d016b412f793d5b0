#!/usr/bin/env bash
# GPU check for issue 4: the whole guidance cost comparison on one H100/H200 in under 5 minutes.
# Writes JSON per preset into $OUT (default ./bench_out) and a log; needs torch with CUDA + diffusers.
#   OUT=/tmp/out bash bench/gpu_check.sh
set -u -o pipefail
OUT=$(realpath -m "${OUT:-bench_out}")
PY=${PYTHON:-python3}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
$PY -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
status=0
# fast == reference on CUDA (all token orders, padding, f32/bf16/f16) and the CPU suites; the Triton
# kernels (real, not interpreted) against float32 math; skipped where triton is missing
$PY -m pytest -q -x tests/test_attention_fast.py tests/test_attention_oracle.py tests/test_attention_triton.py -k "not bench" 2>&1 | tail -5 | tee "$OUT/pytest.txt" || status=1
# SD3.5 Large at 1024^2: attention call + whole forward (the issue's targets); vsf_fast uses the Triton
# kernels where usable, vsf_fast_torch is the same path with VSF_TRITON=0, timed in the same process;
# --ab-rounds adds unguided / vsf_fast / vsf_fast_torch forwards timed round-robin (the forward medians of
# single blocks drift by up to ~20% on a shared H200)
timeout 200 $PY -m lib_vsf.bench --preset sd35-large --repeats 20 --ab-rounds 4 --json "$OUT/sd35-large.json" 2>&1 | tee "$OUT/sd35-large.txt" || status=1
# other families: one attention call each
for p in flux-dev sd35-medium wan-1.3b; do
  timeout 45 $PY -m lib_vsf.bench --preset "$p" --attention-only --repeats 20 --json "$OUT/$p.json" 2>&1 | tee "$OUT/$p.txt" || status=1
done
exit $status
