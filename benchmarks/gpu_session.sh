#!/usr/bin/env bash
# The one command a lent GPU machine runs (one device call, time limit 560 s):
#     CSFRN_GPU_COMMIT=<sha> bash benchmarks/gpu_session.sh
# and its proof on the CPU (every stage, tiny shapes, CPU device, the CUDA emulation where a stage needs CUDA
# kernels, the sanitizer skipped with a note; a few minutes; CSFRN_GPU_DRY=fast is the test suite's core of it):
#     CSFRN_GPU_DRY=1 bash benchmarks/gpu_session.sh
#
# One plan, its stages in priority order. Each stage has its own budget (its time limit) and starts only if the
# time left before the deadline, less the summary's budget, covers its budget; a stage that does not fit is
# recorded as "not run" and the plan goes on (the summary always runs). As soon as a stage ends, everything
# under $RESULTS is packed into ONE tarball, $OUT/gpu-session.tar.gz (written aside and renamed, so the file
# there is always whole), so a stage cut later, or the whole call killed, loses nothing already done; the
# training stage repacks every 15 s while it runs, its metrics streaming into the results.
#
#   stage    budget  what                                                   the last GPU run (H100, 2026-11-26;
#                                                                           its logs, benchmarks/results/gpu/)
#   build     170 s  setup.py build_ext, sm_90 (TORCH_CUDA_ARCH_LIST=9.0),   ~150 s
#                    ccache if present; checks the .so has CUDA and sm_90   (every later stage needs it)
#                    (an extension built ahead with benchmarks/gpu_prebuilt.py and carried is used when its
#                    stamp matches: seconds; what the build leaves of its budget goes to check)
#   info       15 s  versions (driver, nvcc, compute-sanitizer, torch) and    ceilings: 1 GiB copy + 3 x 8192^3
#                    the measured ceilings (copy GB/s, matmul TFLOP/s)      matmuls, a few s after CUDA init
#   check     110 s  the CUDA tests only (pytest -m cuda, never the          whole suite (352 tests, -n 8):
#                    emulation) beside compute-sanitizer memcheck,          28.8 s; the sanitizer's time was not
#                    racecheck and initcheck over benchmarks/sanitize_ops.py  logged (its cap was 240 s): this
#                    (every op, fwd + bwd, every dtype, every launch plan),  run's stages.jsonl gives it
#                    all four in parallel, each cut 5 s inside the budget
#   deform     45 s  csfrn bench --what deform, float32 and bf16 (dual op     its rows' medians x 20 reps + 3
#                    included; 10 reps, 2 twin reps), then                  twin reps: ~12 s per dtype; here 10 + 2
#                    benchmarks/gpu_determinism.py (bitwise-equal grads)
#   step       70 s  csfrn bench --what train, eager: first the baseline     4 variants, 8 reps + inference:
#                    and CSFRN, NCHW and channels_last, and torchvision's    ~25 s by its medians (here 5 in the
#                    deeplabv3_resnet50 in channels_last (kept if the rest   first run, 5 + inference in the
#                    is cut), then the reference twins, torchvision's        second: that one may be cut)
#                    deform calls, the peer in NCHW, inference
#   train      70 s  csfrn train: CSFRN, 769 crops, batch 8, bf16,           2.57 it/s after a 5 s warm-up:
#                    100 iterations, metrics every 10                        100 it ~ 45 s + start-up
#   profile    30 s  benchmarks/profile_gpu.py: torch.profiler tables of     3 + 2 profiled calls after
#                    the deform call, the losses' upsampling (F.interpolate   warm-ups: ~15 s (the upsampling's
#                    and "gemm") and the CSFRN step                          2 x 3 calls add ~1 s)
#   compile  >=90 s  the step benchmark again, torch.compile'd, in the       never run on a GPU (a compile of
#                    device's default layout (channels_last on CUDA):       a training step: a minute or so)
#                    CSFRN, then the baseline, one run each; its limit is
#                    all the time left, and it starts only if 90 s are left
#   summary    10 s  benchmarks/gpu_summary.py: summary.json, summary.md     < 5 s
#   total     520 s  without compile, which has only what the stages above leave (deadline 530 s:
#                    GPU_DEADLINE; the device call's limit 560 s leaves the start and the packing)
# CSFRN_GPU_BUDGETS="stage=seconds ..." overrides budgets. The sanitizer's figure and the start-up times are
# unmeasured: this run's stages.jsonl records every stage's seconds, to size the next plan by.
#
# Results: $RESULTS (default build/gpu-results, emptied first): session.json (commit, mode, budgets),
# stages.jsonl (per stage: status ok / failed / cut / not run, exit code, seconds, budget), STAGE.log per stage,
# the JSON each benchmark writes, train-csfrn/metrics.jsonl, profile.log, summary.json (every figure the GPU
# issue asks for; a figure the code cannot make yet is null, with the reason in its "notes"), summary.md.
# `python benchmarks/gpu_summary.py DIR` rebuilds the summary from an unpacked tarball.
# It uses the machine's own python3 (PYTHON overrides) and torch; nothing is installed. Exit code 0 when every
# stage ended with 0, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PY=${PYTHON:-python3}
export DRY=${CSFRN_GPU_DRY:-0}          # 0: the GPU plan; 1: the dry run on the CPU; fast: its quickest form
case $DRY in 0|1|fast) ;; *) echo "gpu_session.sh: CSFRN_GPU_DRY must be 0, 1 or fast, not '$DRY'" >&2; exit 2 ;; esac
OUT=${OUT:-build/gpu-out}
export RES=${RESULTS:-build/gpu-results}
# This run's results only: a previous run's folder (it has session.json) is emptied; any other is refused.
if [[ -d $RES && -n $(ls -A "$RES") && ! -f $RES/session.json ]]; then
  echo "gpu_session.sh: RESULTS=$RES is not empty and holds no earlier session's results; choose another" >&2
  exit 2
