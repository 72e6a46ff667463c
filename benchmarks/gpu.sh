#!/usr/bin/env bash
# GPU figures for e2kd in one go (designed for about 5 minutes on one recent NVIDIA GPU, no network).
#
#   bash benchmarks/gpu.sh            # on a machine with an NVIDIA GPU; figures go to $OUT (or ./gpu-figures)
#   EXTRA=1 bash benchmarks/gpu.sh    # also the diagnostics marked (extra) below
#   bash benchmarks/gpu.sh --dry-run  # everything, extras included, on the CPU with tiny models and sizes (a smoke test)
#   ONLY=step_compiled,trainer bash benchmarks/gpu.sh   # only the runs whose names start so
#
# 0. The GPU paths against the CPU (tests/test_cuda.py: data kept and augmented on the device, frozen batches,
#    the trainer in bf16 and fp16, compiled KD; skipped where there is no CUDA device).
# 1. Step benchmark (python -m benchmarks.step) at 224 px, batch 128, bf16 autocast, channels-last:
#    KD, live e2KD, frozen e2KD, lam=0 and explain_every=4 for ResNet-34 -> ResNet-18 (GradCAM),
#    B-cos ResNet-34 -> B-cos ResNet-18 and B-cos DenseNet-169 -> B-cos ResNet-18; with each step's counted FLOPs
#    and the rate reached against the GPU's large bf16 matrix-product rate (--flops).
#    The B-cos pair side by side with the same steps on the B-cos v2 authors' layers (python -m benchmarks.bcos_v2,
#    same weights; needs the bcos package of the [test] extra).
#    (extra) The B-cos operations check (python -m benchmarks.bcos_conv: previous, native, cheap, unpruned,
#    first_order, cast_each_call and default) and the top operators of the B-cos steps (python -m benchmarks.op_profile).
# 2. Throughput of a short real distillation loop (python -m benchmarks.throughput, 50 steps on
#    synthetic 224 px images, data loading included) for the B-cos pair, KD and e2KD.
# 3. KD and e2KD for the B-cos pair with torch.compile of the student (inductor): e2KD, which compiled
#    graphs cannot differentiate twice, runs eager and the table says so ("compiled" marks the ones that compiled).
# 4. The trainer itself (benchmarks/gpu_trainer.yaml: B-cos ResNet-34 -> B-cos ResNet-18, synthetic 224 px
#    images, batch 128, as in 1.): a teacher, KD, e2KD launched by torchrun (one process on one GPU: no
#    process group, so nccl itself is not exercised; it needs two GPUs), a frozen store and a frozen e2KD
#    run, (extra) KD with compile=true; then one table of the runs (python -m benchmarks.runs: step time,
#    images/s, data time, accuracy, agreement). Run folders go to RUNS (default $OUT/runs).
#
# Each run is cut at RUN_LIMIT seconds (GPU default 150) and a failed run is recorded; the rest still runs.
# Environment: PYTHON (default: the repository's .venv if present, else python3), OUT (output folder).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ $# -gt 0 ]]; then echo "usage: bash benchmarks/gpu.sh [--dry-run]" >&2; exit 2; fi

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${OUT:-$PWD/gpu-figures}"
RUNS="${RUNS:-$OUT/runs}"
if [[ -e "$RUNS" ]]; then  # the trainer would resume runs found there instead of timing fresh ones
  echo "gpu.sh: $RUNS exists; remove it or set OUT (or RUNS) to a new folder" >&2
  exit 2
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [[ $DRY -eq 1 ]]; then
  DEV=(--device cpu --threads 1)
  SIZE=(--size 32 --batch 2 --classes 4)
  STEPS=(--steps 1 --warmup 0)
  TPUT_STEPS=(--steps 2 --warmup 1 --workers 0)
  FAST="--amp bf16"  # bf16 autocast also runs on the CPU; channels-last and compile are GPU options here
  GC=(--teacher resnet8_small --student resnet8_small)
  BC=(--teacher bcos_resnet8_small --student bcos_resnet8_small)
  DN=(--teacher bcos_resnet8_small --student bcos_resnet8_small)
  COMPILE=""
  RUN_LIMIT=300
  TRAIN=(device=cpu data.image_size=32 data.kwargs.num_samples=64 data.eval_kwargs.num_samples=32
         model.name=bcos_resnet8_small optim.batch_size=16 num_workers=0)
  TEACHER=bcos_resnet18_small  # not the student: the distillation reads it from the teacher run
else
  if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: torch sees no CUDA device; run with --dry-run for the CPU smoke test" >&2
    exit 1
  fi
  DEV=(--device cuda --threads 4)
  SIZE=(--size 224 --batch 128 --classes 1000)
  STEPS=(--steps 8 --warmup 2)
  TPUT_STEPS=(--steps 50 --warmup 5 --workers 4)
  FAST="--amp bf16 --channels-last"
  GC=()
  BC=()
  DN=()
  COMPILE="--compile"
  RUN_LIMIT=${RUN_LIMIT:-150}  # seconds per benchmark, so that one stuck run cannot take the whole budget
  TRAIN=(device=cuda)
  TEACHER=bcos_resnet34
fi
EXTRA=${EXTRA:-$DRY}  # the diagnostics (bcos_conv, profile_bcos, trainer_kd_compiled): EXTRA=1, and in the dry run

{
  echo "# e2kd GPU figures, $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  [[ -n "${ONLY:-}" ]] && echo "# only the runs starting with: $ONLY"
  "$PYTHON" -c 'import torch; print("# torch", torch.__version__, "| device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/# nvidia-smi: /' || true
} | tee "$OUT/summary.md"

