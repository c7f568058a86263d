"""--torch_compile and --use_liger_kernel: what gets compiled or patched, and how they compose with ScatterMoE.

Liger's kernels do not run on the CPU (not even in Triton's interpreter), so for Liger the wiring is pinned here:
the config the Trainer hands to Liger, and what Liger's patch then replaces on a model with ScatterMoE experts.
"""

import dataclasses
import logging

import pytest
import torch
from accelerate.utils import DynamoBackend
from liger_kernel.transformers.rms_norm import LigerRMSNorm
from torch._dynamo.backends.registry import lookup_backend
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.liger import apply_liger_kernel
from transformers.models.qwen3_moe import modeling_qwen3_moe

import qwen3_sft
from distributed_runs import logged
from monkey_patch import apply_patches, apply_peft_patches, preflight, revert_patches
from monkey_patch.fast_moe import IMPLEMENTATION_NAME, apply_fast_moe_block
from monkey_patch.sft_trainer import TurboSFTTrainer
from monkey_patch.torch_compile import (
    _CompiledCheckpoint,
    checkpoint_compiled_inside,
    compile_decoder_layers,
    compile_fell_back,
    is_compiled_per_layer,
)
from turbo_tune.arguments import TurboTuneConfig
from turbo_tune.errors import ConfigError
from turbo_tune.modeling import EMBEDDED_MODEL_DIR, apply_lora, load_tokenizer
from turbo_tune.toy_task import bundled_dataset


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(EMBEDDED_MODEL_DIR)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def layer_inputs(model: torch.nn.Module, tokens: int = 12) -> tuple[torch.Tensor, dict]:
    hidden = torch.randn(1, tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(tokens)[None]
    cos_sin = model.model.rotary_emb(hidden, position_ids)
    return hidden, {"position_embeddings": cos_sin, "position_ids": position_ids, "attention_mask": None}


def test_decoder_layer_with_scattermoe_compiles_without_graph_breaks():
    """fullgraph=True raises at any graph break; aot_eager traces forward and backward like Inductor would, without
    generating code around the Triton-interpreter custom ops on the CPU."""
    model = tiny_model()
    apply_fast_moe_block(model)
    layer = model.model.layers[0]
    hidden, kwargs = layer_inputs(model)
    expected = layer(hidden, **kwargs)
    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    torch._dynamo.reset()
    actual = torch.compile(layer, fullgraph=True, backend=backend)(hidden, **kwargs)
    assert rel_err(actual, expected) < 1e-5
    actual.square().sum().backward()
    assert layer.mlp.experts.gate_up_proj.grad is not None


@pytest.mark.parametrize("checkpointing", ["layer", "body", False])
def test_compiled_layers_train_like_eager_layers_with_and_without_gradient_checkpointing(checkpointing, monkeypatch):
    """Under checkpointing (the default) the layers once compiled nothing: the checkpoint, inside the compiled call,
    became a higher-order op that cannot take the output-capturing hooks' graph breaks, so Dynamo ran it all
    eagerly. Now the whole layer compiles with its checkpoint (``layer``, the default) or the checkpointed body does
    (``body``), without a graph break (the hooks' calls are replayed after it); loss, router logits and gradients
    stay those of eager layers."""
    if checkpointing:
        monkeypatch.setenv("TURBO_TUNE_COMPILE_CHECKPOINT", checkpointing)

    def train_steps(model: torch.nn.Module) -> list[tuple]:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        results = []
        for step, length in enumerate((10, 13)):  # a second length: the static-to-dynamic recompile included
            tokens = torch.randint(3, 300, (1, length), generator=torch.Generator().manual_seed(step))
            out = model(tokens, labels=tokens, use_cache=False, output_router_logits=True)
            out.loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
            results.append((out.loss.detach(), out.aux_loss.detach(), len(out.router_logits), grads))
        return results

    expected = train_steps(tiny_model())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model()
    config = TurboTuneConfig(output_dir="unused", report_to="none", torch_compile=True,
                             torch_compile_backend="aot_eager")
    compile_decoder_layers(model, config)
    actual = train_steps(model)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # 0 before, under checkpointing
    assert not torch._dynamo.utils.counters["graph_break"]  # the output-capturing hooks broke every layer before
    assert not compile_fell_back(model)
    for (loss, aux, routers, grads), (want_loss, want_aux, want_routers, want_grads) in zip(actual, expected,
                                                                                            strict=True):
        assert rel_err(loss, want_loss) < 1e-6 and rel_err(aux, want_aux) < 1e-6 and routers == want_routers
        assert max(rel_err(g, w) for g, w in zip(grads, want_grads, strict=True) if w.norm() > 0) < 1e-4
    revert_patches(model)
    assert not any(hasattr(layer.__dict__.get("_gradient_checkpointing_func"), "fallback")
                   for layer in model.model.layers)  # the Trainer's checkpoint function is back
    hooks = [hook for module in model.model.layers.modules() for hook in module._forward_hooks.values()]
    assert hooks and all(hook.__module__ == "transformers.utils.output_capturing" for hook in hooks)  # unwrapped


@pytest.mark.parametrize("checkpointing", ["body", "layer", False])
def test_compiled_layers_do_not_recompile_when_the_token_count_changes(checkpointing, monkeypatch):
    """Packing and per-batch padding change a batch's token count every step. The token dimensions are marked dynamic
    before the first compile, and the expert-LoRA hand-over's attribute exists before it, so no later step recompiles
    (each recompile cost 13 s at the 30B-A3B shape); error_on_recompile turns a recompile into a compile failure."""
    if checkpointing:
        monkeypatch.setenv("TURBO_TUNE_COMPILE_CHECKPOINT", checkpointing)
    torch._dynamo.reset()
    config = TurboTuneConfig(output_dir="unused", report_to="none", torch_compile=True, use_fast_moe_block=True,
                             use_lora=True, torch_compile_backend="aot_eager")
    model = tiny_model()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_peft_patches(apply_lora(apply_patches(model, config), config), config)
    model.train()
    for step, length in enumerate((10, 13)):
        tokens = torch.randint(3, 300, (1, length), generator=torch.Generator().manual_seed(step))
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            model(tokens, labels=tokens, use_cache=False).loss.backward()
        assert not compile_fell_back(model), f"step {step} ({length} tokens) recompiled"
    revert_patches(model)  # and Dynamo's config with it


def test_peft_expert_layers_compile_each_without_hitting_the_recompile_limit_under_checkpointing():
    """peft's LoRA on the experts parametrizes their weights, which gives every layer's experts a class of its own:
    Dynamo guards on it and compiles the checkpointed body's frames per layer, twice (gate/up, down). Past its
    recompile limit (8: from the fifth of 48 layers) it ran frames eagerly in the forward and compiled in the
    recompute, or the reverse, and the backward stopped with a CheckpointError. Here the limit is 2, which the first
    of the 2 layers uses up."""

    def train_step(model: torch.nn.Module) -> tuple:
        tokens = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))
        loss = model(tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    config = TurboTuneConfig(output_dir="unused", report_to="none", torch_compile=True, use_lora=True,
                             torch_compile_backend="aot_eager")

    def peft_model(compiled: bool) -> torch.nn.Module:
        model = tiny_model()
        if compiled:
            compile_decoder_layers(model, config)  # before peft wraps the layers, as apply_patches does
        model = apply_lora(model, config)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        return model

    expected_loss, expected_grads = train_step(peft_model(compiled=False))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2, accumulated_recompile_limit=16):
        model = peft_model(compiled=True)
        loss, grads = train_step(model)
        revert_patches(model)
        assert torch._dynamo.config.recompile_limit == 2  # restored
        # layers alike (no LoRA, or LoRA through ScatterMoE): the limit stays, as ZeRO-3's per-module recompiles need
        for flags in ({"use_lora": False}, {"use_fast_moe_block": True}):
            compile_decoder_layers(plain := tiny_model(), dataclasses.replace(config, **flags))
            assert torch._dynamo.config.recompile_limit == 2
            revert_patches(plain)
    assert not compile_fell_back(model)
    assert rel_err(loss, expected_loss) < 1e-6
    assert max(rel_err(g, w) for g, w in zip(grads, expected_grads, strict=True) if w.norm() > 0) < 1e-4


