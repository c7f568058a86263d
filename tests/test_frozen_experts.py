"""--fp8_frozen_experts: LoRA's frozen expert weights stored in FP8 with per-row scales (Triton interpreter on CPU)."""

import re
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch.utils.checkpoint import checkpoint

from monkey_patch import apply_peft_patches, revert_patches
from monkey_patch.fast_moe import ACTIVE_LORA, apply_fast_moe_block
from monkey_patch.frozen_experts import (
    FP8,
    apply_fp8_frozen_experts,
    fp8_scale,
    quantize_rowwise,
    revert_fp8_frozen_experts,
)
from monkey_patch.scattermoe import compilable_ops, kernels
from monkey_patch.scattermoe.compilable_ops import dequantize, scattermoe_experts
from monkey_patch.scattermoe.ops import LowRank
from tests.test_expert_lora import lora_model, loss_and_lora_grads, routing
from tests.test_fast_moe import DEVICE, batch, relative_error, tiny_model
from turbo_tune.arguments import parse_config
from turbo_tune.errors import ConfigError

FP8_ROUNDING = 0.05  # e4m3 keeps 3 mantissa bits: at most 2^-4 relative per value, ~2-3 % in norm


def experts_of(model: PeftModel, layer: int = 0) -> torch.nn.Module:
    return model.base_model.model.model.layers[layer].mlp.experts


def test_rowwise_quantization_rounds_each_row_to_fp8_precision_and_keeps_zero_rows():
    torch.manual_seed(0)
    weight = torch.randn(4, 24, 40) * torch.logspace(-3, 1, 24)[None, :, None]  # rows of very different scale
    weight[1, 5] = 0
    quantized, scale = quantize_rowwise(weight)
    assert quantized.dtype == FP8 and scale.shape == (4, 24, 1)
    restored = dequantize(quantized, scale, torch.float32)
    assert (restored[1, 5] == 0).all()
    row_errors = (restored - weight).norm(dim=-1) / weight.norm(dim=-1).clamp_min(1e-30)
    assert row_errors[weight.norm(dim=-1) > 0].max() <= FP8_ROUNDING  # per row: the scale follows each row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 17, 45), (2, 700, 3), (1, 1, 1)], ids=["ragged", "many-short-rows", "one"])
def test_dequantize_kernel_rounds_fp8_times_row_scale_once_like_torch(shape, dtype):
    quantized, scale = quantize_rowwise(torch.randn(shape) * torch.logspace(-2, 2, shape[1])[None, :, None])
    expected = (quantized.float() * scale).to(dtype)
    actual = kernels.dequantize_rows(quantized.to(DEVICE), scale.to(DEVICE), dtype)
    assert actual.dtype == dtype and actual.shape == quantized.shape
    # fp32: exact. bf16: one rounding, to nearest on a GPU; Triton's CPU interpreter truncates, so up to one ulp.
    one_ulp = 2.0**-7 if dtype == torch.bfloat16 else 0.0
    assert ((actual.float().cpu() - expected.float()).abs() <= expected.float().abs() * one_ulp).all()
    assert relative_error(actual.float().cpu(), expected.float()) <= max(one_ulp, 1e-7)


