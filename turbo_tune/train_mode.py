"""``Trainer.training_step`` calls ``model.train()`` on every micro-batch: a walk through every module that sets
``training`` one ``Module.__setattr__`` at a time. A full-depth Qwen3-30B-A3B with LoRA has 3,561 modules, and the
walk took 7.4-8.4 ms of host time a call (docs/history.md), before the step's first kernel, while the GPU waits.
When every module trains already the walk changes nothing; ``train_call_skipped`` lets a step skip it then.

"Every module" is checked against a list of the model's modules made once and made again after a module that no
list holds was registered anywhere (torch's global registration hook counts them), so a module added later is never
missed; a module removed later is one more flag read. Modules already listed do not count: transformers' forward
slices its ``ModuleList`` of decoder layers, which registers every layer in a new list each time. A module whose
class does more in ``train()`` than set the flags keeps the walk.
"""

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

_listed: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # every module some TrainingModules holds
_registrations = 0  # of modules not in _listed


def _count_registration(module: torch.nn.Module, name: str, submodule: torch.nn.Module | None) -> None:
    global _registrations
    if submodule is not None and submodule not in _listed:
        _registrations += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)

# train() overrides that only set the flags when the mode is unchanged (transformers' recasts kernels on a change)
PLAIN_TRAIN = (torch.nn.Module.train, PreTrainedModel.train)


class TrainingModules:
    """A model's modules, listed once per model and module registration, to tell in a fraction of a millisecond
    whether ``model.train()`` would change anything."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.registrations = -1
        self.modules: list[torch.nn.Module] = []
        self.plain = False

    def all_training(self, model: torch.nn.Module) -> bool:
        if self.model is not model or self.registrations != _registrations:
            self.model, self.registrations = model, _registrations
            self.modules = list(model.modules())
            _listed.update(self.modules)
            self.plain = all(type(module).train in PLAIN_TRAIN for module in self.modules)
        return self.plain and all(module.training for module in self.modules)


@contextmanager
def train_call_skipped(model: torch.nn.Module, modules: TrainingModules) -> Iterator[None]:
    """Within: ``model.train()`` returns at once when every module of ``model`` trains already (see the module doc)."""
    if not modules.all_training(model):
        yield
        return
    model.train = lambda mode=True: model if mode else type(model).train(model, mode)
    try:
        yield
    finally:
        del model.train
