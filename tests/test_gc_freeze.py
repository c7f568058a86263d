"""--gc_freeze: what a run builds once is frozen out of Python's full collections, and nothing that is already
garbage is frozen with it."""

import gc
import weakref

import pytest
from transformers import TrainerCallback

from turbo_tune.gc_freeze import GcFreezeCallback


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def _frozen(obj) -> bool:
    """Whether ``obj`` sits in the permanent generation (a tracked object the collector's generations do not hold)."""
    return gc.is_tracked(obj) and not any(o is obj for o in gc.get_objects())


@pytest.fixture(autouse=True)
def _unfrozen():
    yield
    gc.unfreeze()


def test_garbage_is_collected_before_the_live_objects_are_frozen():
    garbage, live = _Node(), _Node()
    garbage_ref = weakref.ref(garbage)
    del garbage
    gc.disable()  # so only the callback's collection can free the cycle
    try:
        assert garbage_ref() is not None
        GcFreezeCallback().on_step_end(None, None, None)
    finally:
        gc.enable()
    assert garbage_ref() is None
    assert gc.get_freeze_count() > 0 and _frozen(live)


def test_the_first_step_and_each_evaluation_freeze_and_the_end_of_training_unfreezes(monkeypatch):
    freezes = []
    monkeypatch.setattr("turbo_tune.gc_freeze.collect_and_freeze", lambda: freezes.append(1) or 0.0)
    callback = GcFreezeCallback()
    callback.on_evaluate(None, None, None)  # an evaluation before any step (eval_on_start)
    for _ in range(3):
        callback.on_step_end(None, None, None)
    callback.on_evaluate(None, None, None)
    assert len(freezes) == 3
    gc.freeze()
    callback.on_train_end(None, None, None)
    assert gc.get_freeze_count() == 0


def test_a_training_run_freezes_after_its_first_step_and_unfreezes_at_its_end(tmp_path):
    from monkey_patch.sft_trainer import TurboSFTTrainer
    from turbo_tune.arguments import parse_config
    from turbo_tune.modeling import load_model, load_tokenizer
    from turbo_tune.toy_task import bundled_dataset

    class FreezeCounts(TrainerCallback):
        def __init__(self) -> None:
            self.at_step_begin = []

        def on_step_begin(self, args, state, control, **kwargs) -> None:
            self.at_step_begin.append(gc.get_freeze_count())

    config = parse_config(["--output_dir", str(tmp_path), "--report_to", "none", "--eval_split", "0",
                           "--max_steps", "3", "--save_strategy", "no", "--per_device_train_batch_size", "2"])
    assert config.gc_freeze
    probe = FreezeCounts()
    trainer = TurboSFTTrainer(model=load_model(config), args=config, train_dataset=bundled_dataset(8, seed=0),
                              processing_class=load_tokenizer(config), callbacks=[probe])
    trainer.train()
    assert probe.at_step_begin[0] == 0 and all(count > 0 for count in probe.at_step_begin[1:])
    assert len(probe.at_step_begin) == 3
    assert gc.get_freeze_count() == 0