wanted() {  # whether a run's name starts with one of the comma-separated prefixes in ONLY (default: all)
  [[ -z "${ONLY:-}" ]] && return 0
  local p
  IFS=, read -ra prefixes <<<"$ONLY"
  for p in "${prefixes[@]}"; do [[ -n "$p" && "$1" == "$p"* ]] && return 0; done
  return 1
}

run() {  # run a command, copy its output to the summary; a failure is recorded, the rest still runs
  local name=$1; shift  # each run is cut at RUN_LIMIT seconds
  wanted "$name" || return 0
  echo "" | tee -a "$OUT/summary.md"
  echo "## $name" | tee -a "$OUT/summary.md"
  echo "    $*" | tee -a "$OUT/summary.md"
  local start=$SECONDS
  if ! timeout "$RUN_LIMIT" "$@" 2>"$OUT/$name.stderr" | tee -a "$OUT/summary.md"; then
    echo "FAILED ($name): see $name.stderr" | tee -a "$OUT/summary.md"
    tail -n 20 "$OUT/$name.stderr" | sed 's/^/    /' | tee -a "$OUT/summary.md"
  fi
  echo "(took $((SECONDS - start)) s)" | tee -a "$OUT/summary.md"
}

run cuda_tests "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py
# shellcheck disable=SC2086
run step_gradcam "$PYTHON" -m benchmarks.step --pair gradcam "${GC[@]}" "${DEV[@]}" "${SIZE[@]}" "${STEPS[@]}" $FAST --flops --json "$OUT/step_gradcam.json"
# shellcheck disable=SC2086
run step_bcos "$PYTHON" -m benchmarks.step --pair bcos "${BC[@]}" "${DEV[@]}" "${SIZE[@]}" "${STEPS[@]}" $FAST --flops --json "$OUT/step_bcos.json"
# shellcheck disable=SC2086
run step_bcos_densenet "$PYTHON" -m benchmarks.step --pair bcos_densenet "${DN[@]}" --variants kd,e2kd,frozen "${DEV[@]}" "${SIZE[@]}" "${STEPS[@]}" $FAST --flops --json "$OUT/step_bcos_densenet.json"
# shellcheck disable=SC2086
run bcos_v2 "$PYTHON" -m benchmarks.bcos_v2 "${DEV[@]}" "${SIZE[@]}" "${STEPS[@]}" $FAST
if [[ "$EXTRA" == 1 ]]; then
# shellcheck disable=SC2086
run bcos_conv "$PYTHON" -m benchmarks.bcos_conv "${BC[@]}" "${DEV[@]}" "${SIZE[@]}" --steps "${STEPS[1]}" $FAST
# shellcheck disable=SC2086
run profile_bcos "$PYTHON" -m benchmarks.op_profile --pair bcos "${BC[@]}" --variants kd,e2kd,frozen "${DEV[@]}" "${SIZE[@]}" --steps 2 --warmup 1 --top 12 $FAST
fi
for lam in 0 1; do
  # shellcheck disable=SC2086
  run "throughput_bcos_lam$lam" "$PYTHON" -m benchmarks.throughput "${BC[@]}" --explainer bcos --lam "$lam" "${DEV[@]}" "${SIZE[@]}" "${TPUT_STEPS[@]}" $FAST --json "$OUT/throughput_bcos_lam$lam.json"
done

if [[ -n "$COMPILE" ]]; then
  # shellcheck disable=SC2086
  run step_compiled "$PYTHON" -m benchmarks.step --pair bcos --variants kd,e2kd "${DEV[@]}" "${SIZE[@]}" "${STEPS[@]}" $FAST $COMPILE --json "$OUT/step_compiled.json"
fi
CFG=benchmarks/gpu_trainer.yaml
TR=("${TRAIN[@]}" output_dir="$RUNS")
run trainer_teacher "$PYTHON" -m e2kd train-teacher "$CFG" "${TR[@]}" name=teacher model.name="$TEACHER" optim.epochs=3
run trainer_kd "$PYTHON" -m e2kd distill "$CFG" "${TR[@]}" name=kd distill.lam=0 teacher.checkpoint="$RUNS/teacher"
run trainer_e2kd_torchrun "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 -m e2kd distill "$CFG" "${TR[@]}" name=e2kd teacher.checkpoint="$RUNS/teacher"
run trainer_freeze "$PYTHON" -m e2kd freeze "$CFG" "${TR[@]}" teacher.checkpoint="$RUNS/teacher" --out "$RUNS/store"
run trainer_frozen "$PYTHON" -m e2kd distill "$CFG" "${TR[@]}" name=e2kd-frozen teacher.frozen="$RUNS/store" teacher.checkpoint="$RUNS/teacher"
trained=("$RUNS/teacher" "$RUNS/kd" "$RUNS/e2kd" "$RUNS/e2kd-frozen")
if [[ -n "$COMPILE" && "$EXTRA" == 1 ]]; then
  run trainer_kd_compiled "$PYTHON" -m e2kd distill "$CFG" "${TR[@]}" name=kd-compiled distill.lam=0 compile=true teacher.checkpoint="$RUNS/teacher"
  trained+=("$RUNS/kd-compiled")
fi
existing=()
for r in "${trained[@]}"; do [[ -f "$r/results.json" ]] && existing+=("$r"); done
if [[ ${#existing[@]} -gt 0 ]]; then
  run trainer_table "$PYTHON" -m benchmarks.runs "${existing[@]}"
fi

echo "" | tee -a "$OUT/summary.md"
echo "figures in $OUT" | tee -a "$OUT/summary.md"