def test_dequantize_benchmark_times_the_kernel_and_the_lora_block_on_bf16_and_fp8_weights(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fp8_dequantize

    result = fp8_dequantize.main(["--shape", "4,48,40", "--tokens", "23", "--top_k", "2", "--rank", "4",
                                  "--repeats", "1"])  # bit-identity is a GPU check: the CPU interpreter truncates
    # to bf16 (see the kernel test above)
    assert result["torch_ms"] > 0 and result["triton_ms"] > 0
    assert [row["way"] for row in result["block"]] == ["bf16", "fp8"]
    assert all(row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 for row in result["block"])
    out = capsys.readouterr().out
    assert "| (4, 48, 40) |" in out and "| fp8 |" in out


def test_block_on_fp8_weights_equals_the_block_on_their_dequantized_values():
    """Forward and every gradient (input, routing weights, LoRA factors) as if the weights were the FP8 values."""
    torch.manual_seed(3)
    num_experts, hidden, inter, rank = 6, 32, 24, 4
    gate_up, gate_up_scale = quantize_rowwise(torch.randn(num_experts, 2 * inter, hidden) * 0.2)
    down, down_scale = quantize_rowwise(torch.randn(num_experts, hidden, inter) * 0.2)
    factors = [(torch.randn(num_experts, *shape, device=DEVICE) * 0.3).requires_grad_(True)
               for shape in ((rank, hidden), (2 * inter, rank), (rank, inter), (hidden, rank))]
    weights, index = routing(17, num_experts, 2, "skewed")
    weights.requires_grad_(True)
    x = torch.randn(17, hidden, device=DEVICE, requires_grad=True)
    inputs = (x, weights, *factors)

    def block(w_gate_up, w_down, *scales):
        lora = LowRank(*factors[:2], 2.0), LowRank(*factors[2:], 0.5)
        out = scattermoe_experts(x, w_gate_up, w_down, weights, index, *lora, *scales)
        return out, torch.autograd.grad(out.square().sum(), inputs)

    expected, expected_grads = block(dequantize(gate_up, gate_up_scale, torch.float32).to(DEVICE),
                                     dequantize(down, down_scale, torch.float32).to(DEVICE))
    actual, grads = block(gate_up.to(DEVICE), down.to(DEVICE), gate_up_scale.to(DEVICE), down_scale.to(DEVICE))
    assert relative_error(actual, expected) <= 1e-6
    for got, want in zip(grads, expected_grads, strict=True):
        assert relative_error(got, want) <= 1e-6


def fp8_layers(count: int, num_experts: int = 6, hidden: int = 32, inter: int = 24) -> list[tuple]:
    """``count`` layers' FP8 experts: (gate_up, gate_up scale, down, down scale) on DEVICE."""
    torch.manual_seed(5)
    return [tuple(t.to(DEVICE) for t in (*quantize_rowwise(torch.randn(num_experts, 2 * inter, hidden) * 0.2),
                                          *quantize_rowwise(torch.randn(num_experts, hidden, inter) * 0.2)))
            for _ in range(count)]


@pytest.mark.parametrize("checkpointed", [True, False], ids=["checkpointed", "plain"])
def test_backward_reuses_the_pair_its_recompute_dequantized_and_a_plain_forward_holds_none(monkeypatch, checkpointed):
    """Under checkpointing each layer's recompute hands its dequantized experts to the backward right after it (two
    dequantizations a weight per step, not three). A forward outside backward holds no pair: it would wait through
    the later layers and the loss for a backward that is only the last layer's. Gradients stay those of the
    full-precision block, and nothing is held after backward."""
    layers = fp8_layers(3)
    weights, index = routing(19, 6, 2, "skewed")
    x = torch.randn(19, 32, device=DEVICE, requires_grad=True)
    calls = []
    real = compilable_ops.dequantize
    monkeypatch.setattr(compilable_ops, "dequantize", lambda *args: calls.append(args[0]) or real(*args))

    def run(quantized: bool) -> torch.Tensor:
        hidden = x
        for gate_up, gate_up_scale, down, down_scale in layers:
            if quantized:
                def layer(h, gate_up=gate_up, down=down, scales=(gate_up_scale, down_scale)):
                    return h + scattermoe_experts(h, gate_up, down, weights, index, None, None, *scales)
            else:
                full = real(gate_up, gate_up_scale, torch.float32), real(down, down_scale, torch.float32)

                def layer(h, full=full):
                    return h + scattermoe_experts(h, *full, weights, index)
            hidden = checkpoint(layer, hidden, use_reentrant=False) if checkpointed and quantized else layer(hidden)
        assert compilable_ops.DEQUANTIZED.pair is None
        return torch.autograd.grad(hidden.square().sum(), x)[0]

    expected = run(quantized=False)
    calls.clear()
    actual = run(quantized=True)
    assert relative_error(actual, expected) <= 1e-6
    # checkpointed: each weight dequantized in the forward and the recompute, the backward takes the recompute's;
    # plain: in each forward and each backward
    assert len(calls) == 3 * 2 * 2
    assert compilable_ops.DEQUANTIZED.pair is None


def test_backward_frees_the_dequantized_down_projection_and_h_before_the_input_gradient(monkeypatch):
    """The frozen down projection's full-precision copy (0.4 GB a layer at Qwen3-30B-A3B's shape) and the activations
    h, which only the down LoRA's gradient reads, are gone by the time the backward computes dx, its largest buffer;
    the gate/up copy is gone when the backward returns."""
    import weakref

    (gate_up, gate_up_scale, down, down_scale), = fp8_layers(1)
    weights, index = routing(19, 6, 2, "skewed")
    x = torch.randn(19, 32, device=DEVICE, requires_grad=True)
    factors = [(torch.randn(6, *shape, device=DEVICE) * 0.3).requires_grad_(True)
               for shape in ((4, 32), (48, 4), (4, 24), (32, 4))]
    lora = LowRank(*factors[:2], 2.0), LowRank(*factors[2:], 0.5)
    copies, activations, alive_at_dx = [], [], []
    real_dequantize, real_matmul = compilable_ops.dequantize, kernels.scatter_matmul
    real_swiglu = kernels.swiglu_backward

    def dequantize_spy(*args):
        copy = real_dequantize(*args)
        copies.append(weakref.ref(copy))
        return copy

    def swiglu_spy(*args, **kwargs):
        grad_gate_up, grad_scale, h = real_swiglu(*args, **kwargs)
        activations.append(weakref.ref(h))
        return grad_gate_up, grad_scale, h

    def matmul_spy(a, w, routing, a_gathered, y_scattered, **kwargs):
        if len(copies) == 4 and y_scattered and w.shape[1] == gate_up.shape[1]:
            # the backward's own down copy (the forward made two) and its h
            alive_at_dx.append((copies[3]() is not None, activations[0]() is not None))
        return real_matmul(a, w, routing, a_gathered=a_gathered, y_scattered=y_scattered, **kwargs)

    monkeypatch.setattr(compilable_ops, "dequantize", dequantize_spy)
    monkeypatch.setattr(kernels, "scatter_matmul", matmul_spy)
    monkeypatch.setattr(kernels, "swiglu_backward", swiglu_spy)
    out = scattermoe_experts(x, gate_up, down, weights, index, *lora, gate_up_scale, down_scale)
    out.square().sum().backward()
    assert len(copies) == 4 and len(activations) == 1 and alive_at_dx == [(False, False)]
    assert all(copy() is None for copy in copies)
    assert all(factor.grad is not None and factor.grad.norm() > 0 for factor in factors)


def test_lora_model_with_fp8_experts_equals_the_model_on_their_dequantized_values_without_folding(monkeypatch):
    """Loss and every LoRA gradient as the full-precision model whose experts hold the FP8-rounded values; peft never
    forms the expert delta (its fold of an FP8 weight would add it in the scaled units and round it to FP8)."""
    from peft.tuners.lora.layer import ParamWrapper

    reference = lora_model()
    apply_fast_moe_block(reference)
    model = lora_model()
    apply_fast_moe_block(model)
    apply_fp8_frozen_experts(model)
    apply_fp8_frozen_experts(model)  # idempotent
    for layer in range(2):
        experts, rounded = experts_of(reference, layer).get_base_layer(), experts_of(model, layer).get_base_layer()
        for name in ("gate_up_proj", "down_proj"):
            getattr(experts, name).data = dequantize(getattr(rounded, name), fp8_scale(rounded, name), torch.float32)
    experts = experts_of(model).get_base_layer()
    assert experts.gate_up_proj.dtype == FP8 and experts.down_proj.dtype == FP8
    assert fp8_scale(experts, "gate_up_proj").shape == (*experts.gate_up_proj.shape[:2], 1)

    expected_loss, expected = loss_and_lora_grads(reference)
    monkeypatch.setattr(ParamWrapper, "get_delta_weight", lambda *a, **k: pytest.fail("peft folded an FP8 weight"))
    loss, grads = loss_and_lora_grads(model)
    assert relative_error(loss, expected_loss) <= 1e-5
    assert sum("experts" in name for name in grads) == 8 and grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert relative_error(grad, expected[name]) <= 1e-4, name
    assert experts.gate_up_proj.grad is None  # frozen, and FP8 parameters cannot hold gradients anyway
    assert not experts.scattermoe_lora  # the factors are handed over for the forward only


def test_several_active_adapters_on_fp8_experts_are_refused_by_name():
    model = lora_model()
    model.add_adapter("second", model.peft_config["default"])
    apply_fast_moe_block(model)
    apply_fp8_frozen_experts(model)
    model.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match=re.escape("adapters ['default', 'second'] are active")):
        model(**batch())