fi
mkdir -p "$OUT" && rm -rf "$RES" && mkdir -p "$RES" || exit 2
RES=$(cd "$RES" && pwd) OUT=$(cd "$OUT" && pwd)
TARBALL=$OUT/gpu-session.tar.gz
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}

# Budgets (seconds): the GPU plan's (sum 520 without compile's least, see the header) and the dry run's.
declare -A BUDGET
if [[ $DRY == 0 ]]; then
  BUDGET=([build]=170 [info]=15 [check]=110 [deform]=45 [step]=70 [train]=70 [profile]=30 [compile]=90
          [summary]=10)
  DEADLINE=${GPU_DEADLINE:-530}
else
  # Caps with room for a slow, shared CPU (the fast form needs about a minute of CPU time in all).
  BUDGET=([build]=60 [info]=60 [check]=300 [deform]=180 [step]=180 [train]=180 [profile]=120 [compile]=60
          [summary]=30)
  DEADLINE=${GPU_DEADLINE:-1120}
fi
STAGES=(build info check deform step train profile compile summary)
# Stages whose time limit is all the time left (their budget is the least they start with).
TAKES_THE_REST=" compile "
# CSFRN_GPU_BUDGETS="stage=seconds ..." overrides budgets (to retune on the machine, or to test a cut stage).
for kv in ${CSFRN_GPU_BUDGETS:-}; do
  [[ $kv =~ ^([a-z]+)=([0-9]+)$ && -n ${BUDGET[${BASH_REMATCH[1]}]:-} ]] \
    || { echo "gpu_session.sh: CSFRN_GPU_BUDGETS: '$kv' is not STAGE=SECONDS with STAGE one of ${STAGES[*]}" >&2; exit 2; }
  BUDGET[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
done
START=$SECONDS

dry() { [[ $DRY != 0 ]]; }
export -f dry

commit() {
  local sha
  if sha=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null); then
    [[ -z $(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]] || sha="$sha-dirty"
    echo "$sha"
  else
    echo "${CSFRN_GPU_COMMIT:-}"    # the device machine gets the working tree without .git
  fi
}

session_json() {
  local budgets="" s
  for s in "${STAGES[@]}"; do budgets+="${budgets:+, }\"$s\": ${BUDGET[$s]}"; done
  printf '{"commit": "%s", "dry": "%s", "started": "%s", "deadline_s": %d, "budgets_s": {%s}}\n' \
    "$(commit)" "$DRY" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$DEADLINE" "$budgets" > "$RES/session.json"
}

# Everything under $RES but checkpoints and TensorBoard files, into one tarball, written aside and renamed.
pack() {
  local part="$TARBALL.part-$BASHPID"
  tar czf "$part" --exclude='*.pth' --exclude='tb' -C "$RES" . 2>/dev/null && mv -f "$part" "$TARBALL"
  rm -f "$part"
}

record() {   # record NAME STATUS RC SECONDS BUDGET LEFT
  printf '{"stage": "%s", "status": "%s", "rc": %s, "seconds": %d, "budget": %d, "left_at_start": %d}\n' \
    "$@" >> "$RES/stages.jsonl"
  printf '== %-8s %-8s exit %-4s %4d s of %4d s (%d s were left)\n' "$@"
}

# stage NAME: runs do_NAME under its budget if the time left covers it; output in $RES/NAME.log.
stage() {
  local name=$1 budget=${BUDGET[$1]} t0=$SECONDS left rc status
  left=$(( DEADLINE - (SECONDS - START) ))
  [[ $name == summary ]] || left=$(( left - BUDGET[summary] ))
  if (( left < budget )); then
    record "$name" "not run" null 0 "$budget" "$left"
    pack
    return
  fi
  [[ $TAKES_THE_REST == *" $name "* ]] && budget=$left
  timeout --kill-after=5 "$budget" bash -c "do_$name" > "$RES/$name.log" 2>&1
  rc=$?
  # What a build that ends early (a prebuilt extension) leaves of its budget goes to the sanitizer (check).
  if [[ $name == build && $rc == 0 ]]; then
    BUDGET[check]=$(( BUDGET[check] + budget - (SECONDS - t0) )); export BUDGET_CHECK=${BUDGET[check]}
  fi
  case $rc in 0) status=ok ;; 124|137) status=cut ;; *) status=failed ;; esac
  record "$name" "$status" "$rc" $(( SECONDS - t0 )) "$budget" "$left"
  if (( rc != 0 )); then tail -15 "$RES/$name.log"; fi
  pack
}

