#!/usr/bin/env bash
# Fine-tune across nodes: run this on every node with the same settings and its own NODE_RANK.
#   MASTER_ADDR, MASTER_PORT  address of node 0 (required)
#   NNODES (default 1), NODE_RANK (default 0), GPUS_PER_NODE (default: all GPUs of this node)
#   RUN_NAME        run folder name, the same on every node (default qwen3-sft-multinode); use a new one per job
#   MODEL_PATH DATA_PATH CKPT_PREFIX DS_CONFIG_PATH  as in qwen3_sft.sh; CKPT_PREFIX should be shared storage.
#   TURBO_TUNE_NO_VENV=1  use the python3 on PATH instead of creating .venv (see scripts/common.sh)
#   TURBO_TUNE_SHUTDOWN_TIMEOUT  seconds torchrun gives the workers to save after SIGTERM/SIGINT (default 3600)
# Relative paths (in these variables and in the arguments) are taken from the directory you start it in.
# Any argument is passed on to qwen3_sft.py.
set -euo pipefail
CALLER_DIR="$PWD"
cd "$(dirname "$0")"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
: "${MASTER_PORT:?set MASTER_PORT to a free port on node 0, e.g. 29500}"
source scripts/common.sh && ensure_venv

gpus_per_node="${GPUS_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
run_args "$(ckpt_prefix)/${RUN_NAME:-qwen3-sft-multinode}" "$@"

launch=("$PYTHON" -m turbo_tune.torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$gpus_per_node"
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" qwen3_sft.py)
echo "+ ${launch[*]} ${RUN_ARGS[*]}" >&2
exec "${launch[@]}" "${RUN_ARGS[@]}"