def test_saved_adapter_is_an_ordinary_peft_adapter_of_the_full_precision_model(tmp_path):
    model = lora_model()
    apply_fast_moe_block(model)
    apply_fp8_frozen_experts(model)
    model.save_pretrained(tmp_path)
    restored = PeftModel.from_pretrained(tiny_model(), tmp_path)
    saved = dict(model.named_parameters())
    for name, parameter in restored.named_parameters():
        if "lora_" in name:
            assert torch.equal(parameter, saved[name]), name
    assert all(p.dtype == torch.float32 for n, p in restored.named_parameters())


def test_revert_brings_the_weights_back_in_their_dtype_and_the_model_runs_as_transformers():
    model = lora_model()
    apply_fast_moe_block(model)
    apply_fp8_frozen_experts(model)
    revert_patches(model)
    revert_fp8_frozen_experts(model)  # a second revert changes nothing
    experts = experts_of(model).get_base_layer()
    assert experts.gate_up_proj.dtype == torch.float32 and fp8_scale(experts, "gate_up_proj") is None
    assert not hasattr(experts, ACTIVE_LORA)  # the factor hand-over's slot goes with it
    assert torch.isfinite(model(**batch()).loss)


def test_peft_wrappers_without_the_factor_hand_over_are_refused_before_any_weight_changes():
    model = lora_model()  # no apply_fast_moe_block: peft's own activation would fold into the FP8 weights
    folding = r"peft would fold its LoRA into the FP8 weights of (gate_up|down)_proj; run apply_fast_moe_block"
    with pytest.raises(ValueError, match=folding):
        apply_fp8_frozen_experts(model)
    assert experts_of(model).get_base_layer().gate_up_proj.dtype == torch.float32


