"""Training runs of qwen3_sft.py (or a probe script) in subprocesses: over gloo on the CPU for the distributed tests,
and runs interrupted by signals."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
COMMON = ["--bundled_examples", "96", "--max_steps", str(STEPS), "--logging_steps", "1", "--report_to", "none",
          "--global_batch_size", "8", "--micro_batch_size", "4", "--gradient_checkpointing", "false",
          "--save_steps", str(STEPS // 2), "--learning_rate", "2e-3"]
ZERO2 = ["--deepspeed_config", "config/zero2.json"]
ZERO3 = ["--deepspeed_config", "config/zero3.json"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(processes: int) -> list[str]:
    return [sys.executable, "-m", "turbo_tune.torchrun", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def launch(processes: int, *args: str) -> subprocess.CompletedProcess:
    launcher = torchrun(processes)
    result = subprocess.run([*launcher, *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def train(output_dir: Path, processes: int, model_path: Path, *flags: str) -> dict[int, float]:
    return train_and_log(output_dir, processes, model_path, *flags)[0]


def train_and_log(output_dir: Path, processes: int, model_path: Path, *flags: str) -> tuple[dict[int, float], str]:
    """Losses by step, and the run's stderr (its log)."""
    result = launch(processes, str(ROOT / "qwen3_sft.py"), "--output_dir", str(output_dir),
                    "--model_path", str(model_path), *COMMON, *flags)
    return logged(output_dir, "loss"), result.stderr


def logged(output_dir: Path, key: str) -> dict[int, float]:
    """``key`` by step from the run's log history."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry[key] for entry in history if key in entry}


def assert_same_losses(losses: dict[int, float], expected: dict[int, float], rel: float = 1e-4,
                       steps: int = STEPS) -> None:
    """``losses``, a run of ``steps`` steps, equal step by step to ``expected``, a run of at least as many."""
    assert sorted(losses) == list(range(1, steps + 1)) and set(losses) <= set(expected), (losses, expected)
    for step, loss in losses.items():
        assert loss == pytest.approx(expected[step], rel=rel), step


def start(*flags: str, processes: int = 1, env: dict[str, str] | None = None) -> subprocess.Popen:
    """qwen3_sft.py in the background (under torchrun for several processes), its output unbuffered on stdout."""
    launcher = [sys.executable] if processes == 1 else torchrun(processes)
    threads = {} if processes == 1 else {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*launcher, str(ROOT / "qwen3_sft.py"), *flags], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **threads, **(env or {})},
    )


def wait_for_line(process: subprocess.Popen, text: str) -> str:
    """The output up to and including the first line that holds `text` (all of it, if the process ends first)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            break
    return "".join(lines)


def interrupt(process: subprocess.Popen, signum: int, after: str = "'loss'", times: int = 1) -> tuple[int, str]:
    """Send `signum` (`times` times, back to back) once a line holding `after` appears; the exit code and the whole
    output."""
    output = wait_for_line(process, after)
    for _ in range(times):
        process.send_signal(signum)
    returncode, rest = finish(process)
    return returncode, output + rest


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for the process to end; its exit code and the rest of its output. Kill it, workers first, if it hangs."""
    try:
        rest, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
        process.kill()
        raise
    return process.returncode, rest


def worker_pid(process: subprocess.Popen, rank: int) -> int:
    """The process id of one torchrun worker."""
    for child in psutil.Process(process.pid).children(recursive=True):
        if child.environ().get("RANK") == str(rank):
            return child.pid
    raise LookupError(f"no worker of rank {rank} under process {process.pid}")
