#!/usr/bin/env bash
# The checks to run when a GPU machine is lent: one script, about 8 minutes at most.
#
#   bash benchmarks/gpu_check.sh                # on the GPU machine (every visible GPU)
#   bash benchmarks/gpu_check.sh --cpu-smoke    # tiny, on CPU with gloo: tests this script's logic
#   options: --budget SECONDS (default 450, whole script), --per-gpu-batch N (default 128),
#            --with-stage (also the real `python -m pipeline train dp|ddp`, when MLflow and typer are there)
#
# It installs nothing. It uses the first of $PYTHON, .venv/bin/python, python3, python that imports
# torch, and runs what that python can: the GPU-marked tests if pytest and PyYAML are there (each
# test's own timeouts are shorter than the part's, so a hang names its test); the training probe
# (benchmarks/gpu_train_probe.py: the pipeline's own loop and strategies, no MLflow) for dp and ddp
# over every visible GPU (NCCL, bf16 autocast, channels_last, data on the GPU) on synthetic data made
# under /tmp, resnet18 at 64 px, at the params' global batch (64) and at a fixed batch per GPU
# (--per-gpu-batch, 128), so that 8 GPUs are not measured on 8 images each; the data kept on the
# host and streamed; and the augmentation's cost per step (benchmarks/augment_benchmark.py). Prints
# one table naming the card and its count: strategy, GPUs, batch, images per second, data-wait
# fraction, peak memory, whether the ranks agree, the dtype every replica computed in. Without CUDA
# (or with --cpu-smoke) the same steps run on tiny sizes with gloo. Everything printed also goes to
# $OUT/gpu_check.txt when $OUT is set, with the raw results under $OUT/gpu_check_results/. Each part
# runs under `timeout` (SIGINT first, so Python prints where it hung), within the budget.
# Exit code: 0 when every part that ran passed, 1 otherwise.

set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)

SMOKE=0
BUDGET=450
PER_GPU_BATCH=128
WITH_STAGE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) SMOKE=1 ;;
        --budget) BUDGET=$2; shift ;;
        --per-gpu-batch) PER_GPU_BATCH=$2; shift ;;
        --with-stage) WITH_STAGE=1 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
RESULTS=$WORK/results
mkdir -p "$RESULTS"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    REPORT=$OUT/gpu_check.txt
else
    REPORT=$WORK/gpu_check.txt
fi
exec > >(tee "$REPORT") 2>&1

START=$SECONDS
FAILED=()
PASSED=()
left() { echo $((BUDGET - (SECONDS - START))); }

# part NAME SECONDS COMMAND...: run under timeout, capped by what is left of the budget.
part() {
    local name=$1 want=$2
    shift 2
    local remaining
    remaining=$(left)
    if [ "$remaining" -lt 20 ]; then
        echo "== $name: skipped, budget spent ($remaining s left)"
        FAILED+=("$name (no time left)")
        return 1
    fi
    [ "$want" -gt "$remaining" ] && want=$remaining
    echo
    echo "== $name (limit ${want}s, $(left)s of the budget left)"
    local begun=$SECONDS
    # SIGINT first: Python raises KeyboardInterrupt and prints where it was (pytest: which test).
    timeout -s INT -k 15 "$want" "$@"
    local rc=$?
    if [ $rc -eq 0 ]; then
        PASSED+=("$name")
        echo "== $name: ok in $((SECONDS - begun))s"
    else
        [ $rc -eq 124 ] && echo "== $name: TIMED OUT after ${want}s" || echo "== $name: FAILED (exit $rc) after $((SECONDS - begun))s"
        FAILED+=("$name (exit $rc)")
    fi
    return $rc
}

