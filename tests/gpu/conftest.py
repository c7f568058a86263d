"""The GPU gate's record: with TURBO_TUNE_GPU_GATE_RECORD set (tests/gpu/run.sh sets it), the session ends by
writing the stack, the device, the outcome counts and every comparison into one JSON file beside the record."""

import datetime
import json
import os
from pathlib import Path

import torch
import transformers
import triton
from gate import RECORD_ENV


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    record = Path(path)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    outcomes = {name: len(reporter.stats.get(name, [])) for name in ("passed", "failed", "error", "skipped")}
    comparisons = [json.loads(line) for line in record.read_text().splitlines()] if record.is_file() else []
    summary = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device",
        "stack": {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__},
        "command": "bash tests/gpu/run.sh",
        "outcomes": outcomes,
        "comparisons": comparisons,
    }
    record.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
