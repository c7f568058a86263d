"""LoRA on the experts through scattermoe's low-rank path against peft's own `target_parameters` path, in fp32."""

import json
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from monkey_patch.fast_moe import apply_fast_moe_block, hand_expert_lora_to_scattermoe, register_scattermoe
from monkey_patch.scattermoe.compilable_ops import scattermoe_experts
from monkey_patch.scattermoe.ops import LowRank, compute_routing
from tests.test_fast_moe import DEVICE, batch, relative_error, tiny_model

TOLERANCE = 1e-4
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


class Block(torch.nn.Module):
    """Just the experts, so peft wraps them as it does inside a model (``mlp.experts``)."""

    def __init__(self, config: Qwen3MoeConfig) -> None:
        super().__init__()
        self.mlp = torch.nn.Module()
        self.mlp.experts = Qwen3MoeExperts(config)


def lora_block(hidden, inter, num_experts, top_k, rank, targets) -> tuple[PeftModel, Qwen3MoeExperts]:
    config = Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter, num_experts=num_experts, num_experts_per_tok=top_k
    )
    block = Block(config).to(DEVICE)
    with torch.no_grad():
        block.mlp.experts.gate_up_proj.normal_(0, 0.2)
        block.mlp.experts.down_proj.normal_(0, 0.2)
    # init_lora_weights=False: random A and B (peft's default B = 0 would hide any error in B's use)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[], target_parameters=targets,
                      init_lora_weights=False)
    model = get_peft_model(block, lora)
    assert hand_expert_lora_to_scattermoe(model) == len(targets)  # what apply_fast_moe_block does on a peft model
    return model, model.base_model.model.mlp.experts.get_base_layer()


def routing(tokens, num_experts, top_k, kind) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, k) weights and distinct expert ids. `skewed` crowds the first experts, leaves the last but one
    empty and gives the last exactly one token."""
    logits = torch.randn(tokens, num_experts, device=DEVICE)
    if kind == "skewed":
        logits[:, : max(top_k, 2)] += 6.0
        logits[:, -2:] = -1e4
        logits[0, -1] = 10.0  # its top choice, with weight left for its second
    weights, index = logits.softmax(-1).topk(top_k, dim=-1)
    return weights, index


def per_expert_factors(model: PeftModel, grads: bool) -> dict[str, list[torch.Tensor]]:
    """Every expert's A (r, in) and B (out, r), or their gradients, in peft's layout (see get_delta_factors)."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a = module.lora_A["default"].weight
            b = module.lora_B["default"].weight
            a, b = (a.grad, b.grad) if grads else (a, b)
            experts = module.num_experts
            out[f"{name}.A"] = list(a.reshape(experts, -1, a.shape[-1]).unbind(0))
            out[f"{name}.B"] = list(b.reshape(b.shape[0], -1, experts).permute(2, 0, 1).unbind(0))
    return out


