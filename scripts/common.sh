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

# run_args OUTPUT_DIR: set RUN_ARGS to the qwen3_sft.py flags that the environment variables ask for.
run_args() {
    RUN_ARGS=(--output_dir "$1" --use_liger_efficiency_callback)
    if [ -n "${MODEL_PATH:-}" ]; then RUN_ARGS+=(--model_path "$MODEL_PATH"); fi
    if [ -n "${DATA_PATH:-}" ]; then RUN_ARGS+=(--data_path "$DATA_PATH"); fi
    if [ -n "${DS_CONFIG_PATH:-}" ]; then RUN_ARGS+=(--deepspeed_config "$DS_CONFIG_PATH"); fi
}
