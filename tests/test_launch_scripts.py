"""The launch scripts users run: they read the environment, print the command, and start a real (short) job."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHORT_RUN = ["--max_steps", "2", "--bundled_examples", "32", "--report_to", "none", "--save_strategy", "no"]


def start(script: str, env: dict[str, str], *args: str, cwd: Path = ROOT) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "DATA_PATH", "DS_CONFIG_PATH")}
    return subprocess.Popen(["bash", str(ROOT / script), *args], env={**clean, **env}, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def launch(script: str, env: dict[str, str], *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    process = start(script, env, *args, cwd=cwd)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("script", ["qwen3_sft.sh", "qwen3_sft_multinode.sh", "tests/run_tests.sh", ".ci/run"])
def test_scripts_are_valid_bash(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_two_launches_in_the_same_second_train_the_embedded_default_into_their_own_folders(tmp_path):
    frozen_clock = tmp_path / "bin"  # a `date` that always answers the same second
    frozen_clock.mkdir()
    (frozen_clock / "date").write_text("#!/bin/sh\necho 20261127-205209\n")
    (frozen_clock / "date").chmod(0o755)
    runs = tmp_path / "runs"
    env = {"CKPT_PREFIX": str(runs), "PATH": f"{frozen_clock}:{os.environ['PATH']}"}
    launches = [start("qwen3_sft.sh", env, *SHORT_RUN) for _ in range(2)]
    for process in launches:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        assert f"+ python qwen3_sft.py --output_dir {runs}/qwen3-sft-20261127-205209" in stderr
    run_dirs = list(runs.iterdir())
    assert len(run_dirs) == 2
    assert all((run_dir / "model.safetensors").is_file() for run_dir in run_dirs)


def test_relative_paths_are_taken_from_the_callers_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jsonl").write_text('{"messages": [{"role": "wizard", "content": "x"}]}\n')
    (tmp_path / "run.yaml").write_text("logging_steps: 1\n")
    result = launch("qwen3_sft.sh", {"DATA_PATH": "data/x.jsonl", "CKPT_PREFIX": "runs"},
                    "--config", "run.yaml", "--output_dir=out", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"--output_dir {tmp_path}/runs/qwen3-sft-" in result.stderr
    assert f"--config {tmp_path}/run.yaml --output_dir={tmp_path}/out" in result.stderr
    assert f"--data_path {tmp_path}/data/x.jsonl, row 1, message 1: unknown role 'wizard'" in result.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the interpreter is the CPU's path")
def test_fast_moe_block_trains_on_a_cpu_without_triton_interpret_in_the_environment(tmp_path):
    """qwen3_sft.py turns Triton's interpreter on before anything imports triton; set later, Triton's own helpers
    stay compiled and the first kernel fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "qwen3_sft.py"), "--output_dir", str(tmp_path / "run"),
                             "--use_fast_moe_block", "--max_length", "64", "--eval_split", "0", *SHORT_RUN],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the Triton kernels run in the interpreter" in result.stderr


def test_single_node_script_passes_paths_from_the_environment(tmp_path):
    result = launch("qwen3_sft.sh", {"CKPT_PREFIX": str(tmp_path), "DS_CONFIG_PATH": str(tmp_path / "zero9.json")})
    assert result.returncode == 2
    assert f"--deepspeed_config (DS_CONFIG_PATH) {tmp_path}/zero9.json does not exist" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_multinode_script_requires_the_master_address():
    result = launch("qwen3_sft_multinode.sh", {"MASTER_ADDR": "", "MASTER_PORT": "29500"})
    assert result.returncode != 0 and "set MASTER_ADDR" in result.stderr


def test_multinode_script_runs_torchrun_with_the_rendezvous(tmp_path):
    port = str(free_port())
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NNODES": "1", "NODE_RANK": "0", "GPUS_PER_NODE": "1",
           "CKPT_PREFIX": "runs", "RUN_NAME": "job1"}
    result = launch("qwen3_sft_multinode.sh", env, *SHORT_RUN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"+ python -m turbo_tune.torchrun --nnodes 1 --node_rank 0 --nproc_per_node 1 --master_addr 127.0.0.1 "
            f"--master_port {port} qwen3_sft.py --output_dir {tmp_path}/runs/job1") in result.stderr
    assert (tmp_path / "runs" / "job1" / "model.safetensors").is_file()


def test_no_venv_mode_runs_the_python3_on_path_and_creates_no_venv(tmp_path):
    venv = tmp_path / "venv"
    env = {"TURBO_TUNE_NO_VENV": "1", "TURBO_TUNE_VENV": str(venv), "CKPT_PREFIX": str(tmp_path / "runs"),
           "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}  # stands in for an image with the requirements
    result = launch("qwen3_sft.sh", env, "--model_dtype", "float13")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"+ python3 qwen3_sft.py --output_dir {tmp_path}/runs/qwen3-sft-" in result.stderr
    assert "--model_dtype 'float13' is not one of" in result.stderr
    assert not venv.exists()


def test_distributed_worker_exit_runs_exit_handlers_and_keeps_the_exit_code(tmp_path):
    """exit_now skips interpreter finalization (where Gloo's threads crashed finished runs), not what exit does
    before it: the atexit handlers (MLflow, logging, temporary files) run and buffered output is written."""
    marker = tmp_path / "handler-ran"
    script = (
        "import atexit, pathlib, qwen3_sft\n"
        f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
        "print('buffered', end='')\n"
        "qwen3_sft.exit_now(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout.endswith("buffered") and marker.read_text() == "yes"
