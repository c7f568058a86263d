"""`--use_fp8`: which modules are converted, that the conversion is FP8 and close to full precision (torchao's
emulation on the CPU), idempotence, revert, LoRA and fast-MoE composition, the flags and the CPU refusal."""

import logging
import re

import pytest
import torch
from torchao.float8.float8_linear import Float8Linear
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import monkey_patch.fp8 as fp8
from monkey_patch import apply_patches, preflight
from monkey_patch.fast_moe import apply_fast_moe_block
from monkey_patch.fp8 import (
    Float8Router,
    apply_fp8,
    apply_fp8_experts,
    describe,
    fp8_grouped_mm_experts_forward,
    revert_fp8,
    select_fp8_modules,
)
from tests.numerics import relative_error
from turbo_tune.arguments import parse_config
from turbo_tune.errors import ConfigError
from turbo_tune.modeling import apply_lora, load_model

FP8_LOSS_TOLERANCE = 0.05  # FP8 e4m3 keeps ~2 significant digits per element; the loss stays within a few %
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def config(tmp_path, *flags: str):
    return parse_config(["--output_dir", str(tmp_path / "out"), "--report_to", "none", *flags])


def convertible_config(**overrides) -> Qwen3MoeConfig:
    """A tiny Qwen3-MoE whose every linear layer and router FP8 can take (all dimensions multiples of 16)."""
    settings = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=True, output_router_logits=True, router_aux_loss_coef=0.01, max_position_embeddings=64,
    )
    return Qwen3MoeConfig(**{**settings, **overrides})


def convertible_model(seed: int = 0) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(convertible_config())
    with torch.no_grad():
        for layer in model.model.layers:  # non-zero routers, so routing is not a tie
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


def batch(vocab: int = 256) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    return {"input_ids": input_ids, "labels": input_ids}


def qwen3_30b_a3b_on_meta(layers: int = 48) -> Qwen3MoeForCausalLM:
    shape = Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8,
    )
    with torch.device("meta"):
        return Qwen3MoeForCausalLM(shape)


def test_brief_selection_on_qwen3_30b_a3b_shape_is_routers_edge_layers_and_lm_head():
    selection = select_fp8_modules(qwen3_30b_a3b_on_meta(), "brief")
    routers = [f"model.layers.{i}.mlp.gate" for i in range(48)]
    edges = [f"model.layers.{i}.self_attn.{p}" for i in (0, 47) for p in ATTENTION]
    assert sorted(selection.chosen) == sorted(routers + edges + ["lm_head"])
    assert selection.skipped == {}
    assert "model.layers.{0-47}.mlp.gate" in describe(selection.chosen)
    assert "model.layers.{0,47}.self_attn.q_proj" in describe(selection.chosen)


def test_all_linear_on_qwen3_30b_a3b_shape_takes_every_linear_and_router_but_no_experts():
    selection = select_fp8_modules(qwen3_30b_a3b_on_meta(layers=4), "all_linear")
    assert len(selection.chosen) == 4 * (len(ATTENTION) + 1) + 1
    assert not any("experts" in name for name in selection.chosen)


def test_brief_selection_on_embedded_model_skips_what_fp8_cannot_take(tmp_path):
    model = load_model(config(tmp_path))
    selection = select_fp8_modules(model, "brief")
    assert selection.chosen == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in sorted(ATTENTION)]
    assert selection.skipped == {
        "model.layers.0.mlp.gate": "weight 8x128: FP8 matmuls need both dimensions divisible by 16",
        "model.layers.1.mlp.gate": "weight 8x128: FP8 matmuls need both dimensions divisible by 16",
        "lm_head": "weight 376x128: FP8 matmuls need both dimensions divisible by 16",
    }


def test_regex_and_preset_selectors_combine_and_experts_are_skipped_with_the_reason():
    model = convertible_model()
    selection = select_fp8_modules(model, r"lm_head,model\.layers\.1\.self_attn\.o_proj,model\.layers\.2\.mlp\.experts")
    assert selection.chosen == ["lm_head", "model.layers.1.self_attn.o_proj"]
    assert selection.skipped == {
        "model.layers.2.mlp.experts": "3D expert weights, not a linear layer: use --fp8_experts"
    }
    assert select_fp8_modules(model, "routers").chosen == [f"model.layers.{i}.mlp.gate" for i in range(3)]
    middle = select_fp8_modules(model, "edge_layers").chosen
    assert middle and not any(".layers.1." in name for name in middle)