def run_block(model, experts, implementation, x, weights, index):
    experts.config._experts_implementation = implementation
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    out = model.base_model.model.mlp.experts(x, index, weights)
    (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum().backward()
    return out.detach(), x.grad, weights.grad, per_expert_factors(model, grads=True)


CASES = [
    # tokens, hidden, inter, experts, top_k, rank, routing
    pytest.param(23, 48, 40, 6, 2, 4, "skewed", id="ragged-empty-and-one-token-experts"),
    pytest.param(1, 32, 24, 4, 1, 8, "uniform", id="one-token-top1"),
    pytest.param(9, 40, 24, 8, 8, 4, "uniform", id="top8-all-experts"),
    pytest.param(17, 32, 48, 8, 1, 16, "skewed", id="top1-rank16-empty-experts"),
]


@pytest.mark.parametrize("tokens,hidden,inter,num_experts,top_k,rank,kind", CASES)
def test_outputs_and_every_experts_factor_gradients_match_peft(tokens, hidden, inter, num_experts, top_k, rank, kind):
    register_scattermoe()
    torch.manual_seed(tokens + 100 * top_k)
    model, experts = lora_block(hidden, inter, num_experts, top_k, rank, EXPERT_TARGETS)
    weights, index = routing(tokens, num_experts, top_k, kind)
    x = torch.randn(tokens, hidden, device=DEVICE)
    expected = run_block(model, experts, "eager", x, weights, index)
    actual = run_block(model, experts, "scattermoe", x, weights, index)

    for name, got, want in zip(("out", "x.grad", "routing_weights.grad"), actual[:3], expected[:3], strict=True):
        assert relative_error(got, want) <= TOLERANCE, name
    _, expert_ends = compute_routing(index, num_experts)
    rows = torch.diff(expert_ends, prepend=expert_ends.new_zeros(1))
    assert actual[3].keys() == expected[3].keys() and len(actual[3]) == 4
    for name, per_expert in actual[3].items():
        for e, (got, want) in enumerate(zip(per_expert, expected[3][name], strict=True)):
            if rows[e] == 0:  # no token reached this expert: its factors get exactly no gradient
                assert torch.equal(got, torch.zeros_like(got)) and torch.equal(want, torch.zeros_like(want))
            else:
                assert relative_error(got, want) <= TOLERANCE, f"{name} expert {e}"
    if kind == "skewed":
        assert (rows == 0).any() and (rows == 1).any()
    for param in (experts.gate_up_proj, experts.down_proj):
        assert param.grad is None and not param.requires_grad


@pytest.mark.parametrize("target", EXPERT_TARGETS)
def test_lora_on_one_projection_only_matches_peft(target):
    register_scattermoe()
    torch.manual_seed(3)
    model, experts = lora_block(32, 24, 4, 2, 4, [target])
    weights, index = routing(11, 4, 2, "uniform")
    x = torch.randn(11, 32, device=DEVICE)
    expected = run_block(model, experts, "eager", x, weights, index)
    actual = run_block(model, experts, "scattermoe", x, weights, index)
    for got, want in zip(actual[:3], expected[:3], strict=True):
        assert relative_error(got, want) <= TOLERANCE
    for name, per_expert in actual[3].items():
        assert relative_error(torch.stack(per_expert), torch.stack(expected[3][name])) <= TOLERANCE, name


def lora_model(seed: int = 0) -> PeftModel:
    model = tiny_model(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_TARGETS,
                        init_lora_weights=False)
    return get_peft_model(model, config)


def loss_and_lora_grads(model: PeftModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch()).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_whole_model_loss_and_lora_gradients_match_peft_and_base_experts_get_no_grad():
    model = lora_model()
    model.base_model.model.set_experts_implementation("grouped_mm")
    expected_loss, expected = loss_and_lora_grads(model)
    apply_fast_moe_block(model)
    loss, grads = loss_and_lora_grads(model)
    assert relative_error(loss, expected_loss) <= TOLERANCE
    assert grads.keys() == expected.keys()
    assert sum("experts" in name for name in grads) == 8  # A and B of gate_up and down, two layers
    for name, grad in grads.items():
        assert "lora_" in name
        assert relative_error(grad, expected[name]) <= TOLERANCE, name
    experts = model.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None


def test_scattermoe_takes_the_factors_and_peft_never_builds_an_expert_stack(monkeypatch):
    """peft's activation would register a parametrization, whose registration evaluates it: W + s·B·A for the whole
    expert stack. Under scattermoe neither that fold nor a delta may run, and nothing is left registered."""
    from peft.tuners.lora.layer import ParamWrapper, _LoraFactorsProxy

    model = lora_model()
    apply_fast_moe_block(model)
    monkeypatch.setattr(_LoraFactorsProxy, "forward", lambda *a: pytest.fail("peft folded the expert factors"))
    monkeypatch.setattr(ParamWrapper, "get_delta_weight", lambda *a, **k: pytest.fail("peft formed a delta"))
    loss, grads = loss_and_lora_grads(model)
    assert torch.isfinite(loss) and sum("experts" in name for name in grads) == 8
    experts = model.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    assert not hasattr(experts, "parametrizations") and not experts.scattermoe_lora


def test_two_active_adapters_fall_back_to_peft_and_still_match_it():
    model = lora_model()
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERT_TARGETS,
                                           init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    model.base_model.model.set_experts_implementation("grouped_mm")
    expected_loss, expected = loss_and_lora_grads(model)
    apply_fast_moe_block(model)
    loss, grads = loss_and_lora_grads(model)
    assert relative_error(loss, expected_loss) <= TOLERANCE
    assert grads.keys() == expected.keys() and sum("second" in name for name in grads) > 0
    for name, grad in grads.items():
        assert relative_error(grad, expected[name]) <= TOLERANCE, name


def test_adapter_saves_in_peft_format_and_restores_and_merges(tmp_path):
    model = lora_model()  # random, non-zero A and B: an adapter that changes the outputs
    apply_fast_moe_block(model)
    model.eval()
    with torch.no_grad():
        expected = model(**batch()).logits
    model.save_pretrained(tmp_path)

    restored = PeftModel.from_pretrained(tiny_model(), tmp_path)  # plain transformers model, default experts
    restored.eval()
    with torch.no_grad():
        assert relative_error(restored(**batch()).logits, expected) <= TOLERANCE
        merged = restored.merge_and_unload()
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        assert relative_error(merged(**batch()).logits, expected) <= TOLERANCE


def test_lora_op_compiles_without_graph_breaks():
    """fullgraph=True on the op. (peft's ParamWrapper registers its parametrization inside forward, which dynamo
    cannot trace: peft documents graph breaks with target_parameters, whichever experts implementation runs.)"""
    torch.manual_seed(5)
    num_experts, hidden, inter, rank = 4, 32, 24, 4
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden, device=DEVICE) * 0.2
    w_down = torch.randn(num_experts, hidden, inter, device=DEVICE) * 0.2
    factors = [(torch.randn(num_experts, *shape, device=DEVICE) * 0.3).requires_grad_(True)
               for shape in ((rank, hidden), (2 * inter, rank), (rank, inter), (hidden, rank))]
    weights, index = routing(9, num_experts, 2, "uniform")
    x = torch.randn(9, hidden, device=DEVICE)

    def block(x):
        gate_up, down = LowRank(*factors[:2], 2.0), LowRank(*factors[2:], 0.5)
        return scattermoe_experts(x, w_gate_up, w_down, weights, index, gate_up, down)

    compiled = torch.compile(block, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    expected = block(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), factors)
    actual = compiled(x)
    grads = torch.autograd.grad(actual.square().sum(), factors)
    assert relative_error(actual, expected) <= TOLERANCE
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert relative_error(grad, expected_grad) <= TOLERANCE


