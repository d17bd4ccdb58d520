#!/usr/bin/env bash
# The checks to run when a GPU machine is lent: one script, about 8 minutes at most.
#
#   bash benchmarks/gpu_check.sh                # on the GPU machine (every visible GPU)
#   bash benchmarks/gpu_check.sh --cpu-smoke    # tiny, on CPU with gloo: tests this script's logic
#   options: --budget SECONDS (default 450, whole script), --with-stage (also the real
#            `python -m pipeline train dp|ddp`, when MLflow and typer are installed there)
#
# It installs nothing. It uses the first of $PYTHON, .venv/bin/python, python3, python that imports
# torch, and runs what that python can: the GPU-marked tests if pytest and PyYAML are there; the
# training probe (benchmarks/gpu_train_probe.py: the pipeline's own loop and strategies, no MLflow)
# for dp and ddp over every visible GPU (NCCL, bf16 autocast, channels_last, data on the GPU) on
# synthetic data made under /tmp, resnet18 at 64 px; and the augmentation's cost per step
# (benchmarks/augment_benchmark.py). Prints one table: strategy, GPUs, images per
# second, data-wait fraction, peak memory. Without CUDA (or with --cpu-smoke) the same steps run on
# tiny sizes with gloo. Everything printed also goes to $OUT/gpu_check.txt when $OUT is set, with
# the raw results under $OUT/gpu_check_results/. Each part runs under `timeout`, within the budget.
# Exit code: 0 when every part that ran passed, 1 otherwise.

set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)

SMOKE=0
BUDGET=450
WITH_STAGE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) SMOKE=1 ;;
        --budget) BUDGET=$2; shift ;;
        --with-stage) WITH_STAGE=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
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
    timeout -k 10 "$want" "$@"
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
    echo "mode: CPU smoke: dp in one process, ddp as $PROCS gloo processes, resnet18 at ${SIZE}px, $((IMAGES_PER_CLASS * 29)) images"
else
    PROCS=$GPUS IMAGES_PER_CLASS=140 SIZE=64 EPOCHS=3 DP_GPUS=$GPUS DP_LABEL="dp over $GPUS GPU(s)"
    BATCH=$(((64 + GPUS - 1) / GPUS * GPUS)) # global batch 64, or the next multiple of the GPU count
    echo "mode: GPU: dp over $GPUS GPU(s), ddp with $GPUS NCCL process(es), resnet18 at ${SIZE}px, $((IMAGES_PER_CLASS * 29)) images, global batch $BATCH"
fi

# --- GPU-marked tests ------------------------------------------------------------------------------
if has pytest && has yaml; then
    # -m gpu over every test module; modules that cannot import here (no MLflow, ...) must not stop the rest.
    part "pytest -m gpu" 180 "$PY" -m pytest -m gpu -rs -q -p no:cacheprovider --continue-on-collection-errors tests
else
    echo "== pytest -m gpu: skipped (needs pytest and PyYAML in $PY)"
fi

# --- training throughput ---------------------------------------------------------------------------
PROBE=(benchmarks/gpu_train_probe.py --data "$WORK/data" --epochs "$EPOCHS" --batch-size "$BATCH")
if part "prepare data" 120 "$PY" benchmarks/gpu_train_probe.py --prepare "$WORK/data" --images-per-class "$IMAGES_PER_CLASS" --size "$SIZE"; then
    part "$DP_LABEL" 120 "$PY" "${PROBE[@]}" --strategy dp --gpus "$DP_GPUS" --json "$RESULTS/1_dp_all.json"
    part "ddp, $PROCS process(es)" 150 "$PY" -m torch.distributed.run --standalone --nproc-per-node="$PROCS" "${PROBE[@]}" --strategy ddp --json "$RESULTS/2_ddp_all.json"
    if [ "$DP_GPUS" -gt 1 ]; then
        part "dp on 1 GPU (baseline)" 90 "$PY" "${PROBE[@]}" --strategy dp --gpus 1 --json "$RESULTS/0_dp_one.json"
    fi
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
echo "== training throughput (steady state: epochs after the first; peak memory: max over the devices/ranks used)"
if compgen -G "$RESULTS/*.json" >/dev/null; then
    "$PY" benchmarks/gpu_train_probe.py --table "$RESULTS"/*.json
else
    echo "no results"
fi
finish
[ ${#FAILED[@]} -eq 0 ]
