"""Pictures of a run, written beside its checkpoints and logged as MLflow run artifacts.

* ``moe_load.png``: a heatmap of each MoE layer's share of routed tokens per expert, at each save (into the checkpoint
  folder, covering the steps since the previous picture) and at the end (into the output folder);
* ``efficiency.png``: tokens/s, MFU, memory and the losses over the steps, from the log history, at the end.

Drawn with matplotlib's object API on its Agg canvas (no display, no global backend switch). A picture or MLflow
failure is logged as a warning and never stops training.
"""

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from turbo_tune.moe_health import ExpertLoadMonitor
from turbo_tune.tracking import reporting_run_id

logger = logging.getLogger(__name__)

MOE_LOAD_PNG = "moe_load.png"
EFFICIENCY_PNG = "efficiency.png"
# Per panel, choices of (title, log keys drawn as lines): the first choice with data in the log history is drawn
EFFICIENCY_PANELS = (
    (("tokens/s (all processes)", ("tokens_per_s",)),),
    (("MFU", ("mfu",)), ("TFLOP/s per device (MFU needs a known GPU peak)", ("tflops_per_device",))),
    (("peak GPU memory, GiB", ("peak_memory_allocated_gib", "peak_memory_reserved_gib")),
     ("peak resident memory, GiB", ("peak_rss_gib",))),
    (("loss", ("loss", "eval_loss")),),
)


def draw_expert_load(shares: np.ndarray, layer_ids: list[int], path: Path, title: str) -> None:
    """Layers × experts heatmap of token shares; white is an even share (1/E), red above it, blue below."""
    layers, experts = shares.shape
    even = 1.0 / experts
    figure = Figure(figsize=(min(6 + experts * 0.1, 20), min(2.5 + layers * 0.3, 16)), layout="constrained")
    axes = figure.add_subplot()
    norm = TwoSlopeNorm(vmin=0.0, vcenter=even, vmax=max(float(shares.max()), 2 * even))
    image = axes.imshow(shares, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    axes.set_xlabel("expert")
    axes.set_ylabel("decoder layer (max/mean load)")
    ratios = shares.max(axis=1) * experts
    axes.set_yticks(range(layers), [f"{layer} ({ratio:.1f}×)" for layer, ratio in zip(layer_ids, ratios, strict=True)])
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label=f"share of routed tokens (even: 1/{experts})")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def draw_efficiency(log_history: list[dict], path: Path) -> None:
    """One panel per EFFICIENCY_PANELS entry, against the optimizer step; a panel with no data says so."""
    def series(key: str) -> list[tuple[int, float]]:
        return [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]

    figure = Figure(figsize=(10, 7), layout="constrained")
    for index, choices in enumerate(EFFICIENCY_PANELS, start=1):
        axes = figure.add_subplot(2, 2, index)
        axes.set_xlabel("step")
        title, keys = next(((t, k) for t, k in choices if any(series(key) for key in k)), choices[0])
        axes.set_title(title)
        lines = {key: series(key) for key in keys if series(key)}
        for key, points in lines.items():
            axes.plot(*zip(*points, strict=True), marker="o" if key.startswith("eval_") else None, markersize=3,
                      label=key)
        if lines:
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=axes.transAxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def log_artifact(run_id: str | None, path: Path, artifact_path: str | None = None) -> None:
    """Attach a file to the MLflow run (finished or not); a failure is a warning."""
    if run_id is None:
        return
    try:
        from mlflow import MlflowClient

        MlflowClient().log_artifact(run_id, str(path), artifact_path)
    except Exception as error:  # noqa: BLE001 (MLflow must never stop training)
        logger.warning("Could not log %s to MLflow run %s: %s", path, run_id, error)


class RunPicturesCallback(TrainerCallback):
    """moe_load.png at each save and at the end, efficiency.png at the end (see the module doc)."""

    def __init__(self, expert_load: ExpertLoadMonitor | None) -> None:
        self.expert_load = expert_load
        self.run_id: str | None = None
        self.picture_start_step = 0
        self.last_load: tuple[np.ndarray, str] | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.run_id = reporting_run_id(args, state)
        self.picture_start_step = state.global_step

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self._expert_load_picture(state, folder, artifact_path=folder.name)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self._expert_load_picture(state, Path(args.output_dir), artifact_path=None, final=True)
        if state.is_world_process_zero:
            self._publish(Path(args.output_dir) / EFFICIENCY_PNG, partial(draw_efficiency, state.log_history))

    def _expert_load_picture(self, state: TrainerState, folder: Path, artifact_path: str | None,
                             final: bool = False) -> None:
        if self.expert_load is None:
            return
        shares = self.expert_load.pop_picture_shares()  # collective: every process takes part
        if shares is not None:
            title = f"expert load, steps {self.picture_start_step + 1}–{state.global_step}"
            self.last_load = (shares, title)
            self.picture_start_step = state.global_step
        elif final and self.last_load is not None:
            shares, title = self.last_load  # nothing trained since the last save: the end shows the same stretch
        if shares is None or not state.is_world_process_zero or not folder.is_dir():
            return  # (no folder: a checkpoint not written, its weights not finite; a folder would look like one)
        draw = partial(draw_expert_load, shares, self.expert_load.layer_ids, title=title)
        self._publish(folder / MOE_LOAD_PNG, draw, artifact_path)

    def _publish(self, path: Path, draw: Callable[[Path], None], artifact_path: str | None = None) -> None:
        """draw(path), then attach the picture to the MLflow run."""
        try:
            draw(path)
        except Exception as error:  # noqa: BLE001 (a picture must never stop training)
            logger.warning("Could not draw %s: %s", path, error)
            return
        logger.info("Wrote %s.", path)
        log_artifact(self.run_id, path, artifact_path)
