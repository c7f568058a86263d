"""Training runs of qwen3_sft.py (or a probe script) over gloo on the CPU, for the distributed tests."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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


def launch(processes: int, *args: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
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
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}, result.stderr
