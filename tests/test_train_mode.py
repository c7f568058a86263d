"""turbo_tune.train_mode: Trainer.training_step's model.train() skipped only while it would change nothing."""

from torch import nn

from turbo_tune.train_mode import TrainingModules, train_call_skipped


def model_in_training() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Dropout(0.1), nn.Linear(4, 2))).train()


def test_train_call_does_nothing_while_every_module_trains_and_the_method_comes_back_after():
    model, modules = model_in_training(), TrainingModules()
    with train_call_skipped(model, modules):
        assert "train" in model.__dict__
        assert model.train() is model
    assert "train" not in model.__dict__ and model.train is not None
    assert all(module.training for module in model.modules())


def test_a_module_left_in_eval_mode_gets_the_full_walk():
    model, modules = model_in_training(), TrainingModules()
    with train_call_skipped(model, modules):
        pass  # the list is made
    model[1][0].eval()  # e.g. by an evaluation loop, or by hand
    with train_call_skipped(model, modules):
        assert "train" not in model.__dict__
        model.train()
    assert all(module.training for module in model.modules())


def test_a_module_registered_after_the_list_was_made_is_checked_too():
    model, modules = model_in_training(), TrainingModules()
    with train_call_skipped(model, modules):
        pass
    model[1].add_module("late", nn.Linear(2, 2).eval())
    with train_call_skipped(model, modules):
        model.train()
    assert model[1].late.training


def test_eval_inside_the_context_still_switches_every_module():
    model, modules = model_in_training(), TrainingModules()
    with train_call_skipped(model, modules):
        model.train(False)
    assert not any(module.training for module in model.modules())


def test_a_module_with_its_own_train_method_keeps_the_walk():
    calls = []

    class Counting(nn.Linear):
        def train(self, mode: bool = True) -> nn.Module:
            calls.append(mode)
            return super().train(mode)

    model, modules = nn.Sequential(Counting(2, 2)).train(), TrainingModules()
    calls.clear()
    with train_call_skipped(model, modules):
        model.train()
    assert calls == [True]


def test_slicing_a_module_list_registers_no_new_module():
    """transformers' forward runs ``self.layers[:n]``, a new ModuleList of the same layers, every step."""
    model, modules = nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])).train(), TrainingModules()
    with train_call_skipped(model, modules):
        pass
    listed = modules.modules
    assert len(model[0][:1]) == 1
    with train_call_skipped(model, modules):
        assert "train" in model.__dict__
    assert modules.modules is listed  # not made again
