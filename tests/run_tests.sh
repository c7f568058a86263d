#!/usr/bin/env bash
# Set up the pinned environment (first run only), then lint and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh && ensure_venv requirements-dev.txt
ruff check .
# Two workers (CI has two cores), each taking whole files, so a file's module-scoped runs are made once.
python -m pytest tests -q --durations=10 -n 2 --dist loadfile "$@"
