#!/usr/bin/env bash
# Everything a lent GPU machine is for, in as few device calls as the 10-minute limit allows (DESIGN.md):
#   bash benchmarks/gpu_session.sh test    build for the card, run the whole test suite (the CUDA tests run)
#   bash benchmarks/gpu_session.sh bench   the GPU benchmarks: class-wise ops, deform conv in float32 and under
#                                          bf16 autocast, and the report (step at 769x769 bf16, plots)
#   bash benchmarks/gpu_session.sh         both (may not fit one call)
# It uses the machine's own python3 and torch (no network there: nothing is installed) and builds in place,
# so a warm machine keeps the build between calls. Logs and results go to $OUT (the device tool fetches it;
# default benchmarks/results/gpu); commit the results under benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CSFRN_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
stage=${1:-all}

build() {
  if ! $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    exit 1
  fi
  $PY - <<'EOF' | tee "$OUT/device.txt"
import torch, csfrn.ops as ops
assert torch.cuda.is_available(), "no GPU visible"
assert ops.built_with_cuda(), "the extension was built without CUDA"
print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; CUDA {torch.version.cuda}")
EOF
}

run_tests() {
  $PY -m pytest -q -rs tests 2>&1 | tee "$OUT/tests.txt" | tail -25
}

run_bench() {
  $PY benchmarks/bench_ops.py --device cuda --reps 50 --json "$OUT/class_ops-cuda.json" > "$OUT/class_ops-cuda.txt"
  $PY benchmarks/bench_deform_conv.py --device cuda --reps 20 --twin-reps 3 \
    --json "$OUT/deform_conv_cuda-fp32.json" > "$OUT/deform_conv_cuda-fp32.txt"
  $PY benchmarks/bench_deform_conv.py --device cuda --reps 20 --no-twin --amp bf16 \
    --json "$OUT/deform_conv_cuda-bf16.json" > "$OUT/deform_conv_cuda-bf16.txt"
  $PY benchmarks/report.py --device cuda --amp bf16 --reps 10 --out "$OUT" > "$OUT/report.txt" 2>&1
  tail -8 "$OUT/class_ops-cuda.txt"
  for f in "$OUT"/deform_conv_cuda-*.txt; do sed -n '1,12p' "$f"; done
  grep -E "^\(b\)/\(a\)|extra time|\(d\)/\(b\)" "$OUT"/*.md || true
}

case $stage in
  test) build; run_tests ;;
  bench) build; run_bench ;;
  all) build; run_tests; run_bench ;;
  *) echo "usage: $0 [test|bench|all]" >&2; exit 2 ;;
esac
