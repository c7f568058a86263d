#!/usr/bin/env bash
# Fine-tune on this node, on every GPU it has (or the CPU when it has none).
#   MODEL_PATH      local Qwen3-MoE checkpoint        (unset: the embedded tiny model)
#   DATA_PATH       local data file or folder         (unset: the bundled chat task)
#   CKPT_PREFIX     folder that receives run folders  (unset: outputs)
#   DS_CONFIG_PATH  DeepSpeed config, e.g. config/zero3.json (unset: no DeepSpeed; add --fsdp for FSDP2)
#   TURBO_TUNE_NO_VENV=1  use the python3 on PATH instead of creating .venv (see scripts/common.sh)
#   TURBO_TUNE_SHUTDOWN_TIMEOUT  seconds torchrun gives the workers to save after SIGTERM/SIGINT (default 3600)
# Relative paths (in these variables and in the arguments) are taken from the directory you start it in.
# Any argument is passed on to qwen3_sft.py, e.g. `bash qwen3_sft.sh --use_fast_moe_block --max_steps 100`.
set -euo pipefail
CALLER_DIR="$PWD"
cd "$(dirname "$0")"
source scripts/common.sh && ensure_venv

num_gpus="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
# The process id keeps two runs started in the same second apart; qwen3_sft.py locks the folder it gets.
run_args "$(ckpt_prefix)/qwen3-sft-$(date +%Y%m%d-%H%M%S)-$$" "$@"

# torchrun for every engine (turbo_tune.torchrun: it waits for the workers' checkpoint after a signal); the Trainer
# builds DeepSpeed from the config.
if [ "$num_gpus" -eq 0 ]; then
    launch=("$PYTHON" qwen3_sft.py)
else
    launch=("$PYTHON" -m turbo_tune.torchrun --standalone --nproc_per_node "$num_gpus" qwen3_sft.py)
fi
echo "+ ${launch[*]} ${RUN_ARGS[*]}" >&2
exec "${launch[@]}" "${RUN_ARGS[@]}"
