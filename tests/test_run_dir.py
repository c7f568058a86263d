"""The run folder: one run at a time, checked before the model loads, files readable as the umask says."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import qwen3_sft

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--bundled_examples", "32", "--max_steps", "1", "--report_to", "none", "--gradient_checkpointing",
            "false", "--eval_split", "0"]


def run(output_dir: Path, *flags: str) -> int:
    return qwen3_sft.main(["--output_dir", str(output_dir), *TINY_RUN, *flags])


@pytest.fixture
def no_model_load(monkeypatch):
    """A refusal must come before the model loads."""
    def fail(config):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(qwen3_sft, "load_model", fail)


def test_a_folder_in_use_is_refused_and_a_dead_runs_claim_is_not(tmp_path, capsys, monkeypatch):
    output_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from turbo_tune.run_dir import claim_output_dir; "
         "claim_output_dir(sys.argv[1], False, True); print('claimed', flush=True); time.sleep(300)", str(output_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with monkeypatch.context() as patch:
            patch.setattr(qwen3_sft, "load_model", lambda config: pytest.fail("loaded a model into a folder in use"))
            assert run(output_dir) == 2
        err = capsys.readouterr().err
        assert f"--output_dir {output_dir} is in use by another run (process {holder.pid} on " in err
        assert err.count("\n") == 1
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert run(output_dir) == 0  # the kernel let go of the dead run's lock
    assert (output_dir / "model.safetensors").is_file()


def test_unwritable_output_dir_stops_before_the_model_loads(tmp_path, capsys, no_model_load):
    (tmp_path / "a-file").write_text("")
    assert run(tmp_path / "a-file" / "run") == 2
    err = capsys.readouterr().err
    assert f"--output_dir {tmp_path}/a-file/run: cannot write there (Not a directory)" in err
    assert err.count("\n") == 1


def test_a_refusal_after_the_claim_leaves_no_folder_behind(tmp_path, capsys):
    assert run(tmp_path / "run", "--use_lora", "--lora_target_modules", "nope_proj") == 2
    assert "--lora_target_modules names nope_proj" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_saved_files_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        assert run(tmp_path / "run", "--save_steps", "1") == 0
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".turbo-tune.lock"]
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert "run/model.safetensors" in modes and "run/checkpoint-1/model.safetensors" in modes
    assert set(modes.values()) == {"0o640"}, modes

