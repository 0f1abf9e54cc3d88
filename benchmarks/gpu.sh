#!/usr/bin/env bash
# DiCo vs DiT throughput on one GPU (prepared for an H100/H200; about 8 minutes at most, no network needed).
#
#   bash benchmarks/gpu.sh [PATH_TO_YOUR_CLONE_OF_shallowdream204/DiCo]
#
# Writes <stage>.txt (the table) and <stage>.jsonl (every measurement, a JSON line each, written as it is measured)
# to $OUT if set, else to benchmarks/results-gpu/. Each stage has a hard time limit; a stage cut short keeps the rows
# it finished.
#   1. fp32, TF32 off (strict fp32), eager: every size, forward (batch 64, the paper's setting) and training step
#      (batch 32), the published DiCo beside ours if its path is given
#   1b. 250-step guided sampling against bare model calls (size S, fp32, eager)
#   2. fp32 with PyTorch's default TF32 flags (cuDNN convolutions in TF32, matmuls not: the conditions of the
#      published throughput script), eager, forward only
#   3. bf16 autocast, eager: every size, forward and training step, the published DiCo beside ours if given
#   4. bf16 autocast + torch.compile, forward only: S, then XL, B, L while the stage's time budget lasts. Cold
#      compilation is slow (H200, 2026-11-26: DiCo-B 33 s, DiCo-L 59 s, XL longer), so within the full script only S
#      finishes; for every size run the stage alone: STAGES=4 COMPILE_LIMIT=420 COMPILE_BUDGET=360 bash benchmarks/gpu.sh
#   5. `python cli.py fit` of DiCo-XL (base.yaml + dico-xl-256.yaml, batch 32) in 32-true and bf16-mixed beside the
#      bare training step, a logging step and the last.ckpt write inside the timed window, then guided 250-step
#      sampling as `sample` runs it against bare model calls (benchmarks/gpu_fit.py; its phases' limits add up to
#      less than FIT_LIMIT, 450 s; the stage ends by FIT_LIMIT + 15 s): not in the default list, run it alone:
#      STAGES=5 bash benchmarks/gpu.sh
#
# STAGES="3 4" runs only those stages (default: 1 1b 2 3 4; 1b is stage 1's sampling part).
# DRY_RUN=1 runs the same stages on the CPU with tiny settings (checks the script's logic, not speed);
# DRY_RUN_COMPILE=1 also runs stage 4 there (a few minutes of compilation).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT:-benchmarks/results-gpu}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python}
PUBLISHED=${1:-${PUBLISHED_DICO:-}}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1

published=()
if [ -n "$PUBLISHED" ]; then
    published=(--published-dico "$PUBLISHED")
fi

if [ "${DRY_RUN:-0}" = 1 ]; then
    # tiny: the logic of every stage on the CPU in a few minutes
    common=(--device cpu --models S --batch-forward 2 --batch-train 2 --reps 1 --warmup 1)
    sampling=(--sampling --sample-steps 3 --sample-batch 1 --sample-reps 1)
    fp32_limit=300 sampling_limit=120 tf32_limit=120 bf16_limit=300 compile_limit=900 compile_budget=30
    all_sizes=(--models S) compile_sizes=(--models S)
else
    common=(--device cuda --batch-forward 64 --batch-train 32 --reps 10 --warmup 3)
    sampling=(--sampling --sample-steps 250 --sample-batch 16 --sample-reps 2)
    fp32_limit=130 sampling_limit=45 tf32_limit=55 bf16_limit=100
    compile_limit=${COMPILE_LIMIT:-160} compile_budget=${COMPILE_BUDGET:-120}
    all_sizes=(--models S B L XL) compile_sizes=(--models S XL B L)
fi

STAGES=${STAGES:-1 1b 2 3 4}

stage() {  # stage NAME LIMIT_SECONDS ARGS...  (NAME starts with its number: 1_..., 1b_...)
    local name=$1 limit=$2
    shift 2
    case " $STAGES " in *" ${name%%_*} "*) ;; *) return 0 ;; esac
    echo "== $name (at most ${limit}s): speed.py $*" | tee "$OUT_DIR/$name.txt"
    timeout --signal=INT --kill-after=10 "$limit" \
        "$PY" benchmarks/speed.py "$@" --json "$OUT_DIR/$name.jsonl" 2>&1 | tee -a "$OUT_DIR/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || echo "== $name ended with status $rc (124/130: time limit; its finished rows are kept)" |
        tee -a "$OUT_DIR/$name.txt"
}

{
    date -u
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} >"$OUT_DIR/environment.txt" 2>&1

start=$(date +%s)
stage 1_fp32_eager "$fp32_limit" "${common[@]}" "${all_sizes[@]}" --dtypes fp32 --tf32 off "${published[@]}"
stage 1b_sampling "$sampling_limit" "${common[@]}" --models S --dtypes fp32 --tf32 off --modes "${sampling[@]}"
stage 2_fp32_default_tf32 "$tf32_limit" "${common[@]}" "${all_sizes[@]}" --dtypes fp32 --tf32 default \
    --modes forward "${published[@]}"
stage 3_bf16_eager "$bf16_limit" "${common[@]}" "${all_sizes[@]}" --dtypes bf16 "${published[@]}"
if [ "${DRY_RUN:-0}" != 1 ] || [ "${DRY_RUN_COMPILE:-0}" = 1 ]; then
    stage 4_bf16_compiled "$compile_limit" "${common[@]}" "${compile_sizes[@]}" --dtypes bf16 --compile on \
        --modes forward --time-budget "$compile_budget"
fi
case " $STAGES " in *" 5 "*)
    fit_limit=${FIT_LIMIT:-450} fit_args=()
    if [ "${DRY_RUN:-0}" = 1 ]; then fit_limit=${FIT_LIMIT:-1000} fit_args=(--dry-run); fi
    # gpu_fit.py keeps its phases inside --time-limit and, cut (SIGINT), ends the running phase's process group and
    # prints what it measured; `timeout` is the backstop
    echo "== 5_fit (at most $((fit_limit + 15))s): gpu_fit.py ${fit_args[*]}" | tee "$OUT_DIR/5_fit.txt"
    timeout --signal=INT --kill-after=20 $((fit_limit + 15)) "$PY" benchmarks/gpu_fit.py "${fit_args[@]}" \
        --time-limit "$fit_limit" --json "$OUT_DIR/5_fit.jsonl" 2>&1 | tee -a "$OUT_DIR/5_fit.txt"
    ;;
esac
echo "== done in $(($(date +%s) - start))s; results in $OUT_DIR" | tee "$OUT_DIR/done.txt"
