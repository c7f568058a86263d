# Sourced by the launch and test scripts: make .venv and install each pinned requirements file into it on first
# use (and again whenever that file changes), then put the venv first on PATH. TURBO_TUNE_VENV picks another place.
# Usage: source scripts/ensure_venv.sh [extra requirements file...]
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${TURBO_TUNE_VENV:-$_root/.venv}"
if [ ! -x "$_venv/bin/python" ]; then
    echo "Creating $_venv (first run: a few minutes)..." >&2
    python3 -m venv "$_venv"
    # torch alone first, so a local wheel of the pinned version is used when the machine has one.
    "$_venv/bin/pip" install -q --disable-pip-version-check "$(grep -m1 '^torch==' "$_root/requirements.txt")"
fi
mkdir -p "$_venv/.turbo-tune"
for _file in "$_root/requirements.txt" "$@"; do
    _stamp="$_venv/.turbo-tune/$(basename "$_file").sha256"
    if [ "$(sha256sum < "$_file")" != "$(cat "$_stamp" 2>/dev/null)" ]; then
        echo "Installing $(basename "$_file") into $_venv..." >&2
        "$_venv/bin/pip" install -q --disable-pip-version-check -r "$_file"
        sha256sum < "$_file" > "$_stamp"
    fi
done
export PATH="$_venv/bin:$PATH"
export PYTHONPATH="$_root${PYTHONPATH:+:$PYTHONPATH}"
unset _root _venv _file _stamp
