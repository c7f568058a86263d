"""Checkpoint folders that are either complete or absent, and a final model that is either complete or known not to be.

The Trainer writes a checkpoint into `OUTPUT_DIR/.checkpoint-in-progress/checkpoint-N` and it is renamed to
`OUTPUT_DIR/checkpoint-N` once every rank has finished writing (monkey_patch/sft_trainer.py), so a run killed while
saving leaves no partial `checkpoint-N` for `--resume_from_checkpoint last` to pick. A rename within one folder is
atomic on POSIX file systems, and the staging folder does not match transformers' `checkpoint-*` rotation glob.
The final model is staged the same way, in `OUTPUT_DIR/.final-model-in-progress`, so no partly written weights ever
sit in OUTPUT_DIR.
"""

import json
import logging
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

STAGING_DIR = ".checkpoint-in-progress"
FINAL_STAGING_DIR = ".final-model-in-progress"
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last, so older unstaged checkpoints lack it if cut off


def staging_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / STAGING_DIR


def publish(staged: Path, final: Path) -> None:
    """Move a completely written checkpoint into place, replacing a folder of the same step (a re-run from an
    earlier checkpoint saves the same steps again)."""
    if final.exists():
        replaced = staged.with_name(f"{staged.name}.replaced")
        final.rename(replaced)
        staged.rename(final)
        shutil.rmtree(replaced)
    else:
        staged.rename(final)


def publish_final_model(staged: Path, output_dir: Path) -> None:
    """Move a completely written final model's files into the run folder. The run's own trainer_state.json, written
    after this (qwen3_sft.train), is what marks the final model complete: a run killed before it has none there."""
    for entry in staged.iterdir():
        target = output_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        entry.replace(target)
    staged.rmdir()


def holds_trainer_state(folder: str | Path) -> bool:
    """The Trainer's state is written last: in a checkpoint, once its save is complete; in the run folder, once the
    final model is (qwen3_sft.train)."""
    return (Path(folder) / TRAINER_STATE).is_file()


def checkpoint_step(path: Path) -> int | None:
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    suffix = path.name[len(prefix):]
    return int(suffix) if path.name.startswith(prefix) and suffix.isdigit() and path.is_dir() else None


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest `checkpoint-N` of a run that holds its trainer state; incomplete ones are named and skipped."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = {path: step for path in output_dir.iterdir() if (step := checkpoint_step(path)) is not None}
    for path in sorted(steps, key=steps.get, reverse=True):
        if holds_trainer_state(path):
            return path
        logger.warning("%s has no %s: its save was interrupted; skipped.", path, TRAINER_STATE)
    return None


def saved_progress(checkpoint: str | Path) -> tuple[int, int]:
    """(global step, max steps) of the run when the checkpoint was written."""
    state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
    return state["global_step"], state["max_steps"]