# ---------------------------------------------------------------- interfaces
# The only calls into the benchmarks other work changes (csfrn/bench/deform.py: `csfrn bench --what deform`,
# csfrn/bench/train_step.py: `csfrn bench --what train`); benchmarks/gpu_summary.py reads their JSON in one
# place too ("interfaces" there); benchmarks/profile_gpu.py's csfrn_step() is the third (train_step.make_batch,
# build, train_step_fn).
CSFRN="$PY -m csfrn.cli"
# benchmarks/bench_*.py run the same main() as `csfrn bench --what deform|train`, without the CLI's imports.
DEFORM_BENCH="$PY benchmarks/bench_deform_conv.py" STEP_BENCH="$PY benchmarks/bench_train_step.py"
deform_benches() {   # deform_benches FP32_JSON BF16_JSON: float32, then under bf16 autocast
  if [[ $DRY == fast ]]; then   # one process: torchvision's import once
    $PY - "$@" <<'PYEOF'
import sys
from csfrn.bench.deform import main
for amp, path in (("none", sys.argv[1]), ("bf16", sys.argv[2])):
    main(["--device", "cpu", "--quick", "--reps", "1", "--no-twin", "--amp", amp, "--json", path])
PYEOF
  elif dry; then
    $DEFORM_BENCH --device cpu --quick --reps 1 --twin-reps 1 --amp none --json "$1" &&
      $DEFORM_BENCH --device cpu --quick --reps 1 --twin-reps 1 --amp bf16 --json "$2"
  else
    $DEFORM_BENCH --device cuda --batch 8 --reps 10 --twin-reps 2 --amp none --json "$1" &&
      $DEFORM_BENCH --device cuda --batch 8 --reps 10 --twin-reps 2 --amp bf16 --json "$2"
  fi
}
step_bench() {   # step_bench JSON ARGS...: the step benchmark at the plan's shape (the baseline and CSFRN always run)
  local json=$1; shift
  if dry; then $STEP_BENCH --device cpu --quick --batch 2 --reps 1 --threads 1 --json "$json" "$@"
  else $STEP_BENCH --device cuda --batch 8 --size 769 --amp bf16 --reps 8 --json "$json" "$@"; fi
}
# The layout csfrn train uses by default there (train.channels_last: true on CUDA, false on the CPU).
default_layout() { dry && echo "" || echo "-cl"; }
other_layout() { dry && echo "-cl" || echo ""; }
step_bench_core() {      # the eager steps the targets compare: ours (NCHW, channels_last), torchvision's model
  step_bench "$1" --variants baseline csfrn baseline-cl csfrn-cl "tv-deeplabv3$(default_layout)" --no-inference
}
step_bench_kernels() {   # what our kernels save (the reference twins, torchvision's deform calls), the peer in
  # the other layout, and inference
  if dry; then step_bench "$1" --variants reference torchvision "tv-deeplabv3$(other_layout)"
  else step_bench "$1" --variants reference torchvision "tv-deeplabv3$(other_layout)" --infer-size 1024x2048 \
         --infer-batch 1; fi
}
export -f deform_benches step_bench step_bench_core step_bench_kernels default_layout other_layout
export CSFRN DEFORM_BENCH STEP_BENCH

