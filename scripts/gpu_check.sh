#!/usr/bin/env bash
# The GPU check of issue 19: on ONE lent GPU machine, in under 8 minutes, run the CUDA-marked tests and the GPU
# benchmarks, writing every log and figure under $OUT (default: .gpu_check_out/).
#
#   scripts/gpu_wheels.sh                 # here, once: the wheels the GPU image lacks, into .gpu_wheels/
#   scripts/gpu_check.sh                  # there, from the repository root (device tool: carry [".gpu_wheels"])
#   GPU_CHECK_DRY=1 scripts/gpu_check.sh  # anywhere: check this script's syntax and that every command it calls
#                                         # exists, without running them
#
# The lent machine (see /work/.library/device/KINDS.md) has one H100/H200, its own torch and transformers (other
# versions than the constraints pin), no `datasets` and no network: the wheels carried in .gpu_wheels/ are
# installed into /tmp/site with pip --no-index. What it cannot check: NCCL across GPUs (one GPU only), hence
# neither `accelerate launch --multi_gpu` nor multi-node scoring; those run on CPU (gloo) in the test suite.
# Budget (timeout guards, 480 s in all): install 30 s, environment 20 s, CUDA tests 200 s, benchmarks 230 s.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/.gpu_check_out}
DRY=${GPU_CHECK_DRY:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
STATUS=0
GPU_ONLY="nvidia-smi"  # commands the GPU image has and a CPU machine may lack

# run NAME SECONDS COMMAND...: the command under `timeout`, its output in $OUT/NAME.log; in dry mode only checks
# that the command (an executable, or a python script or module) exists.
run() {
    local name=$1 seconds=$2
    shift 2
    if [ "$DRY" = 1 ]; then
        local program=$1
        if [ "$program" = "$PY" ] && [ "${2:-}" = "-m" ]; then
            "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$3') is None)" \
                || { echo "MISSING module $3 ($name)"; STATUS=1; return; }
        elif [ "$program" = "$PY" ] && [ -n "${2:-}" ] && [ "${2#-}" = "$2" ]; then
            [ -f "$2" ] || { echo "MISSING script $2 ($name)"; STATUS=1; return; }
        fi
        if ! command -v "$program" >/dev/null; then
            case " $GPU_ONLY " in
                *" $program "*) echo "ok  [$name] $program (on the GPU machine only)"; return ;;
                *) echo "MISSING command $program ($name)"; STATUS=1; return ;;
            esac
        fi
        echo "ok  [$name, ${seconds}s] $*"
        return
    fi
    echo "== $name (at most ${seconds}s): $*"
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$OUT/summary.txt"
    [ "$rc" = 0 ] || STATUS=1
}

# 1. The missing packages, from the carried wheels (nothing is fetched).
if [ "$DRY" != 1 ]; then
    if ls .gpu_wheels/*.whl >/dev/null 2>&1; then
        timeout 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .gpu_wheels/*.whl || { echo "installing .gpu_wheels failed"; exit 1; }
        export PYTHONPATH="$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "no .gpu_wheels/*.whl: run scripts/gpu_wheels.sh here and carry .gpu_wheels" >&2
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    fi
else
    [ -x scripts/gpu_wheels.sh ] || { echo "MISSING scripts/gpu_wheels.sh"; STATUS=1; }
    command -v timeout >/dev/null || { echo "MISSING command timeout"; STATUS=1; }
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. What the figures were measured on.
run environment 20 "$PY" -c "
import torch, transformers, accelerate, datasets, hf_accinf
assert torch.cuda.is_available(), 'torch sees no GPU'
print('gpu', torch.cuda.get_device_name(), 'memory GiB', round(torch.cuda.get_device_properties(0).total_memory / 2**30))
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__,
      'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'hf_accinf', hf_accinf.__file__)"
run nvidia-smi 10 nvidia-smi

# 3. The CUDA-marked tests (scores on the GPU equal scores on the CPU, the projection, the step loops without
#    host synchronisation under torch.cuda.set_sync_debug_mode).
run cuda-tests 200 "$PY" -m pytest -q -m cuda -p no:cacheprovider -rs --junitxml="$OUT/cuda-tests.xml" tests

# 4. The GPU benchmarks: the scaling benchmark (issue 19 item 5), then the adjoint's own where it takes a device.
if [ -f scripts/bench_scale.py ] || [ "$DRY" = 1 ]; then
    if [ -f scripts/bench_scale.py ]; then
        # the issue's GPU goals: the head at N = 2^20 x 3 epochs (< 30 s) and the MiniLM-shaped adjoint (<= 3x training)
        run bench-head-large 70 "$PY" scripts/bench_scale.py --device cuda --case head-large
        run bench-minilm 110 "$PY" scripts/bench_scale.py --device cuda --case minilm
    else
        echo "skip bench-scale: scripts/bench_scale.py is not in this tree yet"
    fi
fi
if "$PY" scripts/bench_adjoint.py --help 2>/dev/null | grep -q -- "--device"; then
    run bench-adjoint 50 "$PY" scripts/bench_adjoint.py --sizes 100000 --device cuda
else
    echo "skip bench-adjoint: scripts/bench_adjoint.py takes no --device" | tee -a "$OUT/summary.txt"
fi

echo "gpu_check: exit $STATUS (logs in $OUT)"
exit $STATUS