finish() {
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/gpu_check_results"
        cp "$RESULTS"/*.json "$WORK"/data/data.json "$OUT/gpu_check_results/" 2>/dev/null
    fi
    echo
    local IFS=";"
    echo "passed: ${PASSED[*]:-none}"
    echo "failed: ${FAILED[*]:-none}"
    echo "total $((SECONDS - START))s of a ${BUDGET}s budget; report: $REPORT"
}

# --- which python ---------------------------------------------------------------------------------
PY=""
for candidate in "${PYTHON:-}" "$REPO/.venv/bin/python" python3 python; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c "import torch" >/dev/null 2>&1; then
        PY=$(command -v "$candidate") # absolute: some parts run in another directory
        break
    fi
done
if [ -z "$PY" ]; then
    echo "no python here imports torch (tried \$PYTHON, .venv/bin/python, python3, python): nothing to check"
    exit 1
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
has() { "$PY" -c "import $1" >/dev/null 2>&1; }

echo "== environment ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPU cores, work dir $WORK)"
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 20 nvidia-smi
    timeout 20 nvidia-smi topo -m 2>/dev/null | head -20
else
    echo "nvidia-smi: not found"
fi
timeout 60 "$PY" - <<'EOF'
import importlib.util, platform, sys
import torch
print(f"python {platform.python_version()} at {sys.executable}")
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuda available {torch.cuda.is_available()}, devices {torch.cuda.device_count()}")
if torch.cuda.is_available():
    try:
        nccl = torch.cuda.nccl.version()
        nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception as err:  # noqa: BLE001 -- informational only
        nccl = f"unknown ({err})"
    print(f"cudnn {torch.backends.cudnn.version()}, nccl {nccl}, bf16 supported {torch.cuda.is_bf16_supported()}")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
mods = ["torchvision", "numpy", "PIL", "yaml", "safetensors", "tqdm", "pytest", "mlflow", "typer", "sklearn", "dvc"]
print("importable: " + ", ".join(f"{m} {'yes' if importlib.util.find_spec(m) else 'NO'}" for m in mods))
EOF

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [ "$GPUS" -eq 0 ] && [ $SMOKE -eq 0 ]; then
    echo "no CUDA device visible: running the CPU smoke version (tiny sizes, gloo)"
    SMOKE=1
fi
if [ $SMOKE -eq 1 ]; then
    PROCS=2 IMAGES_PER_CLASS=16 SIZE=32 EPOCHS=2 BATCH=32 DP_GPUS=0 DP_LABEL="dp, one CPU process"
    PER_GPU_BATCH=16 MIN_STEPS=4 SCALE=$PROCS SHARD_SIZE=64 STREAM_BUFFER=64 STREAM_BUDGET_GB=0.002
    echo "mode: CPU smoke: dp in one process, ddp as $PROCS gloo processes, resnet18 at ${SIZE}px, $((IMAGES_PER_CLASS * 29)) images"
else
    PROCS=$GPUS IMAGES_PER_CLASS=140 SIZE=64 EPOCHS=3 DP_GPUS=$GPUS DP_LABEL="dp over $GPUS GPU(s)"
    MIN_STEPS=30 SCALE=$GPUS SHARD_SIZE=512 STREAM_BUFFER=512 STREAM_BUDGET_GB=0.06
    BATCH=$(((64 + GPUS - 1) / GPUS * GPUS)) # global batch 64, or the next multiple of the GPU count
    CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null)
    echo "mode: GPU: ${GPUS}x $CARD; dp over $GPUS GPU(s), ddp with $GPUS NCCL process(es), resnet18 at ${SIZE}px,"
    echo "      $((IMAGES_PER_CLASS * 29)) images, global batch $BATCH, and $PER_GPU_BATCH per GPU (global $((PER_GPU_BATCH * GPUS)))"
fi
WIDE=$((PER_GPU_BATCH * SCALE)) # the fixed per-GPU batch over every GPU (every ddp process on CPU)

# --- GPU-marked tests ------------------------------------------------------------------------------
if has pytest && has yaml; then
    # -m gpu over every test module; modules that cannot import here (no MLflow, ...) must not stop the rest.
    # -v names each test as it starts; the tests' own subprocess timeouts (at most 150 s) are shorter
    # than this part's limit, so a hang fails its test with torchrun's output instead of killing pytest.
    part "pytest -m gpu" 300 "$PY" -m pytest -m gpu -rs -v -p no:cacheprovider --continue-on-collection-errors tests
else
    echo "== pytest -m gpu: skipped (needs pytest and PyYAML in $PY)"
fi

# --- training throughput ---------------------------------------------------------------------------
PROBE=(benchmarks/gpu_train_probe.py --data "$WORK/data" --epochs "$EPOCHS" --batch-size "$BATCH")
if part "prepare data" 120 "$PY" benchmarks/gpu_train_probe.py --prepare "$WORK/data" --images-per-class "$IMAGES_PER_CLASS" --size "$SIZE" --shard-size "$SHARD_SIZE"; then
    TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node="$PROCS")
    part "$DP_LABEL, batch $BATCH" 120 "$PY" "${PROBE[@]}" --strategy dp --gpus "$DP_GPUS" --json "$RESULTS/1_dp_all.json"
    part "ddp, $PROCS process(es), batch $BATCH" 150 "${TORCHRUN[@]}" "${PROBE[@]}" --strategy ddp --json "$RESULTS/2_ddp_all.json"
    if [ "$DP_GPUS" -gt 1 ]; then
        part "dp on 1 GPU (baseline), batch $BATCH" 90 "$PY" "${PROBE[@]}" --strategy dp --gpus 1 --json "$RESULTS/0_dp_one.json"
    fi
    # A fixed batch per GPU: what each GPU would be given in a run sized for the node.
    WIDE_PROBE=("${PROBE[@]}" --batch-size "$WIDE" --min-steps "$MIN_STEPS")
    part "$DP_LABEL, $PER_GPU_BATCH per GPU" 120 "$PY" "${WIDE_PROBE[@]}" --strategy dp --gpus "$DP_GPUS" --json "$RESULTS/4_dp_all_per_gpu.json"
    part "ddp, $PROCS process(es), $PER_GPU_BATCH per GPU" 150 "${TORCHRUN[@]}" "${WIDE_PROBE[@]}" --strategy ddp --json "$RESULTS/5_ddp_all_per_gpu.json"
    if [ "$DP_GPUS" -gt 1 ]; then
        part "dp on 1 GPU (baseline), batch $PER_GPU_BATCH" 90 "$PY" "${PROBE[@]}" --batch-size "$PER_GPU_BATCH" --min-steps "$MIN_STEPS" \
            --strategy dp --gpus 1 --json "$RESULTS/3_dp_one_per_gpu.json"
    fi
    # Data not resident on the device (forced): memory-mapped on the host, then streamed past a
    # small budget; each batch gathered and copied (pinned, side stream) while the step runs.
    # Target: data wait under 2% of the step time.
    part "$DP_LABEL, data on the host (forced)" 120 "$PY" "${PROBE[@]}" --strategy dp --gpus "$DP_GPUS" --data-on-device false --json "$RESULTS/6_dp_host.json"
    part "$DP_LABEL, data streamed (forced)" 120 "$PY" "${PROBE[@]}" --strategy dp --gpus "$DP_GPUS" --data-on-device false --memory-budget-gb "$STREAM_BUDGET_GB" --shuffle-buffer "$STREAM_BUFFER" --json "$RESULTS/7_dp_streamed.json"
fi

# --- augmentation cost ------------------------------------------------------------------------------
if [ $SMOKE -eq 1 ]; then
    part "augmentation cost per step (CPU smoke)" 120 "$PY" benchmarks/augment_benchmark.py --device cpu --image-size "$SIZE" --batch "$BATCH" --steps 2 --rounds 2
else
    part "augmentation cost per step (cuda:0)" 120 "$PY" benchmarks/augment_benchmark.py --device cuda --steps 20 --rounds 6
fi

# --- the real stage (opt-in) -----------------------------------------------------------------------
if [ $WITH_STAGE -eq 1 ]; then
    if [ ! -d "$WORK/data/data/shards" ]; then
        echo "== real stage: skipped (no shards were made here)"
    elif has mlflow && has typer && has yaml; then
        stage_ws=$WORK/data
        cp dvc.yaml "$stage_ws/"
        "$PY" - "$stage_ws/params.yaml" "$PROCS" "$IMAGES_PER_CLASS" "$SIZE" "$EPOCHS" "$BATCH" <<'EOF'
import sys, yaml
path, gpus, ipc, size, epochs, batch = sys.argv[1], *map(int, sys.argv[2:])
values = {"seed": 0, "gpus": gpus, "data": {"synthetic": {"images_per_class": ipc}, "image_size": size}, "model": {"name": "resnet18"}, "train": {"epochs": epochs, "batch_size": batch}}
open(path, "w").write(yaml.safe_dump(values))
EOF
        export MLFLOW_TRACKING_URI="sqlite:///$stage_ws/mlruns/mlflow.db"
        mkdir -p "$stage_ws/mlruns"
        cd "$stage_ws" || exit 1
        for strategy in dp ddp; do
            part "python -m pipeline train $strategy" 150 "$PY" -m pipeline train "$strategy" && cat "metrics/train_$strategy.json"
        done
        cd "$REPO" || exit 1
    else
        echo "== real stage: skipped (needs mlflow, typer and PyYAML in $PY)"
    fi
fi

# --- the table -------------------------------------------------------------------------------------
echo
echo "== training throughput (steady state: epochs after the first; peak memory: max over the devices/ranks used;"
echo "   compute: the dtype the first convolution ran in, on every replica/rank)"
if compgen -G "$RESULTS/*.json" >/dev/null; then
    "$PY" benchmarks/gpu_train_probe.py --table "$RESULTS"/*.json
else
    echo "no results"
fi
finish
[ ${#FAILED[@]} -eq 0 ]