# ---------------------------------------------------------------- the stages
ccache_wrappers() {
  # ccache (when the machine has it) under the compilers' names, ahead on PATH, and in front of nvcc; kept
  # only if a one-line compile goes through it.
  local cc dir=$ROOT/build/ccache-bin
  cc=$(command -v ccache) || { echo "ccache: not present, compiling without it"; return; }
  mkdir -p "$dir" && for c in c++ g++ gcc cc; do ln -sf "$cc" "$dir/$c"; done
  if echo 'int main() { return 0; }' | PATH="$dir:$PATH" c++ -x c++ - -o "$dir/probe" 2>/dev/null; then
    export PATH="$dir:$PATH" PYTORCH_NVCC="$cc ${CUDA_HOME:+$CUDA_HOME/bin/}nvcc"
    echo "ccache: $cc (PATH wrappers in $dir; PYTORCH_NVCC=$PYTORCH_NVCC)"
  else
    echo "ccache: $cc does not compile here, compiling without it"
  fi
}
do_build() {
  ccache_wrappers
  if dry; then
    echo "dry run: the GPU plan would run: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST CSFRN_FORCE_CUDA=1" \
         "MAX_JOBS=$MAX_JOBS $PY setup.py build_ext --inplace; here the extension already built is used"
    $PY -c "import csfrn.ops as ops; print('extension loaded; built with CUDA:', ops.built_with_cuda())"
    $PY benchmarks/gpu_prebuilt.py check || true   # its answer only: a CPU build never passes it
    return
  fi
  # An extension built ahead (benchmarks/gpu_prebuilt.py build, carried by the device call) is used when its
  # stamp matches this tree, torch and Python and it loads; otherwise it is built here.
  if $PY benchmarks/gpu_prebuilt.py check; then echo "build skipped: the prebuilt extension is used"
  else CSFRN_FORCE_CUDA=1 $PY setup.py build_ext --inplace || exit 1; fi
  $PY -c "import torch, csfrn.ops as ops; assert torch.cuda.is_available(), 'no GPU visible'; \
assert ops.built_with_cuda(), 'the extension was built without CUDA'; print('built with CUDA')" || exit 1
  if command -v cuobjdump >/dev/null; then
    cuobjdump --list-elf csfrn/_C*.so | grep -q sm_90 && echo "sm_90 machine code: yes" \
      || { echo "sm_90 machine code: NOT FOUND in csfrn/_C*.so"; exit 1; }
  fi
}

