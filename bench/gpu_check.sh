#!/usr/bin/env bash
# The GPU checks as one prepared run (about 5 minutes on an H100; every step has a time limit, under 8
# minutes in all): the Triton kernels' tests compiled for the GPU (attention and the fused small ops against
# torch, and the engine's steps captured in CUDA graphs and checked against transformers), the attention op alone at the Qwen3-8B shape (4 workers on a 16k
# shared block plus 1k per worker, against one-sequence SDPA and independent sequences; the kernel with its
# items sized to the step, cut to 256 and to 1024 keys, and pipelined 5 stages deep), and engine decode
# steps at 1 and 4 workers at 8k and 16k context against the weight-read floor, with the vectorized torch
# attention and, when triton is installed, the Triton kernel run eagerly and from CUDA graphs; on 2+ GPUs,
# the tensor-parallel tests and the engine split over 2 GPUs against 1.
#
# Usage: bench/gpu_check.sh   (PYTHON defaults to python3; results go to $OUT if set, else bench/results/:
# six files, a log, the attention JSON and plot and three engine JSONs; the device tool returns at most 8)
# The tests need the default model's tokenizer files and nothing else of it. For an offline machine, copy
# them into an ignored folder that travels with the tree, e.g.
#   mkdir -p .gpucache/SmolLM2-135M-Instruct && cp ~/.cache/hogwild/SmolLM2-135M-Instruct/{tokenizer*,chat_template.jinja,config.json} .gpucache/SmolLM2-135M-Instruct/
# and run HOGWILD_CACHE=.gpucache bench/gpu_check.sh there.
# Random weights at the model's shape and a built-in byte tokenizer: nothing is downloaded.
# DEVICE=cpu SHAPE=tiny bench/gpu_check.sh runs the same steps on the CPU, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-qwen3-8b}
DEST=${OUT:-bench/results}
mkdir -p "$DEST"
exec > >(tee "$DEST/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
status=0

# step SECONDS NAME COMMAND...: a failed or timed-out step is reported and the others still run.
step() {
    local limit=$1 name=$2
    shift 2
    echo "=== $name"
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "=== $name FAILED (exit $rc)"
        status=1
    fi
    echo "=== $name: $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
backends=(vectorized)
if "$PYTHON" -c "import torch, triton; assert torch.cuda.is_available()" 2>/dev/null; then
    backends+=(triton)
fi

# On the CPU (a dry run of this script) the same tests run in Triton's interpreter.
interpret=$([ "$DEVICE" = cpu ] && echo 1 || echo 0)
if "$PYTHON" -c "import triton" 2>/dev/null; then
    step 130 "Triton kernel tests (TRITON_INTERPRET=$interpret), CUDA graph steps captured on a GPU" \
        env TRITON_INTERPRET=$interpret "$PYTHON" -m pytest -q -p no:cacheprovider \
        tests/test_triton_attention.py tests/test_fused_ops.py
fi

step 75 "attention op, $SHAPE shape" \
    "$PYTHON" -m bench attention --device "$DEVICE" --shape "$SHAPE" --workers 1 2 4 8 \
    --common 16384 --step-tokens 1024 --backends vectorized triton \
    --variants chunk=256,items=none chunk=1024,items=none stages=5 --out "$DEST/attention_$SHAPE.json" --plot

# generate and the independent jobs once, with the default torch attention; the kernel's runs add their rows:
# eager steps, then steps replayed from CUDA graphs (the engine's default on CUDA).
runs=("vectorized vectorized true")
if [[ " ${backends[*]} " == *" triton "* ]]; then
    runs+=("triton triton_eager false" "triton triton_graphs true")
fi
extra=()
for run in "${runs[@]}"; do
    read -r backend name graphs <<< "$run"
    step 90 "engine, $SHAPE shape, $name" \
        "$PYTHON" -m bench engine --device "$DEVICE" --shape "$SHAPE" --attention "$backend" --cuda-graphs "$graphs" \
        --workers 1 4 --contexts 8192 16384 --tokens 32 "${extra[@]}" --out "$DEST/engine_${SHAPE}_$name.json"
    extra=(--no-generate --no-independent)
done

# Tensor parallel (engine/parallel.py): the same engine split over 2 GPUs against 1, in one run, with the
# tensor-parallel tests (2 ranks against 1 and the oracle) first. Skipped with a message on one GPU.
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$DEVICE" = cuda ] && [ "$gpus" -ge 2 ]; then
    step 120 "tensor parallel tests, $gpus GPUs" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_tensor_parallel.py
    step 150 "engine, $SHAPE shape, tensor parallel 1 and 2" \
        "$PYTHON" -m bench engine --device "$DEVICE" --shape "$SHAPE" --tensor-parallel 1 2 --workers 1 4 \
        --contexts 8192 --tokens 32 --no-generate --no-independent --out "$DEST/engine_${SHAPE}_tp.json"
else
    echo "=== tensor parallel: skipped ($gpus GPU(s) on $DEVICE; it needs 2)"
fi

echo "=== gpu_check: $([ $status -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED) in $SECONDS s"
exit $status
