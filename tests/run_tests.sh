#!/usr/bin/env bash
# Set up the pinned environment (first run only), then lint and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh && ensure_venv requirements-dev.txt
ruff check .
python -m pytest tests -q --durations=10 "$@"