def test_training_run_with_expert_lora_and_fast_block(tmp_path, capfd):
    import qwen3_sft

    output_dir = tmp_path / "run"
    assert qwen3_sft.main([
        "--output_dir", str(output_dir), "--bundled_examples", "4", "--max_steps", "1", "--max_length", "32",
        "--eval_split", "0",
        "--micro_batch_size", "1", "--gradient_checkpointing", "false", "--save_strategy", "no", "--report_to", "none",
        "--use_lora", "--use_fast_moe_block", "--lora_r", "4", "--merge_lora",
    ]) == 0
    assert "expert LoRA: scattermoe low-rank path" in capfd.readouterr().err
    adapter = json.loads((output_dir / "adapter_config.json").read_text())
    assert sorted(adapter["target_parameters"]) == sorted(EXPERT_TARGETS)
    assert (output_dir / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("flags,message", [
    (["--lora_dropout", "0.1"], "--lora_dropout 0.1: peft's LoRA on expert parameters has no dropout"),
    (["--lora_target_parameters", "mlp.experts.up_proj"], "names mlp.experts.up_proj, which this model does not have"),
])
def test_expert_lora_flags_are_checked(tmp_path, flags, message):
    from turbo_tune.arguments import parse_config
    from turbo_tune.errors import ConfigError
    from turbo_tune.modeling import apply_lora, load_model

    config = parse_config(["--output_dir", str(tmp_path), "--use_lora", *flags])
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_lora(load_model(config), config)


@pytest.mark.parametrize("fast_block", [True, False], ids=["scattermoe", "peft"])
def test_log_names_the_path_the_expert_lora_takes(tmp_path, caplog, fast_block):
    """Without --use_fast_moe_block the experts fall back to peft's folding path, and the log says so."""
    import logging

    from monkey_patch import apply_patches
    from turbo_tune.arguments import parse_config
    from turbo_tune.modeling import apply_lora, load_model

    flags = ["--use_fast_moe_block"] if fast_block else []
    config = parse_config(["--output_dir", str(tmp_path), "--use_lora", *flags])
    with caplog.at_level(logging.INFO, logger="turbo_tune.modeling"):
        apply_lora(apply_patches(load_model(config), config), config)
    expected, other = "expert LoRA: scattermoe low-rank path", "expert LoRA: peft's target_parameters path"
    if not fast_block:
        expected, other = other, expected
    assert expected in caplog.text and other not in caplog.text
