"""Full-parameter numerics: master weights stay fp32 unless something else keeps them, and the ScatterMoE experts
compute in the autocast dtype from fp32 weights, as nn.Linear does."""

import logging
from types import SimpleNamespace

import pytest
import torch

from monkey_patch import fast_moe
from turbo_tune.modeling import describe_precision, weight_dtype

BF16, FP32 = torch.bfloat16, torch.float32


def flags(**overrides) -> SimpleNamespace:
    defaults = dict(model_dtype="auto", bf16=True, fp16=False, use_lora=False, deepspeed=None, fsdp=[],
                    use_fast_moe_block=True)
    return SimpleNamespace(**{**defaults, **overrides})


@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, FP32),  # one GPU or DDP: nothing else would keep fp32 masters
    ({"use_lora": True}, BF16),  # the base is frozen; peft keeps the adapters fp32
    ({"deepspeed": "config/zero2.json"}, BF16),  # DeepSpeed's optimizer keeps fp32 masters
    ({"fsdp": ["full_shard"]}, BF16),  # FSDP2 keeps its sharded parameters fp32
    ({"bf16": False}, FP32),  # the CPU
    ({"model_dtype": "bfloat16"}, BF16),
])
def test_weights_load_in_fp32_where_nothing_else_keeps_fp32_master_weights(overrides, expected):
    assert weight_dtype(flags(**overrides)) == expected


def test_bf16_full_parameter_weights_by_request_are_warned_about():
    config = flags(model_dtype="bfloat16")
    level, message = describe_precision(config, weight_dtype(config))
    assert level == logging.WARNING and "updates smaller than half a bf16 step are lost" in message
    assert describe_precision(flags(), FP32) == (logging.INFO, "Master weights in torch.float32, compute in bf16 "
                                                 "(autocast where it differs).")


def test_fp32_master_weights_on_transformers_experts_warn_that_they_compute_in_fp32():
    """transformers' grouped_mm casts its input to the weights' dtype outside autocast: fp32 experts, 2.8x slower."""
    level, message = describe_precision(flags(use_fast_moe_block=False), FP32)
    assert level == logging.WARNING and "--use_fast_moe_block" in message and "--model_dtype bfloat16" in message
    assert describe_precision(flags(use_fast_moe_block=False, bf16=False), FP32)[0] == logging.INFO


def test_experts_compute_in_the_autocast_dtype_and_fp32_weights_get_fp32_gradients(monkeypatch):
    """What scattermoe receives under bf16 autocast from fp32 weights (the kernels' bf16 numerics are the GPU
    gate's): bf16 activations and weights; the gradients reach the fp32 weights in fp32."""
    seen = {}

    def recording_op(x, w_gate_up, w_down, *rest):
        seen.update(x=x.dtype, w_gate_up=w_gate_up.dtype, w_down=w_down.dtype)
        return x * (w_gate_up.sum() + w_down.sum())

    monkeypatch.setattr(fast_moe, "scattermoe_experts", recording_op)
    experts = torch.nn.Module()
    experts.gate_up_proj = torch.nn.Parameter(torch.randn(4, 16, 8))
    experts.down_proj = torch.nn.Parameter(torch.randn(4, 8, 8))
    hidden = torch.randn(5, 8)
    index, weights = torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    with torch.autocast("cpu", dtype=BF16):
        out = fast_moe.scattermoe_experts_forward(experts, hidden, index, weights)
    out.float().sum().backward()
    assert seen == {"x": BF16, "w_gate_up": BF16, "w_down": BF16}
    assert experts.gate_up_proj.grad.dtype == FP32 and experts.down_proj.grad.dtype == FP32


def test_lora_adapters_train_in_fp32_on_a_bf16_base(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from turbo_tune.arguments import parse_config
    from turbo_tune.modeling import EMBEDDED_MODEL_DIR, apply_lora

    config = parse_config(["--use_lora", "--output_dir", str(tmp_path), "--report_to", "none"])
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(EMBEDDED_MODEL_DIR), dtype=BF16)
    model = apply_lora(model, config)
    trained = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    assert any("experts" in name for name in trained) and any("q_proj" in name for name in trained)
    assert set(trained.values()) == {FP32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {BF16}