def test_trainable_expert_weights_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="gate_up_proj trains, so it cannot be stored in FP8"):
        apply_fp8_frozen_experts(model)


def test_training_run_with_fp8_frozen_experts(tmp_path, capfd):
    import qwen3_sft

    assert qwen3_sft.main([
        "--output_dir", str(tmp_path / "run"), "--bundled_examples", "4", "--max_steps", "2", "--max_length", "32",
        "--eval_split", "0",
        "--micro_batch_size", "1", "--gradient_checkpointing", "true", "--save_strategy", "no",
        "--report_to", "none", "--use_lora", "--use_fast_moe_block", "--lora_r", "4", "--fp8_frozen_experts",
    ]) == 0
    log = capfd.readouterr().err
    assert "expert LoRA: scattermoe low-rank path" in log
    assert re.search(r"FP8 frozen experts: \d+ experts modules, [0-9.]+ GiB of weights saved", log)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("flags,message", [
    (["--fp8_frozen_experts"], "--fp8_frozen_experts needs --use_lora and --use_fast_moe_block"),
    (["--fp8_frozen_experts", "--use_lora"], "--fp8_frozen_experts needs --use_fast_moe_block"),
    (["--fp8_frozen_experts", "--use_lora", "--use_fast_moe_block", "--merge_lora"],
     "--merge_lora with --fp8_frozen_experts would merge into FP8-rounded expert weights"),
    (["--fp8_frozen_experts", "--use_lora", "--use_fast_moe_block", "--deepspeed_config", "config/zero3.json"],
     "--fp8_frozen_experts with DeepSpeed: the engine takes over the weights' storage"),
    (["--fp8_frozen_experts", "--use_lora", "--use_fast_moe_block", "--deepspeed_config", "config/zero2.json"],
     "--fp8_frozen_experts with DeepSpeed"),
])
def test_fp8_frozen_experts_flag_combinations_are_checked(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(["--output_dir", str(tmp_path), *flags])


def test_frozen_weight_patches_do_nothing_without_the_flag(tmp_path):
    model = lora_model()
    apply_peft_patches(model, parse_config(["--output_dir", str(tmp_path), "--use_lora"]))
    assert experts_of(model).get_base_layer().gate_up_proj.dtype == torch.float32
