#!/usr/bin/env bash
# What a lent GPU machine is for, in one or two device calls of at most 10 minutes each:
#   bash benchmarks/gpu_session.sh all        build, versions and ceilings, the whole test suite beside
#                                             compute-sanitizer, the benchmarks, the 300-iteration training run,
#                                             summary.json
#   bash benchmarks/gpu_session.sh smoke      build and the CUDA tests only (well inside 5 minutes)
#   bash benchmarks/gpu_session.sh STAGE ...  any of: build info tests cuda-tests sanitizer bench-ops
#                                             bench-deform bench-step profile train train-baseline summary
# It uses the machine's own python3 and torch (no network there: nothing is installed) and builds in place.
# A failing stage does not stop the later ones; the exit code is 1 if any failed. Logs and results go to
# $RESULTS (default build/gpu-results) and are packed after every stage into ONE tarball,
# $OUT/gpu-session.tar.gz (the device tool returns at most 8 files). GPU_DEADLINE (seconds, default 530)
# bounds the whole run: every stage is cut to the time left, so the tarball is there when the call ends.
set -uo pipefail
cd "$(dirname "$0")/.."
export PY=${PYTHON:-python3}
OUT=${OUT:-build/gpu-out}
export RES=${RESULTS:-build/gpu-results}
mkdir -p "$OUT" "$RES"
rm -f "$RES"/*.rc "$RES/stages.txt"   # this run's stage records only; each stage rewrites its own files
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CSFRN_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
START=$SECONDS
DEADLINE=${GPU_DEADLINE:-530}
TRAIN_ITERS=${TRAIN_ITERS:-300}
BASELINE_ITERS=${BASELINE_ITERS:-60}

pack() {
  tar czf "$OUT/gpu-session.tar.gz.part" -C "$RES" . && mv "$OUT/gpu-session.tar.gz.part" "$OUT/gpu-session.tar.gz"
}

# stage NAME CAP FUNCTION: runs FUNCTION with a limit of CAP seconds or the time left (less a reserve for
# the stages after it), its output in $RES/NAME.log and its exit code in $RES/NAME.rc.
stage() {
  local name=$1 cap=$2 fn=$3 limit rc t0=$SECONDS
  limit=$(( DEADLINE - (SECONDS - START) - ${RESERVE:-20} ))
  (( cap < limit )) && limit=$cap
  if (( limit < 10 )); then
    echo "== $name: not run, no time left" | tee -a "$RES/stages.txt"
    echo 124 > "$RES/$name.rc"
    return
  fi
  timeout --kill-after=10 "$limit" bash -c "$fn" > "$RES/$name.log" 2>&1
  rc=$?
  echo "$rc" > "$RES/$name.rc"
  echo "== $name: exit $rc after $(( SECONDS - t0 )) s (limit $limit s)" | tee -a "$RES/stages.txt"
  if (( rc != 0 )); then tail -20 "$RES/$name.log"; fi
}

do_build() {
  $PY setup.py build_ext --inplace || exit 1
  $PY -c "import torch, csfrn.ops as ops; assert torch.cuda.is_available(), 'no GPU visible'; \
assert ops.built_with_cuda(), 'the extension was built without CUDA'; print('built with CUDA')"
}

do_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  nvcc --version | tail -2
  compute-sanitizer --version | head -2
  $PY - <<'EOF'
import datetime, json, os, platform, torch
from csfrn.bench.gpu_ceilings import ceilings
p = torch.cuda.get_device_properties(0)
info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "date": datetime.date.today().isoformat(),
        "multiprocessors": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
        **ceilings()}
print(json.dumps(info, indent=1))
json.dump(info, open(os.path.join(os.environ["RES"], "info.json"), "w"), indent=1)
EOF
}

pytest_args() {
  # Eight processes when pytest-xdist is there (the suite is mostly small CPU tests); a hung test fails alone.
  if $PY -c "import xdist" 2>/dev/null; then echo "-n 8"; fi
  if $PY -c "import pytest_timeout" 2>/dev/null; then echo "--timeout 150"; fi
}

do_tests() {
  # The host emulation of the CUDA kernels is CPU-only (CI runs it); here it would only add its build time.
  $PY -m pytest -q -rs $(pytest_args) -p no:cacheprovider --junitxml="$RES/tests.xml" \
    --ignore=tests/test_cuda_emu.py tests
}

do_cuda_tests() {
  $PY -m pytest -q -rs $(pytest_args) -p no:cacheprovider -k cuda --junitxml="$RES/cuda-tests.xml" tests
}

do_sanitizer() {
  # No caching allocator: every tensor is its own allocation, so memcheck sees a read past its end.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  local rc=0
  compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 100 $PY benchmarks/sanitize_ops.py || rc=1
  compute-sanitizer --tool racecheck --error-exitcode 9 --print-limit 100 $PY benchmarks/sanitize_ops.py --ops class \
    || rc=1
  exit $rc
}

do_bench_ops() {
  $PY benchmarks/bench_ops.py --device cuda --reps 50 --shape 8,32,97,97,19 --shape 8,32,97,97,150 \
    --json "$RES/class_ops-cuda.json"
}

do_bench_deform() {
  local rc=0
  $PY benchmarks/bench_deform_conv.py --device cuda --batch 8 --reps 20 --twin-reps 3 \
    --json "$RES/deform_conv_cuda-fp32.json" || rc=1
  $PY benchmarks/bench_deform_conv.py --device cuda --batch 8 --reps 20 --twin-reps 3 --amp bf16 \
    --json "$RES/deform_conv_cuda-bf16.json" || rc=1
  exit $rc
}

do_bench_step() {
  $PY benchmarks/bench_train_step.py --device cuda --batch 8 --size 769 --amp bf16 --reps 8 \
    --infer-size 1024x2048 --infer-batch 1 --json "$RES/train_step-cuda.json"
}

# The real run: CSFRN (DeepLabv3+, ResNet-50 deep stem, random init, bf16) on the synthetic set at the
# Cityscapes crop (769, batch 8, 19 classes), through the CLI. Checkpoints stay out of the tarball.
train_run() {   # train_run NAME ITERS [--set ...]
  local name=$1 iters=$2; shift 2
  local work="build/gpu-train/$name"
  rm -rf "$work"
  $PY -m csfrn.cli train --config configs/cityscapes/deeplabv3plus_r50_769_40k.yaml \
    --set model.pretrained=null --set data.dataset=synthetic --set data.size=1024 --set data.length=2400 \
    --set data.val_length=4 --set data.num_workers=14 --set train.iters="$iters" --set train.amp=bf16 \
    --set train.device=cuda --set train.log_interval=20 --set train.eval_interval=0 \
    --set train.checkpoint_interval="$iters" --set train.tensorboard=false --set train.progress=false \
    --set eval.mode=whole --set train.work_dir="$work" "$@"
  local rc=$?
  cp "$work/metrics.jsonl" "$RES/train-$name.jsonl" 2>/dev/null
  cp "$work"/*.json "$RES/" 2>/dev/null
  return $rc
}
do_train() { train_run csfrn "$TRAIN_ITERS"; }
do_train_baseline() { train_run baseline "$BASELINE_ITERS" --set model.csflm=false; }

do_profile() {
  $PY benchmarks/profile_gpu.py --rows 30
}

do_summary() {
  $PY benchmarks/gpu_summary.py "$RES"
}

export -f do_build do_info pytest_args do_tests do_cuda_tests do_sanitizer do_bench_ops do_bench_deform \
  do_bench_step do_profile train_run do_train do_train_baseline do_summary
export TRAIN_ITERS BASELINE_ITERS

run_one() {
  case $1 in
    build) stage build 300 do_build ;;
    info) stage info 90 do_info ;;
    tests) stage tests 300 do_tests ;;
    cuda-tests) stage cuda-tests 240 do_cuda_tests ;;
    sanitizer) stage sanitizer 240 do_sanitizer ;;
    bench-ops) stage bench-ops 120 do_bench_ops ;;
    bench-deform) stage bench-deform 180 do_bench_deform ;;
    bench-step) stage bench-step 200 do_bench_step ;;
    profile) stage profile 120 do_profile ;;
    # The CSFRN run leaves time for the baseline's short run and the summary.
    train) RESERVE=${TRAIN_RESERVE:-80} stage train 400 do_train ;;
    train-baseline) stage train-baseline 120 do_train_baseline ;;
    summary) RESERVE=-30 stage summary 30 do_summary ;;   # runs even at the deadline
    *) echo "unknown stage '$1'; stages: build info tests cuda-tests sanitizer bench-ops bench-deform bench-step" \
            "profile train train-baseline summary, or all / smoke" >&2; exit 2 ;;
  esac
  pack
}

[[ $# -gt 0 ]] || set -- all
for arg in "$@"; do
  case $arg in
    all)
      run_one build; run_one info
      # The tests and the sanitizer check correctness only: they share the machine, the timings come later.
      stage tests 300 do_tests & stage sanitizer 240 do_sanitizer & wait; pack
      for s in bench-ops bench-deform bench-step train train-baseline summary; do run_one "$s"; done ;;
    smoke) run_one build; run_one info; run_one cuda-tests; run_one summary ;;
    *) run_one "$arg" ;;
  esac
done
pack
echo "== $(( SECONDS - START )) s in all; results packed in $OUT/gpu-session.tar.gz"
cat "$RES/stages.txt"
! grep -qv "^0$" "$RES"/*.rc