def test_regex_that_matches_nothing_stops_with_the_pattern():
    with pytest.raises(ConfigError, match=re.escape(r"--fp8_modules 'model\.layer\.0.*' matches no module")):
        select_fp8_modules(convertible_model(), r"model\.layer\.0.*")


def partition_like_zero3(model: torch.nn.Module) -> torch.nn.Module:
    """What deepspeed.zero.Init leaves on a rank: each parameter's data emptied, its shape kept in ``ds_shape``."""
    for param in model.parameters():
        param.ds_shape = param.shape
        param.data = torch.empty(0, dtype=param.dtype)
    return model


def test_selection_reads_full_shapes_of_zero3_partitioned_weights(tmp_path):
    """Under ZeRO-3 the weights are already partitioned when the patches run (an H200 run failed on it)."""
    full = select_fp8_modules(load_model(config(tmp_path)), "brief")
    partitioned = select_fp8_modules(partition_like_zero3(load_model(config(tmp_path))), "brief")
    assert (partitioned.chosen, partitioned.skipped) == (full.chosen, full.skipped)


def test_fp8_experts_check_reads_full_shapes_of_zero3_partitioned_weights():
    model = partition_like_zero3(Qwen3MoeForCausalLM(convertible_config(moe_intermediate_size=24)))
    with pytest.raises(ConfigError, match=r"expert weights \(16, 48, 64\) need .* divisible by 16"):
        apply_fp8_experts(model)


def test_selection_leaves_the_model_untouched():
    model = convertible_model()
    before = [(name, type(m)) for name, m in model.named_modules()]
    select_fp8_modules(model, "all_linear")
    assert [(name, type(m)) for name, m in model.named_modules()] == before


def test_emulated_fp8_loss_and_gradients_stay_close_to_full_precision():
    """torchao's emulation casts to FP8 exactly as on the GPU, then multiplies in fp32: the numerics of FP8."""
    reference = convertible_model()
    converted = convertible_model()
    selection = apply_fp8(converted, "tensorwise", "all_linear", emulate=True)
    assert len(selection.chosen) == 3 * 5 + 1 and not selection.skipped
    assert isinstance(converted.lm_head, Float8Linear)
    assert type(converted.model.layers[1].mlp.gate) is Float8Router

    losses, grads = [], []
    for model in (reference, converted):
        output = model(**batch())
        (output.loss + output.aux_loss).backward()
        losses.append(output.loss.detach())
        grads.append({name: p.grad for name, p in model.named_parameters()})
    error = relative_error(losses[1], losses[0])
    assert 0 < error <= FP8_LOSS_TOLERANCE, "FP8 must change the numerics a little, not a lot"
    # Gradients go through an FP8 cast (e5m2: 2 mantissa bits) at every converted layer on the way back, so the
    # error compounds with depth; a transposed or dropped gradient would be off by 1 or more.
    assert relative_error(grads[1]["lm_head.weight"], grads[0]["lm_head.weight"]) <= 0.1
    for name, grad in grads[0].items():
        assert relative_error(grads[1][name], grad) <= 0.4, name


@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_with_gw_hp"])
def test_other_recipes_convert_and_run(recipe):
    reference, converted = convertible_model(), convertible_model()
    apply_fp8(converted, recipe, "brief", emulate=True)
    assert converted.lm_head.config.cast_config_input.scaling_granularity.value == "axiswise"
    assert 0 < relative_error(converted(**batch()).loss, reference(**batch()).loss) <= FP8_LOSS_TOLERANCE


