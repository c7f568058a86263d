#!/usr/bin/env bash
# The GPU correctness gate: the expert kernels in bf16 and fp32 against an fp32 reference, the launch cache against
# Triton's own launch, torch.compile of the block and short training runs against the patch-off ones.
#   bash tests/gpu/run.sh [pytest args]
# On a GPU node this uses .venv as the other scripts do. On a machine without network whose image already has torch
# and Triton, stage the other pinned packages as wheels in .whl/ first (docs/results.md says how): they are installed
# into /tmp/site and the image's python3 runs the tests. Writes its log, junit XML and gpu_gate.json to $OUT (or
# outputs/gpu-gate); exits non-zero if any check fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -d .whl ]; then
    python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    PYTHON=python3
else
    source scripts/common.sh && ensure_venv requirements-dev.txt
fi
out="${OUT:-outputs/gpu-gate}"
mkdir -p "$out"
export TURBO_TUNE_GPU_GATE_RECORD="$out/gpu_gate.jsonl" PYTHONUNBUFFERED=1
: > "$TURBO_TUNE_GPU_GATE_RECORD"
"$PYTHON" -c 'import torch, triton, transformers; print(torch.cuda.get_device_name(), "torch", torch.__version__,
"triton", triton.__version__, "transformers", transformers.__version__)'
targets=() options=()  # test paths given (default: all of tests/gpu), and the other pytest arguments
for arg in "$@"; do case "$arg" in tests/*) targets+=("$arg") ;; *) options+=("$arg") ;; esac; done
[ ${#targets[@]} -gt 0 ] || targets=(tests/gpu)
set -o pipefail
"$PYTHON" -m pytest "${targets[@]}" -v -rA -p no:cacheprovider --junitxml "$out/gpu_gate.xml" "${options[@]}" 2>&1 |
    tee "$out/gpu_gate.log"
