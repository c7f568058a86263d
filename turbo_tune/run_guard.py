"""Stopping a run on purpose, at a step boundary and on every rank at once.

- SIGTERM (a scheduler's preemption notice) or SIGINT (Ctrl-C): the handler only notes the signal; at the end of the
  current optimizer step the ranks agree on it, save a resumable checkpoint together and stop. Further signals while
  that happens are ignored, so the save finishes (SIGKILL still ends the process, and the staged checkpoints of
  turbo_tune/checkpoints.py leave nothing partial behind).
- Divergence: a loss or gradient norm that stays non-finite for `--max_nonfinite_steps` steps stops the run; a
  gradient norm that stays exactly 0 (a dead model, often after a blow-up) is warned about.

The ranks agree through one small all_reduce per step. `finish` turns the outcome into `RunStopped`, which
qwen3_sft.py prints as one line and exits with, after marking the MLflow run KILLED or FAILED.
"""

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from turbo_tune.checkpoints import last_complete_checkpoint
from turbo_tune.errors import RunStopped
from turbo_tune.tracking import reporting_run_id

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DIVERGED_EXIT_CODE = 3
ZERO_GRAD_WARN_STEPS = 10


class RunGuard(TrainerCallback):
    def __init__(self, max_nonfinite_steps: int) -> None:
        self.max_nonfinite_steps = max_nonfinite_steps
        self.received_signal = 0  # written by the signal handler, and nothing else is done there
        self.stop_signal = 0  # the signal all ranks agreed to stop on
        self.nonfinite_steps = 0
        self.first_nonfinite_step = 0
        self.diverged_at = 0
        self.zero_grad_steps = 0
        self.learning_rate: float | None = None
        self.mlflow_run_id: str | None = None
        self._loss_nonfinite: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | float | None = None

    @contextmanager
    def catching_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT only request a stop while training and the final save run."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        previous = {signum: signal.signal(signum, self._note_signal) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _note_signal(self, signum: int, frame: object) -> None:
        self.received_signal = self.received_signal or signum

    def observe_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss, kept on its device (no sync) until the step ends."""
        nonfinite = ~torch.isfinite(loss.detach()).all()
        self._loss_nonfinite = nonfinite if self._loss_nonfinite is None else self._loss_nonfinite | nonfinite

    def observe_grad_norm(self, grad_norm: torch.Tensor | float | None) -> None:
        """The step's global gradient norm (under FSDP2 a DTensor, made whole here on every rank)."""
        self._grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.learning_rate = args.learning_rate
        self.mlflow_run_id = reporting_run_id(args, state)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, optimizer=None, **kwargs
    ) -> None:
        skipped = bool(getattr(optimizer, "step_was_skipped", False))  # fp16 loss scaling skips overflowing steps
        signum, loss_nonfinite, grad_nonfinite, grad_norm = self._agree(args.device, skipped)
        if signum:
            self.stop_signal = int(signum)
            logger.warning(
                "%s received: saving a checkpoint at step %d and stopping.",
                signal.Signals(self.stop_signal).name, state.global_step,
            )
            control.should_save = True
            control.should_training_stop = True
        self._watch_divergence(state, control, loss_nonfinite, grad_nonfinite, grad_norm)
        self._watch_zero_gradient(state, grad_norm)

    def _agree(self, device: torch.device, skipped: bool) -> tuple[int, bool, bool, float]:
        """This step's signal and numerics, the same on every rank: (signal, loss non-finite on any rank,
        gradient norm non-finite and not skipped, gradient norm)."""
        norm = torch.as_tensor(1.0 if self._grad_norm is None else self._grad_norm, dtype=torch.float32)
        loss_nonfinite = self._loss_nonfinite if self._loss_nonfinite is not None else torch.tensor(False)
        norm, loss_nonfinite = norm.to(device), loss_nonfinite.to(device)
        flags = torch.stack([
            torch.tensor(float(self.received_signal), device=device),
            loss_nonfinite.float(),
            (~torch.isfinite(norm)).float() * (not skipped),
            torch.nan_to_num(norm, nan=float("inf")),  # the global norm: equal on all ranks, so MAX keeps it
        ])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self._loss_nonfinite = self._grad_norm = None
        signum, loss_flag, grad_flag, _ = flags.tolist()
        grad_norm = norm.item()
        return int(signum), bool(loss_flag), bool(grad_flag), grad_norm

    def _watch_divergence(
        self, state: TrainerState, control: TrainerControl, loss_nonfinite: bool, grad_nonfinite: bool,
        grad_norm: float,
    ) -> None:
        if not (loss_nonfinite or grad_nonfinite):
            self.nonfinite_steps = 0
            return
        self.nonfinite_steps += 1
        if self.nonfinite_steps == 1:
            self.first_nonfinite_step = state.global_step
            what = "loss and gradient norm" if loss_nonfinite and grad_nonfinite else (
                "loss" if loss_nonfinite else "gradient norm")
            stop = (f"the run stops after {self.max_nonfinite_steps} such steps in a row (--max_nonfinite_steps)"
                    if self.max_nonfinite_steps else "--max_nonfinite_steps 0: the run goes on")
            logger.warning("Step %d: the %s is not finite (grad_norm %s); %s.", state.global_step, what, grad_norm,
                           stop)
        if self.max_nonfinite_steps and self.nonfinite_steps >= self.max_nonfinite_steps:
            self.diverged_at = state.global_step
            control.should_training_stop = True

    def _watch_zero_gradient(self, state: TrainerState, grad_norm: float) -> None:
        self.zero_grad_steps = self.zero_grad_steps + 1 if grad_norm == 0 else 0
        if self.zero_grad_steps == ZERO_GRAD_WARN_STEPS:
            logger.warning(
                "The gradient norm has been exactly 0 for %d steps (since step %d): the model no longer learns. "
                "This usually follows a loss blow-up from too high a learning rate (--learning_rate %g); "
                "check the loss history and start again with a lower one.",
                ZERO_GRAD_WARN_STEPS, state.global_step - ZERO_GRAD_WARN_STEPS + 1, self.learning_rate,
            )

    def finish(self, state: TrainerState, output_dir: str, weights_finite: bool) -> None:
        """Raise RunStopped unless training ran to its last step with finite weights, so the final model may be
        written; a signal that arrives after the last step changes nothing."""
        if self.diverged_at:
            self.mark_mlflow_run("FAILED")
            raise RunStopped(
                f"training diverged: the loss or gradient norm was not finite for {self.nonfinite_steps} steps in a "
                f"row (steps {self.first_nonfinite_step}-{self.diverged_at}, --max_nonfinite_steps "
                f"{self.max_nonfinite_steps}); no final model written. {last_finite_checkpoint(output_dir)} Start "
                f"again with a lower --learning_rate (this run: {self.learning_rate:g}).",
                DIVERGED_EXIT_CODE,
            )
        if self.stop_signal and state.global_step < state.max_steps:
            self.mark_mlflow_run("KILLED")
            name = signal.Signals(self.stop_signal).name
            checkpoint = Path(output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint == last_complete_checkpoint(output_dir):
                saved = f"{checkpoint} written"
            else:
                saved = f"no checkpoint written at this step (weights not finite). {last_finite_checkpoint(output_dir)}"
            raise RunStopped(
                f"stopped by {name} at step {state.global_step} of {state.max_steps}; {saved}. Resume with the same "
                f"command and flags plus: --output_dir {output_dir} --resume_from_checkpoint last",
                128 + self.stop_signal,
            )
        if not weights_finite:
            self.mark_mlflow_run("FAILED")
            raise RunStopped(
                f"the trained weights are not finite (NaN or inf): no final model written to {output_dir}. "
                f"{last_finite_checkpoint(output_dir)}",
                DIVERGED_EXIT_CODE,
            )

    def mark_mlflow_run(self, status: str) -> None:
        """End this run's MLflow run as KILLED or FAILED (transformers' callback may already have ended it as
        FINISHED); a tracking server's failure is logged, never raised over why the run stopped."""
        if self.mlflow_run_id is None:
            return
        try:
            import mlflow

            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.mlflow_run_id:
                mlflow.end_run(status=status)
            else:
                mlflow.MlflowClient().set_terminated(self.mlflow_run_id, status=status)
        except Exception as error:  # any MLflow or network error
            logger.warning("Could not mark MLflow run %s as %s: %s", self.mlflow_run_id, status, error)


def last_finite_checkpoint(output_dir: str) -> str:
    """A sentence naming it: only checkpoints with finite weights are written (TurboSFTTrainer._save_checkpoint)."""
    checkpoint = last_complete_checkpoint(output_dir)
    if checkpoint is None:
        return "No checkpoint with finite weights was written."
    return f"The last checkpoint with finite weights is {checkpoint}."