def test_apply_twice_changes_nothing_and_revert_restores_the_exact_model():
    model = convertible_model()
    expected = model(**batch()).loss.detach()
    keys = list(model.state_dict())
    apply_fp8(model, "tensorwise", "brief", emulate=True)
    after_first = {name: (m, type(m)) for name, m in model.named_modules()}
    apply_fp8(model, "tensorwise", "brief", emulate=True)
    assert {name: (m, type(m)) for name, m in model.named_modules()} == after_first
    assert list(model.state_dict()) == keys
    assert model(**batch()).loss.detach() != expected

    weight = model.lm_head.weight
    revert_fp8(model)
    revert_fp8(model)
    assert not any(isinstance(m, (Float8Linear, Float8Router)) for m in model.modules())
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is weight
    assert type(model.model.layers[0].mlp.gate) is Qwen3MoeTopKRouter
    assert list(model.state_dict()) == keys
    assert torch.equal(model(**batch()).loss.detach(), expected)


def test_lora_wraps_fp8_base_layers_and_trains_its_adapters(tmp_path):
    """qwen3_sft.py converts before peft wraps: LoRA's base layers are Float8Linear, the adapters stay bf16/fp32."""
    model = convertible_model()
    apply_fp8(model, "tensorwise", "all_linear", emulate=True)
    model = apply_lora(model, config(tmp_path, "--use_lora", "--lora_target_modules", "q_proj,o_proj"))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, Float8Linear) and type(q_proj.lora_A["default"]) is torch.nn.Linear
    model(**batch()).loss.backward()
    assert q_proj.lora_B["default"].weight.grad.abs().sum() > 0
    assert q_proj.base_layer.weight.grad is None


def test_selection_on_an_already_lora_wrapped_model_skips_the_wrapped_layers(tmp_path):
    model = apply_lora(convertible_model(), config(tmp_path, "--use_lora", "--lora_target_modules", "q_proj"))
    selection = select_fp8_modules(model, "all_linear")
    wrapped = {f"base_model.model.model.layers.{i}.self_attn.q_proj" for i in range(3)}
    assert set(selection.skipped) == wrapped
    assert all("LoRA" in reason for reason in selection.skipped.values())
    assert "base_model.model.model.layers.0.self_attn.k_proj" in selection.chosen
    assert not any("lora_" in name or "base_layer" in name for name in selection.chosen)


def test_fast_moe_block_composes_experts_stay_scattermoe_3d_parameters():
    reference, model = convertible_model(), convertible_model()
    apply_fast_moe_block(model)
    apply_fp8(model, "tensorwise", "all_linear", emulate=True)
    assert model.config._experts_implementation == "scattermoe"
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.ndim == 3 and not isinstance(experts, torch.nn.Linear)
    assert 0 < relative_error(model(**batch()).loss, reference(**batch()).loss) <= FP8_LOSS_TOLERANCE


def test_apply_patches_converts_and_logs_the_chosen_modules(tmp_path, caplog):
    model = convertible_model()
    with caplog.at_level(logging.INFO, logger="monkey_patch.fp8"):
        apply_patches(model, config(tmp_path, "--use_fp8", "--fp8_modules", "routers,lm_head"))
    assert isinstance(model.lm_head, Float8Linear) and type(model.model.layers[2].mlp.gate) is Float8Router
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert "FP8 (torchao float8, tensorwise recipe) on 4 modules: lm_head, model.layers.{0-2}.mlp.gate" in caplog.text


def test_fp8_experts_flag_selects_the_fp8_grouped_mm_implementation(tmp_path):
    model = convertible_model()
    apply_patches(model, config(tmp_path, "--use_fp8", "--fp8_experts"))
    assert model.config._experts_implementation == "fp8_grouped_mm"
    revert_fp8(model)
    assert model.config._experts_implementation == "grouped_mm"


def test_fp8_experts_refuse_dimensions_not_divisible_by_16():
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(convertible_config(moe_intermediate_size=24))
    with pytest.raises(ConfigError, match="divisible by 16"):
        apply_fp8_experts(model)


