"""`--use_fast_moe_block` on a whole tiny Qwen3-MoE: same loss, aux loss and gradients as transformers."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from monkey_patch import fast_moe
from monkey_patch.fast_moe import apply_fast_moe_block, register_scattermoe, revert_fast_moe_block
from monkey_patch.torch_compile import compile_decoder_layers, compile_fell_back, uncompile_decoder_layers
from tests.numerics import relative_error
from turbo_tune.arguments import TurboTuneConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = 1e-4


def tiny_config() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        max_position_embeddings=64,
    )


def tiny_model(seed: int = 0) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(tiny_config()).to(DEVICE)
    with torch.no_grad():
        for layer in model.model.layers:  # non-zero router so routing is not a tie
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 256, (2, 11), generator=generator).to(DEVICE)
    return {"input_ids": input_ids, "labels": input_ids}


def loss_and_grads(model: Qwen3MoeForCausalLM) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    output = model(**batch())
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output.loss.detach(), output.aux_loss.detach(), grads


def test_patched_model_matches_transformers_loss_aux_loss_and_gradients():
    model = tiny_model()
    model.set_experts_implementation("eager")
    expected_loss, expected_aux, expected_grads = loss_and_grads(model)
    apply_fast_moe_block(model)
    assert model.config._experts_implementation == "scattermoe"
    loss, aux, grads = loss_and_grads(model)

    assert relative_error(loss, expected_loss) <= TOLERANCE
    assert relative_error(aux, expected_aux) <= TOLERANCE
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert relative_error(grad, expected_grads[name]) <= TOLERANCE, name
    assert any("gate_up_proj" in name for name in grads) and any("mlp.gate.weight" in name for name in grads)


def test_apply_and_revert_are_idempotent():
    model = tiny_model()
    register_scattermoe()
    register_scattermoe()
    assert "scattermoe" in ALL_EXPERTS_FUNCTIONS
    apply_fast_moe_block(model)
    apply_fast_moe_block(model)
    assert model.config._experts_implementation == "scattermoe"
    revert_fast_moe_block(model)
    revert_fast_moe_block(model)
    assert model.config._experts_implementation == "grouped_mm"
    revert_fast_moe_block(model, "eager")
    assert model.config._experts_implementation == "eager"


@pytest.mark.parametrize("compiled", [False, "body", "layer"], ids=["eager", "compiled-bodies", "compiled-layers"])
def test_checkpointed_layers_recompute_no_down_projection_and_keep_transformers_gradients(down_projections, compiled,
                                                                                          monkeypatch):
    if compiled:
        monkeypatch.setenv("TURBO_TUNE_COMPILE_CHECKPOINT", compiled)
    model = tiny_model()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.set_experts_implementation("eager")
    expected_loss, _, expected_grads = loss_and_grads(model)
    apply_fast_moe_block(model)
    if compiled:  # as --torch_compile: the checkpointed body compiled, the checkpoint around it; or inside it
        torch._dynamo.reset()
        compile_decoder_layers(model, TurboTuneConfig(output_dir="unused", report_to="none",
                                                      torch_compile_backend="aot_eager"))
    experts = [layer.mlp.experts for layer in model.model.layers]
    assert all(getattr(module, fast_moe.OUTPUT_UNREAD_IN_RECOMPUTE) for module in experts)
    shapes = down_projections(tiny_config().moe_intermediate_size, tiny_config().hidden_size)
    loss, _, grads = loss_and_grads(model)
    assert len(shapes) == len(experts)  # the forward's only
    assert relative_error(loss, expected_loss) <= TOLERANCE
    for name, grad in grads.items():
        assert relative_error(grad, expected_grads[name]) <= TOLERANCE, name
    if compiled:
        assert not compile_fell_back(model)
        uncompile_decoder_layers(model)
    revert_fast_moe_block(model)
    assert not any(hasattr(module, fast_moe.OUTPUT_UNREAD_IN_RECOMPUTE) for module in experts)


def test_apply_rejects_a_model_without_experts():
    with pytest.raises(ValueError, match="no experts modules"):
        apply_fast_moe_block(torch.nn.Linear(4, 4))


@pytest.mark.parametrize(("attribute", "value", "message"), [
    ("has_bias", True, r"layout scattermoe does not support: \{'has_bias': True\}"),
    ("is_concatenated", False, r"layout scattermoe does not support: \{'is_concatenated': False\}"),
])
def test_apply_refuses_experts_the_kernels_do_not_implement(attribute, value, message):
    model = tiny_model()
    setattr(model.model.layers[0].mlp.experts, attribute, value)
    with pytest.raises(ValueError, match=message):
        apply_fast_moe_block(model)
    assert model.config._experts_implementation != "scattermoe"


def test_apply_refuses_an_activation_other_than_silu():
    model = tiny_model()
    model.model.layers[1].mlp.experts.config = Qwen3MoeConfig(**{**tiny_config().to_dict(), "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="scattermoe fuses SiLU; Qwen3MoeExperts uses hidden_act='gelu'"):
        apply_fast_moe_block(model)


def test_cpu_forward_without_interpreter_says_to_use_a_gpu(monkeypatch):
    """Applying works on a CPU-resident model (the Trainer moves it to the GPU later); running there does not."""
    model = tiny_model().cpu()
    apply_fast_moe_block(model)
    monkeypatch.setattr(fast_moe, "InterpretedFunction", type("NotInterpreting", (), {}))  # Triton compiles
    with pytest.raises(RuntimeError, match="need a GPU, or Triton's interpreter"):
        model(torch.tensor([[1, 2, 3]]))


def test_checkpoint_round_trip_keeps_transformers_layout(tmp_path):
    model = tiny_model()
    apply_fast_moe_block(model)
    model.save_pretrained(tmp_path)
    reloaded = Qwen3MoeForCausalLM.from_pretrained(tmp_path, experts_implementation="eager").to(DEVICE)
    for (name, saved), (_, loaded) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(saved, loaded), name
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 64, 64)
    with torch.no_grad():
        expected = reloaded(**batch()).loss
        actual = model(**batch()).loss
    assert relative_error(actual, expected) <= TOLERANCE


def test_lora_on_attention_trains_with_the_patch():
    model = tiny_model()
    apply_fast_moe_block(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    apply_fast_moe_block(peft_model)
    lora_params = [p for name, p in peft_model.named_parameters() if "lora_" in name]
    before = [p.detach().clone() for p in lora_params]
    optimizer = torch.optim.SGD(lora_params, lr=0.5)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = peft_model(**batch()).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(b, p) for b, p in zip(before, lora_params, strict=True))
    assert peft_model.base_model.model.model.layers[0].mlp.experts.gate_up_proj.grad is None


def test_experts_block_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break. On CPU the aot_eager backend is used: inductor would try to
    compile around the Triton-interpreter custom ops, which is not what this pins down (no graph break)."""
    model = tiny_model()
    apply_fast_moe_block(model)
    block = model.model.layers[0].mlp
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    hidden = torch.randn(2, 5, 64, device=DEVICE, requires_grad=True)
    expected = block(hidden)
    actual = compiled(hidden)
    assert relative_error(actual, expected) <= TOLERANCE
    (grad,) = torch.autograd.grad(actual.sum(), (hidden,))
    (expected_grad,) = torch.autograd.grad(expected.sum(), (hidden,))
    assert relative_error(grad, expected_grad) <= TOLERANCE


def test_one_process_over_several_gpus_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """nn.DataParallel replicas would share an experts module's LoRA hand-over slot, so one replica could run its
    experts without the adapter: a process that sees several GPUs (no torchrun) stops with one line instead."""
    import qwen3_sft
    from turbo_tune.arguments import TurboTuneConfig

    monkeypatch.setattr(TurboTuneConfig, "n_gpu", property(lambda self: 2))
    monkeypatch.setattr(qwen3_sft, "load_model", lambda config: pytest.fail("the model must not load"))
    output_dir = tmp_path / "out"
    assert qwen3_sft.main(["--output_dir", str(output_dir), "--report_to", "none", "--use_fast_moe_block",
                           "--use_lora"]) == 2
    err = capsys.readouterr().err
    assert "one process sees 2 GPUs" in err and "bash qwen3_sft.sh" in err and err.count("\n") == 1
    assert not output_dir.exists()
