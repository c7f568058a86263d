"""--fused_grad_clipping: clipping inside the fused optimizer's step updates exactly like clip_grad_norm_ followed by
the step, skips clip_grad_norm_'s pass, and refuses the setups where something else owns the step's grad_scale."""

import pytest
import torch

from monkey_patch.sft_trainer import TurboSFTTrainer
from tests.numerics import relative_error
from turbo_tune.arguments import parse_config
from turbo_tune.errors import ConfigError
from turbo_tune.grad_clipping import clip_in_step, fused_step_optimizer
from turbo_tune.modeling import load_model, load_tokenizer
from turbo_tune.toy_task import bundled_dataset


def params_with_grads(seed: int, scale: float) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in [(3, 64, 32), (500,), (7, 9)]:  # a stacked-experts-like 3D weight, a vector, a ragged matrix
        param = torch.nn.Parameter(torch.randn(shape, generator=generator))
        param.grad = torch.randn(shape, generator=generator) * scale
        params.append(param)
    return params


@pytest.mark.parametrize("grad_scale", [5.0, 1e-3], ids=["norm-above-max-clipped", "norm-below-max-untouched"])
def test_clip_in_step_updates_like_clip_grad_norm_then_the_step(grad_scale):
    ours, reference = params_with_grads(0, grad_scale), params_with_grads(0, grad_scale)
    ours_opt = torch.optim.AdamW(ours, lr=0.1, fused=True)
    reference_opt = torch.optim.AdamW(reference, lr=0.1, fused=True)
    for step in range(3):
        if step:  # new gradients for the later steps, the same on both sides
            for mine, theirs, fresh in zip(ours, reference, params_with_grads(step, grad_scale), strict=True):
                mine.grad, theirs.grad = fresh.grad.clone(), fresh.grad.clone()
        expected_norm = torch.nn.utils.clip_grad_norm_(reference, max_norm=1.0)
        reference_opt.step()
        norm = clip_in_step(ours_opt, ours, max_norm=1.0)
        ours_opt.step()
        assert norm.item() == pytest.approx(expected_norm.item(), rel=1e-6)
        assert (norm.item() > 1.0) == (grad_scale > 1.0)  # the two cases do what their names say
    for mine, theirs in zip(ours, reference, strict=True):
        assert relative_error(mine.detach(), theirs.detach()) <= 1e-6
        # the first moment is linear in the gradient: a clip that went wrong shows here even where Adam's
        # normalised update would hide a constant factor
        assert relative_error(ours_opt.state[mine]["exp_avg"], reference_opt.state[theirs]["exp_avg"]) <= 1e-6


def test_only_a_fused_optimizer_takes_the_clip():  # the Trainer's accelerate wrapper: the training test below
    params = params_with_grads(0, 1.0)
    fused = torch.optim.AdamW(params, fused=True)
    assert fused_step_optimizer(fused) is fused
    assert fused_step_optimizer(torch.optim.AdamW(params, foreach=True)) is None
    assert fused_step_optimizer(torch.optim.AdamW(params, foreach=False)) is None


@pytest.mark.parametrize(("flags", "named"), [
    (["--optim", "adamw_torch"], "--optim adamw_torch"),
    (["--max_grad_norm", "0"], "--max_grad_norm 0"),
    (["--deepspeed_config", "config/zero2.json"], "--deepspeed_config"),
])
def test_fused_grad_clipping_refuses_setups_where_it_cannot_clip(tmp_path, flags, named):
    with pytest.raises(ConfigError, match=f"--fused_grad_clipping does not work with {named}"):
        parse_config(["--output_dir", str(tmp_path), "--report_to", "none", "--fused_grad_clipping", *flags])


def train_losses(tmp_path, monkeypatch, *flags: str) -> list[tuple[float, float]]:
    config = parse_config(["--output_dir", str(tmp_path), "--report_to", "none", "--eval_split", "0",
                           "--max_steps", "4", "--logging_steps", "1", "--save_strategy", "no",
                           "--max_grad_norm", "0.05", "--optim", "adamw_torch_fused", *flags])
    trainer = TurboSFTTrainer(model=load_model(config), args=config, train_dataset=bundled_dataset(64, seed=0),
                              processing_class=load_tokenizer(config))
    if config.fused_grad_clipping:  # the clip must not take clip_grad_norm_'s pass over the gradients
        monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", lambda *a, **k: pytest.fail("clipped apart"))
    trainer.train()
    return [(e["loss"], e["grad_norm"]) for e in trainer.state.log_history if "loss" in e]


def test_a_run_with_the_clip_in_the_step_trains_like_one_without(tmp_path, monkeypatch):
    expected = train_losses(tmp_path / "apart", monkeypatch)
    losses = train_losses(tmp_path / "fused", monkeypatch, "--fused_grad_clipping")
    assert len(losses) == 4 and all(norm > 0.05 for _, norm in expected)  # every step clipped
    # equal to the digit on the CPU; without the clip, Adam's near scale-invariance still moves the third step's
    # gradient norm by 3e-4 and the fourth step's loss by 4e-3
    for (loss, norm), (expected_loss, expected_norm) in zip(losses, expected, strict=True):
        assert loss == pytest.approx(expected_loss, rel=1e-6)
        assert norm == pytest.approx(expected_norm, rel=1e-6)


def test_an_optimizer_handed_to_the_trainer_that_is_not_fused_is_named_at_the_first_clip(tmp_path):
    config = parse_config(["--output_dir", str(tmp_path), "--report_to", "none", "--eval_split", "0",
                           "--max_steps", "1", "--save_strategy", "no", "--fused_grad_clipping"])
    model = load_model(config)
    trainer = TurboSFTTrainer(model=model, args=config, train_dataset=bundled_dataset(16, seed=0),
                              processing_class=load_tokenizer(config),
                              optimizers=(torch.optim.AdamW(model.parameters(), foreach=False), None))
    with pytest.raises(ConfigError, match="this run's is AdamW: use --optim adamw_torch_fused or drop"):
        trainer.train()
