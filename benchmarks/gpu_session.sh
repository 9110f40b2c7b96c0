#!/usr/bin/env bash
# One lent-GPU call: the figures of docs/performance.md, in priority order, each part time-boxed so a
# slow part (a cold compile) cannot eat the others' time. Everything it writes lands in $OUT.
#
#   PARTS="motion sdxl sd15 gap" DEADLINE=575 bash benchmarks/gpu_session.sh   # on the device machine
#   PARTS="tiny gap-tiny" OUT=/tmp/gpu-out bash benchmarks/gpu_session.sh      # its CPU path, here
#
# The device has torch 2.11 and no network: diffusers, pydantic and genserve's store/tracing
# dependencies travel as wheels in .whl/ (see docs/performance.md, "Carrying it to a GPU machine").
# Each part's limit (seconds) can be changed (SDXL_LIMIT=300 ...), and no part runs past DEADLINE
# seconds from the start: a part that ends early leaves its time to the next ones. At most 8 files
# come back from the device, so every part's output goes into one log.
# `motion` trains genserve-shapes-motion from scratch on the GPU (issue 20's GPU budget), evaluates it
# on the held-out prompts there and packs the model into $OUT/genserve-shapes-motion.tar.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PY:-python3}
CACHE=${COMPILE_CACHE:-/tmp/gs-compile-cache}
LOG=$OUT/log.txt

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    $PY -c "import torch, diffusers, transformers, pydantic; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'pydantic', pydantic.__version__)"
    nproc
} 2>&1 | tee -a "$LOG"

DEADLINE=${DEADLINE:-100000}
START=$SECONDS

# part NAME LIMIT COMMAND...: runs COMMAND under `timeout`, its output into the log, and says how it ended.
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - (SECONDS - START)))
    if [ "$left" -lt 30 ]; then
        echo "== $name: skipped, ${left}s left before the deadline" | tee -a "$LOG"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name: start $(date -u +%T), limit ${limit}s" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "== $name: rc ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$LOG"
}

for p in ${PARTS:-sdxl sd15 gap}; do
    case $p in
        motion) MOTION_WALL=${MOTION_WALL:-270}
            part motion $((MOTION_WALL + 40)) $PY -m genserve.toymodel.train_motion --device cuda \
            --out /tmp/motion/genserve-shapes-motion --checkpoint-dir /tmp/motion/ckpt --steps 1000000 \
            --clips 6000 --batch 32 --lr 1e-3 --text-lr 3e-4 --warmup-steps 100 --render-workers 14 \
            --cpu-threads 4 --time-budget-s $((MOTION_WALL - 90)) --wall-budget-s "$MOTION_WALL" \
            --eval-reserve-s 60 --eval-prompts 40 --eval-batch 8 --scores "$OUT/motion-scores.json" \
            --tar "$OUT/genserve-shapes-motion.tar" ;;
        motion-tiny) part motion-tiny 600 $PY -m genserve.toymodel.train_motion --device cpu \
            --out /tmp/motion-tiny/model --checkpoint-dir /tmp/motion-tiny/ckpt --steps 3 --clips 16 \
            --batch 2 --render-workers 2 --cpu-threads 1 --eval-prompts 1 --eval-batch 1 \
            --scores "$OUT/motion-scores.json" --tar "$OUT/genserve-shapes-motion.tar" ;;
        sdxl) part sdxl "${SDXL_LIMIT:-300}" $PY -m genserve.bench --models sdxl --batch "${SDXL_BATCH:-1,4}" \
            --repeats 3 --compile-cache "$CACHE" --out "$OUT" ;;
        sd15) part sd15 "${SD15_LIMIT:-170}" $PY -m genserve.bench --models sd15 --batch "${SD15_BATCH:-1,16}" \
            --repeats 3 --compile-cache "$CACHE" --out "$OUT" ;;
        # The gap is host work between batches: eager is enough (a compile would only spend the budget).
        gap) GENSERVE_OPTIMIZATIONS__COMPILE=off part gap "${GAP_LIMIT:-70}" $PY benchmarks/batch_idle_gap.py \
            --random-model sd15 --batch 8 --steps 30 --requests 32 --repeats 1 --out "$OUT" ;;
        sd3) part sd3 "${SD3_LIMIT:-200}" $PY -m genserve.bench --models sd3 --batch 1 --repeats 3 \
            --compile-cache "$CACHE" --out "$OUT" ;;
        tiny) part tiny 300 $PY -m genserve.bench --tiny --models sd15,sdxl --batch 1,2 --repeats 1 --out "$OUT" ;;
        gap-tiny) part gap-tiny 300 $PY benchmarks/batch_idle_gap.py --requests 8 --batch 4 --steps 2 \
            --repeats 1 --out "$OUT" ;;
        *) echo "unknown part $p" | tee -a "$LOG" ;;
    esac
done
ls -la "$OUT" | tee -a "$LOG"
