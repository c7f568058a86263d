"""Two CPU processes over gloo train exactly like one process on the same global batch (FSDP2 and plain DDP)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
COMMON = ["--bundled_examples", "96", "--max_steps", str(STEPS), "--logging_steps", "1", "--report_to", "none",
          "--global_batch_size", "8", "--gradient_checkpointing", "false", "--save_steps", str(STEPS // 2)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(output_dir: Path, processes: int, *flags: str) -> dict[int, float]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command = [*launcher, str(ROOT / "qwen3_sft.py"), "--output_dir", str(output_dir), *COMMON, *flags]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory):
    return train(tmp_path_factory.mktemp("single") / "out", 1, "--micro_batch_size", "4")


@pytest.mark.parametrize("engine", [["--fsdp"], []], ids=["fsdp2", "ddp"])
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, single_process_losses, engine):
    losses = train(tmp_path / "out", 2, "--micro_batch_size", "4", *engine)
    assert sorted(losses) == sorted(single_process_losses) == list(range(1, STEPS + 1))
    for step, loss in single_process_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), step


def test_fsdp_run_saves_a_consolidated_model_and_resumes_from_sharded_state(tmp_path):
    first = tmp_path / "first"
    expected = train(first, 2, "--micro_batch_size", "4", "--fsdp")
    assert (first / "model.safetensors").is_file()
    checkpoint = first / f"checkpoint-{STEPS // 2}"
    assert checkpoint.is_dir()
    resumed = train(tmp_path / "resumed", 2, "--micro_batch_size", "4", "--fsdp",
                    "--resume_from_checkpoint", str(checkpoint))
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), step
