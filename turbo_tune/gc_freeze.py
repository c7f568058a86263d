"""Python's garbage collector, kept off what a run builds once.

A compiled, autotuned model leaves millions of long-lived Python objects behind (Dynamo's and Inductor's graphs and
guards, Triton's kernels and configs, the modules and their parameters). Each full collection walks all of them:
0.67 s on the H200 host for a full-depth Qwen3-30B-A3B with LoRA and ``--torch_compile``, once every eight steps
of 0.7 s or so (docs/results.md). So once the first optimizer step has built them (and again after each evaluation,
which compiles its own graphs), everything alive is collected once and then frozen (``gc.freeze``): later full
collections walk only what the run made since. Objects that are freed by reference counting, such as the
tensors of a step, are freed as before; only reference cycles among the frozen objects would outlive their use,
and the collection just before each freeze leaves none that are already garbage. The end of training unfreezes
them, so that a process that trains twice (a notebook, the tests) does not keep the first run's objects.
"""

import gc
import logging
import time

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def collect_and_freeze() -> float:
    """Collect all garbage, then move every object still alive out of the collector's reach; returns the seconds
    the collection took."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - start


class GcFreezeCallback(TrainerCallback):
    """``--gc_freeze``: collect and freeze after the first optimizer step and after each evaluation."""

    def __init__(self) -> None:
        self.frozen_after_first_step = False

    @staticmethod
    def _freeze(when: str) -> None:
        seconds = collect_and_freeze()
        logger.info("--gc_freeze: %s, %d Python objects frozen (collection %.2f s).", when, gc.get_freeze_count(),
                    seconds)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if not self.frozen_after_first_step:
            self.frozen_after_first_step = True
            self._freeze("after the first optimizer step")

    def on_evaluate(self, args, state, control, **kwargs) -> None:
        self._freeze("after an evaluation")

    def on_train_end(self, args, state, control, **kwargs) -> None:
        gc.unfreeze()