def test_fp8_experts_padding_and_order_match_transformers_experts(monkeypatch):
    """The grouped GEMM replaced by an exact one: what is left is our padding, permutation and masking. Rows the
    GEMM leaves unwritten are filled with NaN here, as uninitialized memory may be."""
    seen_offsets = []

    def exact_grouped_mm(inputs, weight_t, offsets):
        assert torch.isfinite(inputs).all(), "a scale computed over the whole input would turn NaN"
        seen_offsets.append(offsets)
        out = torch._grouped_mm(inputs, weight_t, offs=offsets)
        out[int(offsets[-1]):] = float("nan")
        return out

    monkeypatch.setattr(fp8, "_fp8_grouped_mm", exact_grouped_mm)
    experts = convertible_model().model.layers[0].mlp.experts
    hidden = torch.randn(37, 64, requires_grad=True)
    top_k_index = torch.stack([torch.randperm(16)[:4] for _ in range(37)])
    top_k_weights = torch.rand(37, 4)

    experts.config._experts_implementation = "eager"
    expected = experts(hidden, top_k_index, top_k_weights)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), hidden)
    actual = fp8_grouped_mm_experts_forward(experts, hidden, top_k_index, top_k_weights)
    (actual_grad,) = torch.autograd.grad(actual.square().sum(), hidden)

    assert relative_error(actual, expected) <= 1e-5
    assert relative_error(actual_grad, expected_grad) <= 1e-5
    assert all(int(o[0]) % 16 == 0 and torch.all(o.diff() % 16 == 0) for o in seen_offsets)


def test_preflight_on_cpu_says_fp8_needs_a_gpu_and_what_to_do(tmp_path, monkeypatch):
    parsed = config(tmp_path, "--use_fp8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"--use_fp8 needs a CUDA GPU .* Drop --use_fp8"):
        preflight(parsed)


@pytest.mark.parametrize(("flags", "capability", "message"), [
    (["--use_fp8"], (8, 0), r"--use_fp8 needs a GPU with compute capability 8.9 or newer; A-GPU has 8.0"),
    (["--use_fp8", "--fp8_experts"], (8, 9), r"--fp8_experts needs a GPU with compute capability 9.0 or newer"),
])
def test_preflight_names_the_gpu_without_fp8(tmp_path, monkeypatch, flags, capability, message):
    parsed = config(tmp_path, *flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "A-GPU")
    with pytest.raises(ConfigError, match=message):
        preflight(parsed)


@pytest.mark.parametrize(("flags", "message"), [
    (["--use_fp8", "--fp8_recipe", "delayed"], "--fp8_recipe 'delayed' is not one of tensorwise, rowwise"),
    (["--use_fp8", "--fp8_modules", " , "], "--fp8_modules is empty"),
    (["--use_fp8", "--fp8_modules", "brief,layers.(0"], r"--fp8_modules 'layers.\(0' is neither a preset"),
    (["--fp8_experts"], "--fp8_experts needs --use_fp8"),
    (["--use_fp8", "--fp8_experts", "--use_fast_moe_block"], "both choose the experts kernels"),
    (["--use_fp8", "--pad_to_multiple_of", "8"], "--pad_to_multiple_of 8 with --use_fp8: .* multiples of 16"),
])
def test_bad_fp8_flags_stop_with_the_flag_named(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, *flags)


def test_fp8_flags_parse(tmp_path):
    parsed = config(tmp_path, "--use_fp8", "--fp8_recipe", "rowwise", "--fp8_modules", r"routers,.*o_proj")
    assert (parsed.use_fp8, parsed.fp8_recipe, parsed.fp8_modules, parsed.fp8_experts) == (
        True, "rowwise", r"routers,.*o_proj", False
    )


@pytest.mark.parametrize("packed", [False, True])
def test_fp8_batches_hold_a_multiple_of_16_tokens(tmp_path, packed):
    """torch._scaled_mm refuses a weight gradient over a token count not divisible by 16 (seen on an H200)."""
    flags = ["--use_fp8", *(["--use_packing"] if packed else [])]
    parsed = config(tmp_path, *flags)
    collator = DataCollatorForLanguageModeling(
        pad_token_id=0, padding_free=packed, pad_to_multiple_of=parsed.pad_to_multiple_of
    )
    examples = [{"input_ids": list(range(1, n + 1))} for n in (45, 7, 30)]
    batch = collator(examples)
    assert batch["input_ids"].numel() % 16 == 0
    assert (batch["labels"] != -100).sum() == sum(n - packed for n in (45, 7, 30))


def test_full_precision_batches_are_not_padded_beyond_the_longest_row(tmp_path):
    assert config(tmp_path).pad_to_multiple_of is None