do_info() {
  if dry; then
    $PY benchmarks/gpu_info.py --device cpu --json "$RES/info.json"
  else
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    $PY benchmarks/gpu_info.py --device cuda --json "$RES/info.json"
  fi
}

pytest_args() {
  # Eight processes when pytest-xdist is there; a hung test fails alone.
  if ! dry && $PY -c "import xdist" 2>/dev/null; then echo "-n 8"; else echo "-p no:xdist"; fi
  if $PY -c "import pytest_timeout" 2>/dev/null; then echo "--timeout 90"; fi
}
# The CUDA tests: the `cuda` marker (tests/conftest.py), and never the host emulation's file. A module that
# cannot be imported there (a library the machine's image lacks) is an error of its own, not the end of the run.
cuda_tests() {
  $PY -m pytest -q -rs -p no:cacheprovider $(pytest_args) -m cuda --ignore=tests/test_cuda_emu.py \
    --continue-on-collection-errors --junitxml="$RES/cuda-tests.xml" tests
}
do_check() {
  local limit=$(( BUDGET_CHECK - 5 )) pids=() names=() i rc=0
  run_bg() {   # run_bg NAME COMMAND...: in the background, cut 5 s inside the stage, output in $RES/NAME.log
    local name=$1; shift
    timeout --kill-after=3 "$limit" "$@" > "$RES/$name.log" 2>&1 &
    pids+=($!) names+=("$name")
  }
  run_bg cuda-tests bash -c cuda_tests
  if dry; then
    echo "dry run: compute-sanitizer skipped (no GPU); sanitize_ops.py runs its cases on the CPU kernels" \
      | tee "$RES/sanitizer-skipped.txt"
    run_bg sanitize-cpu $PY benchmarks/sanitize_ops.py --device cpu $([[ $DRY == fast ]] && echo --quick)
    if [[ $DRY == 1 ]]; then   # the CUDA kernels' launch plans, on the host emulation (built on first use)
      # in a folder of its own, whose lock a cut build of an earlier run may have left behind
      export CSFRN_EMU_BUILD_DIR=$ROOT/build/gpu-dry-emu
      rm -f "$CSFRN_EMU_BUILD_DIR/lock"
      run_bg emu-tests $PY -m pytest -q -rs -p no:cacheprovider -p no:xdist --junitxml="$RES/emu-tests.xml" \
        -k "plans or every_op" tests/test_cuda_emu.py
    fi
  else
    # No caching allocator: every tensor is its own allocation, so memcheck sees a read past its end and
    # initcheck a read of memory nothing wrote.
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    for tool in memcheck racecheck initcheck; do
      run_bg "sanitizer-$tool" compute-sanitizer --tool "$tool" \
        --error-exitcode 9 --print-limit 100 $PY benchmarks/sanitize_ops.py
    done
  fi
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; local r=$?
    echo "${names[$i]}: exit $r"
    (( r == 0 )) || rc=1
  done
  exit $rc
}

do_deform() {
  local rc=0
  deform_benches "$RES/deform_conv-fp32.json" "$RES/deform_conv-bf16.json" || rc=1
  if dry; then $PY benchmarks/gpu_determinism.py --device cpu --quick --json "$RES/deform_determinism.json" || rc=1
  else $PY benchmarks/gpu_determinism.py --device cuda --json "$RES/deform_determinism.json" || rc=1; fi
  exit $rc
}

