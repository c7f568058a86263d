"""MLflow against a real tracking server on 127.0.0.1: an unreachable one stops the run at once, one that dies
mid-run costs neither the run nor the final model, and a resumed run continues its MLflow run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import qwen3_sft
from turbo_tune.tracking import RUN_FILE

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--bundled_examples", "64", "--logging_steps", "1", "--gradient_checkpointing", "false"]
QUICK_CLIENT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TrackingServer:
    """`mlflow server` with an SQLite store, in its own process group so that stopping it stops its workers."""

    def __init__(self, folder: Path) -> None:
        self.uri = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--default-artifact-root", str(folder / "artifacts"), "--host", "127.0.0.1",
             "--port", self.uri.rsplit(":", 1)[1], "--workers", "1"],
            env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while not self.answers():
            assert self.process.poll() is None and time.monotonic() < deadline, "the tracking server did not start"
            time.sleep(0.5)

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", int(self.uri.rsplit(":", 1)[1])), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)


@pytest.fixture
def tracking_server(tmp_path):
    server = TrackingServer(tmp_path)
    yield server
    server.stop()


def mlflow_env(monkeypatch, uri: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "outages")


def test_unreachable_tracking_server_stops_the_run_before_the_model_loads(tmp_path, monkeypatch, capsys):
    mlflow_env(monkeypatch, f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(qwen3_sft, "load_model", lambda config: pytest.fail("the model loaded first"))
    started = time.monotonic()
    assert qwen3_sft.main(["--output_dir", str(tmp_path / "run"), *SHORT]) == 2
    assert time.monotonic() - started < 20
    err = capsys.readouterr().err
    assert "MLFLOW_TRACKING_URI http://127.0.0.1:" in err and "does not answer" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_resumed_run_continues_its_mlflow_run_named_after_the_output_folder(tmp_path, monkeypatch, tracking_server):
    mlflow_env(monkeypatch, tracking_server.uri)
    output_dir = tmp_path / "sft-resume"
    assert qwen3_sft.main(["--output_dir", str(output_dir), "--max_steps", "2", "--save_steps", "2", *SHORT]) == 0
    run_id = json.loads((output_dir / RUN_FILE).read_text())["run_id"]
    assert qwen3_sft.main(["--output_dir", str(output_dir), "--max_steps", "4", "--save_steps", "2", *SHORT,
                           "--resume_from_checkpoint", str(output_dir / "checkpoint-2")]) == 0
    for name, value in QUICK_CLIENT.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(tracking_server.uri)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("outages").experiment_id])
    assert mlflow_run.info.run_id == run_id and mlflow_run.info.run_name == "sft-resume"
    assert mlflow_run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4]


def test_tracking_server_dying_mid_run_costs_neither_the_run_nor_the_final_model(tmp_path, tracking_server):
    output_dir = tmp_path / "run"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server.uri, "MLFLOW_EXPERIMENT_NAME": "outages"}
    run = subprocess.Popen(
        [sys.executable, str(ROOT / "qwen3_sft.py"), "--output_dir", str(output_dir), "--max_steps", "30", *SHORT],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (output_dir / RUN_FILE).is_file():  # written once the MLflow run has started
            assert run.poll() is None and time.monotonic() < deadline, "the run did not start its MLflow run"
            time.sleep(0.05)
        tracking_server.stop()
        killed = time.monotonic()
        _, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, stderr[-3000:]
    assert time.monotonic() - killed < 120
    assert (output_dir / "model.safetensors").is_file()
    assert stderr.count("MLflow failed while logging step") == 1
    assert "Traceback" not in stderr
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 30