def test_failed_compile_falls_back_to_eager_with_a_warning(caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("backend exploded on purpose")

    torch._dynamo.reset()
    model = tiny_model()
    tokens = torch.randint(3, 300, (1, 10))
    expected = model(tokens, use_cache=False).logits
    config = TurboTuneConfig(output_dir="unused", report_to="none", torch_compile=True)
    config.torch_compile_backend = broken_backend
    compile_decoder_layers(model, config)
    with caplog.at_level(logging.WARNING, logger="monkey_patch.torch_compile"):
        actual = model(tokens, use_cache=False).logits
    assert rel_err(actual, expected) < 1e-6
    warnings = [r.getMessage() for r in caplog.records if "continuing uncompiled" in r.getMessage()]
    assert len(warnings) == 1 and "backend exploded on purpose" in warnings[0]
    assert compile_fell_back(model)
    revert_patches(model)
    assert not is_compiled_per_layer(model) and all(layer._compiled_call_impl is None for layer in model.model.layers)


@pytest.mark.parametrize(("flags", "rope", "swiglu"), [
    ({}, None, None),
    ({"use_fast_moe_block": True}, None, False),
    ({"torch_compile": True, "torch_compile_backend": "aot_eager"}, False, None),
    ({"use_fast_moe_block": True, "torch_compile": True, "torch_compile_backend": "aot_eager"}, False, False),
])
def test_liger_config_keeps_scattermoe_and_compile_working(tmp_path, monkeypatch, flags, rope, swiglu):
    """The config is built as qwen3_sft.py builds it; Liger's patch then runs as Trainer.train runs it."""
    for name in ("apply_rotary_pos_emb", "Qwen3MoeRMSNorm", "Qwen3MoeExperts"):  # Liger patches these module-wide
        monkeypatch.setattr(modeling_qwen3_moe, name, getattr(modeling_qwen3_moe, name))
    config = TurboTuneConfig(output_dir=str(tmp_path), report_to="none", use_liger_kernel=True, max_length=64,
                             eval_split=0, **flags)
    model = apply_patches(tiny_model(), config)
    trainer = TurboSFTTrainer(model=model, args=config, train_dataset=bundled_dataset(8, seed=0),
                              processing_class=load_tokenizer(config))
    liger_config = trainer.args.liger_kernel_config
    assert liger_config.get("rope") is rope and liger_config.get("rms_norm") is rope
    assert liger_config.get("swiglu") is swiglu
    assert liger_config["fused_linear_cross_entropy"] is False  # TRL's fused LM head: no logits, token accuracy kept
    assert trainer.accelerator.state.dynamo_plugin.backend == DynamoBackend.NO  # layers compiled once, by us
    assert is_compiled_per_layer(trainer.model) == bool(flags.get("torch_compile"))

    apply_liger_kernel(trainer.model, liger_config)
    layer = trainer.model.model.layers[0]
    norm_forward = getattr(layer.input_layernorm.forward, "__func__", None)
    assert (norm_forward is LigerRMSNorm.forward) == (rope is None)  # both stay out under --torch_compile
    experts_forward = layer.mlp.experts.forward.__func__.__qualname__
    if swiglu is False:
        assert experts_forward.startswith("Qwen3MoeExperts")  # transformers' dispatch, which routes to scattermoe
        assert layer.mlp.experts.config._experts_implementation == IMPLEMENTATION_NAME
    else:
        assert experts_forward.startswith("LigerExperts")
    rope_name = modeling_qwen3_moe.apply_rotary_pos_emb.__name__
    assert (rope_name == "liger_rotary_pos_emb") == (rope is None)


def test_liger_is_refused_on_the_cpu_with_the_reason(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU-only refusal")
    config = TurboTuneConfig(output_dir=str(tmp_path), report_to="none", use_liger_kernel=True)
    with pytest.raises(ConfigError, match="interpreter"):
        preflight(config)


def test_compiled_packed_scattermoe_run_with_gradient_checkpointing(tmp_path, caplog):
    """The flags together through the entry point, with gradient checkpointing on (the default), compiled for real."""
    torch._dynamo.reset()
    output_dir = tmp_path / "run"
    assert qwen3_sft.main([
        "--output_dir", str(output_dir), "--bundled_examples", "64", "--max_steps", "2", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--max_length", "128", "--micro_batch_size", "4",
        "--eval_split", "0", "--use_packing", "--use_fast_moe_block", "--torch_compile",
        "--torch_compile_backend", "aot_eager",
    ]) == 0
    assert not [r for r in caplog.records if "continuing uncompiled" in r.getMessage()]
    load = logged(output_dir, "moe_load_max_over_mean")
    assert sorted(load) == [1, 2] and min(load.values()) >= 1  # the health hook ran in every step too


def train_step(model: torch.nn.Module) -> tuple:
    """Loss, load-balancing loss, parameter gradients and the elements of the floating-point activations autograd
    keeps for backward (weights aside) of one step on fixed tokens."""
    tokens = torch.randint(3, 300, (1, 64), generator=torch.Generator().manual_seed(0))
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point() and tensor.untyped_storage().data_ptr() not in parameters:
            saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(tokens, labels=tokens, use_cache=False, output_router_logits=True)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out.loss.detach(), out.aux_loss.detach(), grads, sum(saved)


def fast_moe_model(checkpointing: bool) -> torch.nn.Module:
    model = tiny_model()
    apply_fast_moe_block(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


@torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False)  # monkeypatch would delete it
def test_whole_layer_compile_recomputes_the_checkpointed_layer_inside_its_compiled_backward(monkeypatch):
    """TURBO_TUNE_COMPILE_CHECKPOINT=layer (the default): the checkpoint is traced into the layer's graph, so the
    experts run again in backward (called from the compiled backward, not by the checkpoint's Python) and the forward
    keeps a fraction of the activations an uncheckpointed model keeps; loss, load-balancing loss and gradients stay
    those of eager checkpointed layers, in one graph a layer."""
    from monkey_patch.scattermoe import kernels

    *_, uncheckpointed_saved = train_step(fast_moe_model(checkpointing=False))
    want_loss, want_aux, want_grads, _ = train_step(fast_moe_model(checkpointing=True))
    monkeypatch.setenv("TURBO_TUNE_COMPILE_CHECKPOINT", "layer")
    model = fast_moe_model(checkpointing=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_decoder_layers(model, TurboTuneConfig(output_dir="unused", report_to="none",
                                                  torch_compile_backend="aot_eager"))
    assert torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint
    in_backward, gate_up = [], kernels.gather_gate_up_swiglu

    def counting(*args, **kwargs):
        in_backward.append(torch._C._current_graph_task_id() != -1)
        return gate_up(*args, **kwargs)

    monkeypatch.setattr(kernels, "gather_gate_up_swiglu", counting)
    loss, aux, grads, saved = train_step(model)
    layers = len(model.model.layers)
    assert in_backward == [False] * layers + [True] * layers  # each layer's forward, then its recompute
    assert saved < 0.3 * uncheckpointed_saved  # 0.23 here, and 0.22 with the checkpoint around the compiled body
    assert not compile_fell_back(model) and not torch._dynamo.utils.counters["graph_break"]
    assert not any(isinstance(layer.__dict__.get("_gradient_checkpointing_func"), _CompiledCheckpoint)
                   for layer in model.model.layers)  # nothing checkpoints around the compiled call
    assert rel_err(loss, want_loss) < 1e-6 and rel_err(aux, want_aux) < 1e-6
    assert max(rel_err(g, w) for g, w in zip(grads, want_grads, strict=True) if w.norm() > 0) < 1e-4
    revert_patches(model)
    assert not torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint  # restored


@torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False)
def test_a_whole_layer_compile_that_fails_goes_on_compiling_the_checkpointed_bodies_not_eagerly(monkeypatch, caplog):
    """A backend that cannot take the checkpoint's higher-order op: one warning, then every layer checkpoints its
    compiled body (body mode), with the losses and gradients of eager checkpointed layers."""
    compiled_graphs = []

    def backend_without_checkpoints(graph_module, example_inputs):
        if any("checkpoint" in str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"):
            raise RuntimeError("no checkpoint in a graph, on purpose")
        compiled_graphs.append(graph_module)
        return lookup_backend("aot_eager")(graph_module, example_inputs)

    want_loss, want_aux, want_grads, _ = train_step(fast_moe_model(checkpointing=True))
    monkeypatch.setenv("TURBO_TUNE_COMPILE_CHECKPOINT", "layer")
    model = fast_moe_model(checkpointing=True)
    torch._dynamo.reset()
    config = TurboTuneConfig(output_dir="unused", report_to="none")
    config.torch_compile_backend = backend_without_checkpoints
    compile_decoder_layers(model, config)
    with caplog.at_level(logging.WARNING, logger="monkey_patch.torch_compile"):
        loss, aux, grads, _ = train_step(model)
        train_step(model)
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "monkey_patch.torch_compile" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "compiling the checkpointed layer bodies instead" in warnings[0]
    assert "no checkpoint in a graph, on purpose" in warnings[0]
    assert compiled_graphs and not compile_fell_back(model)
    assert all(isinstance(layer.__dict__.get("_gradient_checkpointing_func"), _CompiledCheckpoint)
               for layer in model.model.layers)
    assert rel_err(loss, want_loss) < 1e-6 and rel_err(aux, want_aux) < 1e-6
    assert max(rel_err(g, w) for g, w in zip(grads, want_grads, strict=True) if w.norm() > 0) < 1e-4
    revert_patches(model)


def test_a_misspelt_compile_checkpoint_choice_is_refused_before_the_model_loads(monkeypatch):
    monkeypatch.setenv("TURBO_TUNE_COMPILE_CHECKPOINT", "inside")
    with pytest.raises(ConfigError, match="TURBO_TUNE_COMPILE_CHECKPOINT=inside: use layer"):
        preflight(TurboTuneConfig(output_dir="unused", report_to="none", torch_compile=True))


def test_under_the_cpp_wrapper_the_checkpointed_body_compiles_and_a_layer_choice_is_refused_before_loading(
        monkeypatch):
    """Inductor's C++ wrapper has no code for a compiled checkpoint's RNG-state op (every layer fell back to eager
    on an H200): with it the default is ``body``, and asking for ``layer`` is a configuration error."""
    with torch._inductor.config.patch(cpp_wrapper=True):
        assert not checkpoint_compiled_inside()
        monkeypatch.setenv("TURBO_TUNE_COMPILE_CHECKPOINT", "layer")
        with pytest.raises(ConfigError, match=r"=layer cannot compile under Inductor's C\+\+ wrapper"):
            preflight(TurboTuneConfig(output_dir="unused", report_to="none", torch_compile=True))
    assert checkpoint_compiled_inside()
    monkeypatch.delenv("TURBO_TUNE_COMPILE_CHECKPOINT")
    assert checkpoint_compiled_inside()  # the default without the wrapper


@pytest.mark.parametrize("setting", ["peft_expert_lora", "zero3"])
def test_whole_layer_compile_stays_off_where_the_layer_has_graph_breaks(monkeypatch, setting):
    """peft's own expert LoRA and ZeRO-3's hooks break the graph inside the layer, which a checkpoint traced in as a
    higher-order op cannot take: there the checkpointed body is compiled, as by default."""
    from monkey_patch import torch_compile

    monkeypatch.setenv("TURBO_TUNE_COMPILE_CHECKPOINT", "layer")
    config = TurboTuneConfig(output_dir="unused", report_to="none", torch_compile=True,
                             torch_compile_backend="aot_eager", use_lora=setting == "peft_expert_lora")
    monkeypatch.setattr(torch_compile, "is_deepspeed_zero3_enabled", lambda: setting == "zero3")
    compile_decoder_layers(model := tiny_model(), config)
    assert not torch_compile._fallback_of(model).checkpoint_inside
    revert_patches(model)
    compile_decoder_layers(model, dataclasses.replace(config, use_lora=False))
    assert torch_compile._fallback_of(model).checkpoint_inside == (setting != "zero3")
    revert_patches(model)
