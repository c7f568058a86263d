"""turbo_tune.torchrun: torchrun that waits TURBO_TUNE_SHUTDOWN_TIMEOUT seconds, not torch's fixed 30, for workers to
save after it forwards a signal."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A worker that takes 3 s to "save" after SIGTERM, as a checkpoint of a real model takes minutes.
WORKER = """
import pathlib, signal, sys, time
saved = pathlib.Path(sys.argv[1])
def save_and_exit(signum, frame):
    time.sleep(3)
    saved.write_text("saved")
    sys.exit(143)
signal.signal(signal.SIGTERM, save_and_exit)
saved.with_suffix(".ready").write_text("ready")
time.sleep(120)
"""


def start(tmp_path: Path, timeout: str) -> tuple[subprocess.Popen, Path]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    saved = tmp_path / "saved"
    env = {**os.environ, "TURBO_TUNE_SHUTDOWN_TIMEOUT": timeout, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "turbo_tune.torchrun", "--standalone", "--nproc_per_node", "1",
                                str(worker), str(saved)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    return process, saved


@pytest.mark.parametrize(("timeout", "saves"), [("20", True), ("1", False)])
def test_the_workers_get_the_shutdown_timeout_to_save_after_a_forwarded_sigterm(tmp_path, timeout, saves):
    """1 s kills the worker mid-save, where torch's own 30 s would have let it finish: the setting is what applies."""
    process, saved = start(tmp_path, timeout)
    deadline = time.monotonic() + 60
    while not saved.with_suffix(".ready").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode != 0
    assert saved.exists() == saves, output[-2000:]


def test_a_shutdown_timeout_that_is_not_a_number_is_refused_before_any_worker_starts(tmp_path):
    process, saved = start(tmp_path, "ten minutes")
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 1
    assert output.strip().splitlines()[-1] == (
        "TURBO_TUNE_SHUTDOWN_TIMEOUT='ten minutes': give the seconds to wait for the workers as a whole number.")
    assert not saved.with_suffix(".ready").exists()
