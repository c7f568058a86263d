"""A run stopped on purpose or by accident: signals, SIGKILL in the middle of a save, diverging numerics.

Real runs of qwen3_sft.py, in a subprocess wherever a signal is sent. The exact resume of a signal's checkpoint is in
test_training.py, next to the uninterrupted run it is compared with.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import qwen3_sft
from distributed_runs import COMMON, ROOT, ZERO2, finish, start, wait_for_line, worker_pid

SHORT = ["--bundled_examples", "64", "--logging_steps", "1", "--gradient_checkpointing", "false",
         "--report_to", "none"]

# Runs qwen3_sft.main with a save that dies by SIGKILL at step 2 once the weights and optimizer are written.
KILLED_WHILE_SAVING = """
import os, signal, sys
import qwen3_sft
from monkey_patch.sft_trainer import TurboSFTTrainer

save_optimizer = TurboSFTTrainer._save_optimizer_and_scheduler

def save_optimizer_then_die(self, output_dir):
    save_optimizer(self, output_dir)
    if self.state.global_step == 2:
        os.kill(os.getpid(), signal.SIGKILL)

TurboSFTTrainer._save_optimizer_and_scheduler = save_optimizer_then_die
sys.exit(qwen3_sft.main(sys.argv[1:]))
"""


def checkpoints(output_dir: Path) -> list[str]:
    return sorted(path.name for path in output_dir.glob("checkpoint-*"))


def stop_step(output: str, signal_name: str, max_steps: int) -> int:
    match = re.search(rf"qwen3_sft.py: stopped by {signal_name} at step (\d+) of {max_steps}; ", output)
    assert match, output[-3000:]
    return int(match[1])


def test_sigint_again_while_saving_leaves_one_complete_checkpoint_and_exits_130(tmp_path):
    output_dir = tmp_path / "out"
    process = start("--output_dir", str(output_dir), *SHORT, "--max_steps", "200", "--save_steps", "1000")
    output = wait_for_line(process, "'loss'")
    process.send_signal(signal.SIGINT)
    output += wait_for_line(process, "SIGINT received: saving a checkpoint")
    process.send_signal(signal.SIGINT)  # Ctrl-C again, and torchrun forwarding the terminal's one
    process.send_signal(signal.SIGINT)
    returncode, rest = finish(process)
    output += rest
    assert returncode == 128 + signal.SIGINT, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    step = stop_step(output, "SIGINT", 200)
    assert checkpoints(output_dir) == [f"checkpoint-{step}"]
    checkpoint = output_dir / f"checkpoint-{step}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert (checkpoint / name).is_file(), name
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / ".checkpoint-in-progress").exists()


def test_sigkill_while_saving_leaves_no_partial_checkpoint_and_resume_takes_the_last_complete(tmp_path, capsys):
    output_dir = tmp_path / "out"
    flags = ["--output_dir", str(output_dir), *SHORT, "--max_steps", "3", "--save_steps", "1"]
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, *flags], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert checkpoints(output_dir) == ["checkpoint-1"]  # checkpoint-2 was being written: it never appears

    assert qwen3_sft.main([*flags, "--resume_from_checkpoint", "last"]) == 0
    assert f"Resuming from {output_dir / 'checkpoint-1'}." in capsys.readouterr().err
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 3
    assert checkpoints(output_dir) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not (output_dir / ".checkpoint-in-progress").exists()


def test_divergence_stops_the_run_keeps_the_finite_checkpoints_and_writes_no_final_model(tmp_path, capsys):
    """The issue's reproduction: at learning rate 1e8 the gradient norm turns NaN within a few steps."""
    output_dir = tmp_path / "out"
    flags = ["--output_dir", str(output_dir), *SHORT, "--learning_rate", "1e8", "--max_steps", "10", "--save_steps",
             "1"]
    assert qwen3_sft.main(flags) == 3
    out, err = capsys.readouterr()
    assert "'loss': 'nan'" in out and "'loss': '0'" not in out  # logged as what it is
    kept = checkpoints(output_dir)
    assert kept and f"The last checkpoint with finite weights is {output_dir / kept[-1]}." in err
    assert "qwen3_sft.py: training diverged: the loss or gradient norm was not finite for 3 steps in a row" in err
    for name in kept:
        for tensor in load_file(output_dir / name / "model.safetensors").values():
            assert torch.isfinite(tensor).all(), name
    assert not (output_dir / "model.safetensors").exists()


def test_with_max_nonfinite_steps_0_the_run_goes_on_but_writes_no_final_model_from_nan_weights(tmp_path, capsys):
    output_dir = tmp_path / "out"
    flags = ["--output_dir", str(output_dir), *SHORT, "--learning_rate", "1e8", "--max_steps", "6", "--save_steps",
             "100", "--max_nonfinite_steps", "0"]
    assert qwen3_sft.main(flags) == 3
    err = capsys.readouterr().err
    assert "Step 6: the weights are not finite; checkpoint-6 not written" in err  # trained to the last step
    assert "qwen3_sft.py: the trained weights are not finite (NaN or inf): no final model written" in err
    assert not (output_dir / "model.safetensors").exists()


def test_a_model_whose_gradient_vanishes_after_a_blow_up_is_warned_about(tmp_path, capsys):
    """At learning rate 1e3 the loss jumps to ~1e7 and then the gradient norm stays exactly 0."""
    flags = ["--output_dir", str(tmp_path / "out"), *SHORT, "--learning_rate", "1e3", "--max_steps", "16",
             "--save_steps", "100"]
    assert qwen3_sft.main(flags) == 0
    assert "The gradient norm has been exactly 0 for 10 steps" in capsys.readouterr().err


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(tmp_path, checkpoint):
    """Two processes under ZeRO-2; only rank 1 gets the signal: the ranks agree at the step's end, each writes its
    optimizer shard into the same checkpoint, and the run exits non-zero with rank 0's resume line."""
    output_dir = tmp_path / "out"
    process = start("--output_dir", str(output_dir), "--model_path", str(checkpoint), *COMMON, *ZERO2,
                    "--max_steps", "100", "--save_steps", "1000", processes=2)
    output = wait_for_line(process, "'loss'")
    worker = worker_pid(process, rank=1)
    os.kill(worker, signal.SIGTERM)
    returncode, rest = finish(process)
    output += rest
    assert returncode != 0
    step = stop_step(output, "SIGTERM", 100)
    assert checkpoints(output_dir) == [f"checkpoint-{step}"]
    saved = output_dir / f"checkpoint-{step}"
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == step
    assert len(list((saved / f"global_step{step}").glob("*optim_states.pt"))) == 2
    assert not (output_dir / "model.safetensors").exists()
