# Sourced by the launch and test scripts.

# ensure_venv [extra requirements file...]: make .venv and install each pinned requirements file into it on first
# use (and again whenever that file changes), then put the venv first on PATH. TURBO_TUNE_VENV picks another place;
# TURBO_TUNE_NO_VENV=1 skips the venv and uses the python3 on PATH (an image that already has the requirements).
# Sets PYTHON to the interpreter to launch with.
ensure_venv() {
    local root venv file stamp
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    if [ "${TURBO_TUNE_NO_VENV:-0}" = 1 ]; then
        PYTHON=python3
        return
    fi
    venv="${TURBO_TUNE_VENV:-$root/.venv}"
    if [ ! -x "$venv/bin/python" ]; then
        echo "Creating $venv (first run: a few minutes)..." >&2
        python3 -m venv "$venv"
        # torch alone first, so a local wheel of the pinned version is used when the machine has one.
        "$venv/bin/pip" install -q --disable-pip-version-check "$(grep -m1 '^torch==' "$root/requirements.txt")"
    fi
    mkdir -p "$venv/.turbo-tune"
    for file in "$root/requirements.txt" "$@"; do
        stamp="$venv/.turbo-tune/$(basename "$file").sha256"
        if [ "$(sha256sum < "$file")" != "$(cat "$stamp" 2>/dev/null)" ]; then
            echo "Installing $(basename "$file") into $venv..." >&2
            "$venv/bin/pip" install -q --disable-pip-version-check -r "$file"
            sha256sum < "$file" > "$stamp"
        fi
    done
    export PATH="$venv/bin:$PATH"
    PYTHON=python
}

# The launch scripts run from the repository, but the paths a user gives are relative to the directory the script was
# started in, which the script saves in CALLER_DIR before changing directory.
PATH_FLAGS=" --model_path --data_path --output_dir --config --deepspeed_config --deepspeed --fsdp_config "
PATH_FLAGS+="--resume_from_checkpoint --logging_dir "

# from_caller PATH: PATH as seen from CALLER_DIR (one that exists only in the repository, such as config/zero3.json,
# stays as it is). Absolute paths, inline JSON and the values `last`, `latest`, `true` pass unchanged.
from_caller() {
    case "$1" in
        ""|/*|"{"*|last|latest|true|True) printf '%s' "$1" ;;
        *) if [ ! -e "$CALLER_DIR/$1" ] && [ -e "$1" ]; then printf '%s' "$1"; else printf '%s' "$CALLER_DIR/$1"; fi ;;
    esac
}

# ckpt_prefix: the folder that receives run folders, CKPT_PREFIX as seen from CALLER_DIR (unset: outputs).
ckpt_prefix() {
    if [ -n "${CKPT_PREFIX:-}" ]; then from_caller "$CKPT_PREFIX"; else printf '%s' outputs; fi
}

# run_args OUTPUT_DIR [ARG...]: set RUN_ARGS to the qwen3_sft.py flags that OUTPUT_DIR and the environment variables
# ask for, followed by the ARGs, with every path in them taken from CALLER_DIR.
run_args() {
    local arg path_value=0
    RUN_ARGS=(--output_dir "$1" --use_liger_efficiency_callback)
    shift
    if [ -n "${MODEL_PATH:-}" ]; then RUN_ARGS+=(--model_path "$(from_caller "$MODEL_PATH")"); fi
    if [ -n "${DATA_PATH:-}" ]; then RUN_ARGS+=(--data_path "$(from_caller "$DATA_PATH")"); fi
    if [ -n "${DS_CONFIG_PATH:-}" ]; then RUN_ARGS+=(--deepspeed_config "$(from_caller "$DS_CONFIG_PATH")"); fi
    for arg in "$@"; do
        if [ "$path_value" = 1 ]; then
            RUN_ARGS+=("$(from_caller "$arg")")
            path_value=0
        elif [[ "$arg" == --*=* && "$PATH_FLAGS" == *" ${arg%%=*} "* ]]; then
            RUN_ARGS+=("${arg%%=*}=$(from_caller "${arg#*=}")")
        else
            RUN_ARGS+=("$arg")
            if [[ "$PATH_FLAGS" == *" $arg "* ]]; then path_value=1; fi
        fi
    done
}