do_step() {
  # The core figures first, so they survive if the second run is cut.
  step_bench_core "$RES/train_step-core.json" || exit 1
  if [[ $DRY == fast ]]; then echo "fast dry run: the other variants skipped"; return; fi
  step_bench_kernels "$RES/train_step-kernels.json"
}

# torch.compile'd steps in the device's default layout, one run per model (a cut one loses only itself).
do_compile() {
  if [[ $DRY == fast ]]; then echo "fast dry run: the compiled steps skipped"; return; fi
  local model rc=0
  for model in csfrn baseline; do
    step_bench "$RES/train_step-compiled-$model.json" --variants "$model$(default_layout)-compiled" \
      --no-inference || rc=1
  done
  exit $rc
}

# CSFRN (DeepLabv3+, ResNet-50 deep stem, random init) on the synthetic set at the Cityscapes crop, through
# the CLI, its work_dir inside the results so metrics.jsonl streams into them (checkpoints stay out of the tarball).
do_train() {
  local common=(--config cityscapes/deeplabv3plus_r50_769_40k --set model.pretrained=null
    --set data.dataset=synthetic --set train.eval_interval=0 --set train.tensorboard=false
    --set train.progress=false --set eval.mode=whole --set train.work_dir="$RES/train-csfrn")
  if dry; then
    local iters=$([[ $DRY == fast ]] && echo 4 || echo 20)
    $CSFRN train "${common[@]}" --set model.width=8 --set "model.blocks=[1,1,1,1]" --set model.channels=16 \
      --set model.aux_channels=8 --set model.embed_dim=8 --set data.size=40 --set "data.crop_size=[33,33]" \
      --set data.length=16 --set data.val_length=2 --set data.num_workers=0 --set data.batch_size=2 \
      --set train.iters=$iters --set train.amp=none --set train.device=cpu --set train.log_interval=2 \
      --set train.checkpoint_interval=$iters
  else
    $CSFRN train "${common[@]}" --set data.size=1024 --set data.length=2400 --set data.val_length=4 \
      --set data.num_workers=14 --set data.batch_size=8 --set "data.crop_size=[769,769]" --set train.iters=100 \
      --set train.amp=bf16 --set train.device=cuda --set train.log_interval=10 --set train.checkpoint_interval=100
  fi
}

do_profile() {
  if dry; then $PY benchmarks/profile_gpu.py --device cpu --quick --rows 15 > "$RES/profile.log"
  else $PY benchmarks/profile_gpu.py --device cuda --rows 30 > "$RES/profile.log"; fi
  local rc=$?
  tail -40 "$RES/profile.log"
  exit $rc
}

do_summary() {
  $PY benchmarks/gpu_summary.py "$RES"
}

export -f ccache_wrappers do_build do_info pytest_args cuda_tests do_check do_deform do_step do_train \
  do_profile do_compile do_summary
export ROOT BUDGET_CHECK=${BUDGET[check]}

# ---------------------------------------------------------------- the plan
# One compound command: bash reads it whole before running it, so editing this file mid-run is safe.
{
  session_json
  echo "== gpu_session: mode ${DRY/0/gpu}, deadline $DEADLINE s, results in $RES, tarball $TARBALL"
  for s in "${STAGES[@]}"; do
    if [[ $s == train ]]; then   # repack while it runs: its metrics stream into the results
      # (its sleep is ended with it, and holds no one's stdout open)
      ( trap 'kill $nap 2>/dev/null; exit 0' TERM; while :; do sleep 15 & nap=$!; wait $nap; pack; done ) \
        > /dev/null 2>&1 &
      packer=$!
      stage train
      kill "$packer" 2>/dev/null; wait "$packer" 2>/dev/null
      pack
    else
      stage "$s"
    fi
  done
  rm -f "$TARBALL".part-*
  echo "== $(( SECONDS - START )) s in all; results packed in $TARBALL"
  ! grep -qv '"status": "ok"' "$RES/stages.jsonl"
  exit
}
