"""``--torch_compile``: compile each decoder layer, and fall back to eager with one warning if compilation fails.

Per layer rather than the whole model: the layers are identical, so Dynamo compiles their graphs once and reuses
them; the ScatterMoE experts are ``torch.library`` custom ops, so they trace without a graph break; and TRL's fused
LM head and the data-dependent loss masking stay eager. torch.compile is lazy, so a failure (Dynamo or Inductor)
surfaces at the first forward: the guard catches it there, logs its cause, and runs every layer eagerly from then on,
instead of stopping the run. The Trainer's own whole-model compile is switched off (``TurboSFTTrainer``), so nothing
is compiled twice.

Gradient checkpointing (on by default) runs inside a transformers 5 layer's ``forward``. Compiled around it, the
checkpoint becomes a higher-order op in which Dynamo cannot take a graph break, and transformers' output-capturing
hooks (router logits for the load-balancing loss, ...) break the graph there (they read a ``ContextVar``): Dynamo
then ran the whole layer eagerly, compiling nothing. With those hooks deferred (below), the whole layer compiles,
the checkpoint included (``TURBO_TUNE_COMPILE_CHECKPOINT=layer``, the default): the higher-order op traces without a
break, Dynamo told not to replay the hooks' recording in the recompute
(``skip_fwd_side_effects_in_bwd_under_checkpoint``, the hooks having run once already), so AOTAutograd puts the
recompute inside the layer's compiled backward. ``body`` calls the layer eagerly and compiles the checkpointed body
instead (``_CompiledCheckpoint``), for the forward and for its recompute in backward alike; the recompute then goes
through Python again (the checkpoint's pack hooks for every saved tensor, Dynamo's guards, AOTAutograd's wrappers),
which cost 2.3 % of the full-depth LoRA step on an H200 (docs/results.md). ``body`` is also what runs with peft's
own expert LoRA and under ZeRO-3, whose graph breaks a higher-order op cannot take, and the default under Inductor's
C++ wrapper, which has no code for the compiled checkpoint's RNG-state op. Should compiling a whole layer with its
checkpoint fail anyway, the layers go on in ``body`` mode (one warning), and only if that fails too, eagerly.

Those hooks would still cut every layer into several graphs (the break at a hook inside a submodule splits each
enclosing frame too: seven graph regions a layer on a GPU profile, each with its guard check and autograd node, in a
step bound by host time). So inside compiled code a hook call is recorded instead (``_DEFERRED``, a list Dynamo
appends to as a side effect) and replayed eagerly right after the compiled call, in order, where the ``ContextVar``
reads fine: the collected outputs are the same tensors, in the same order.

The token count of a batch changes from step to step (packed rows, or padding to the longest example), and so does
the number of sequence boundaries. Left alone, Dynamo compiles a static graph first and recompiles once for each
such size as it changes (13 s apiece at the 30B-A3B shape), ending at a graph dynamic in exactly those sizes; they
are marked dynamic before the first call instead (``_mark_varying_sizes``).
"""

import logging
import os
from functools import partial

import torch
from torch._dynamo.exc import TorchDynamoException
from torch._inductor import config as inductor_config
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils.output_capturing import maybe_install_capturing_hooks

from turbo_tune.arguments import TurboTuneConfig
from turbo_tune.errors import ConfigError

from .model_parts import unwrap_peft

logger = logging.getLogger(__name__)

COMPILED_MARK = "_turbo_tune_compiled_layers"
CHECKPOINT_ENV = "TURBO_TUNE_COMPILE_CHECKPOINT"  # layer (the default) or body: see the module doc


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a Qwen3-MoE model, through a peft wrapper if there is one."""
    return unwrap_peft(model).model.layers


def root_cause(error: BaseException) -> str:
    """The innermost exception of a Dynamo/Inductor failure, on one line: that is what names the culprit."""
    while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
        error = inner
    message = next((line for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {message[:300]}"


def _call(function, *args):
    """The checkpointed layer body, called: what ``_CompiledCheckpoint`` compiles."""
    return function(*args)


_CAPTURING_HOOKS_MODULE = maybe_install_capturing_hooks.__module__  # where transformers defines the hooks
# (hook, module, args, output) of output-capturing hook calls made inside compiled code, in call order
_DEFERRED: list = []


def deferred_while_compiling(hook):
    """A forward ``hook``, recorded instead of run while Dynamo traces and replayed eagerly right after the compiled
    call (see the module doc): transformers' output-capturing hooks, and any hook that should stay out of the graph
    (the expert-load counter of turbo_tune/moe_health.py)."""

    def deferred(module, args, output):
        if torch.compiler.is_compiling():
            _DEFERRED.append((hook, module, args, output))
        else:
            hook(module, args, output)

    deferred.__wrapped__ = hook
    return deferred


def _replaying_hooks(compiled):
    """``compiled``, then the hook calls it recorded, replayed; emptied even on failure, for the next call's guard."""

    def call(*args, **kwargs):
        try:
            result = compiled(*args, **kwargs)
            calls = list(_DEFERRED)
        finally:
            _DEFERRED.clear()
        for hook, module, hook_args, output in calls:
            hook(module, hook_args, output)
        return result

    return call


def _defer_capturing_hooks(layers: torch.nn.ModuleList, defer: bool) -> None:
    """Wrap (or unwrap) the output-capturing hooks on the layers and their submodules."""
    for module in layers.modules():
        for key, hook in list(module._forward_hooks.items()):
            wrapped = getattr(hook, "__wrapped__", None)
            if defer and getattr(hook, "__module__", None) == _CAPTURING_HOOKS_MODULE:
                module._forward_hooks[key] = deferred_while_compiling(hook)
            elif not defer and getattr(wrapped, "__module__", None) == _CAPTURING_HOOKS_MODULE:
                module._forward_hooks[key] = wrapped


def _mark_varying_sizes(args: tuple, kwargs: dict) -> None:
    """Mark a layer call's token dimensions (every dimension past the first whose size is the hidden states'
    sequence length) and sequence-boundary counts (1-D integer tensors) dynamic; a hint, which Dynamo may still
    specialize. ``args`` may start with the checkpointed function, a ``partial`` that holds the keyword arguments."""
    if args and isinstance(args[0], partial):
        kwargs = {**args[0].keywords, **kwargs}
        args = args[1:]
    tensors = [t for value in (*args, *kwargs.values()) for t in (value if isinstance(value, tuple) else (value,))
               if isinstance(t, torch.Tensor)]
    if not tensors or tensors[0].dim() < 2:
        return
    tokens = tensors[0].shape[1]
    for tensor in tensors:
        if tensor.dim() == 1 and not tensor.is_floating_point():
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
            continue
        for dim in range(1, tensor.dim()):
            if tensor.shape[dim] == tokens:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)


class _Fallback:
    """Shared by the layers of one model: once compilation failed, every layer runs eagerly."""

    def __init__(self, options: dict, checkpoint_inside: bool = False) -> None:
        self.failed = False
        self.checkpoint_inside = checkpoint_inside
        self.compiled_body = _replaying_hooks(torch.compile(_call, **options))
        self.dynamo_config: dict[str, object] = {}  # what this model's compile changed in Dynamo's config, as it was

    def set_dynamo_config(self, **values) -> None:
        for name, value in values.items():
            self.dynamo_config.setdefault(name, getattr(torch._dynamo.config, name))
            setattr(torch._dynamo.config, name, value)

    def restore_dynamo_config(self) -> None:
        for name, value in self.dynamo_config.items():
            setattr(torch._dynamo.config, name, value)
        self.dynamo_config = {}

    def raise_recompile_limits(self, layers: int) -> None:
        """Give every layer the recompile budget Dynamo gives a model, when peft's own expert LoRA runs.
        Identical layers share their compiled code, but peft's LoRA on the experts parametrizes their weights, which
        gives each layer's experts a class of its own; Dynamo compiles per class, and its frames there (graph breaks
        in peft) twice a layer (gate/up, down). Past the limit (8, the fifth of 48 layers) it ran some frames eagerly
        in the forward and compiled in the checkpoint's recompute, or the reverse, and the backward stopped on a
        CheckpointError. Not for every model: under ZeRO-3, whose hooks recompile per module, the limit is what
        stops the recompiles."""
        names = ("recompile_limit", "accumulated_recompile_limit")
        self.set_dynamo_config(**{name: getattr(torch._dynamo.config, name) * layers for name in names})

    def run(self, compiled, eager, *args, **kwargs):
        """``compiled(*args, **kwargs)``, or ``eager`` (from now on) if compiling fails."""
        if not self.failed:
            _mark_varying_sizes(args, kwargs)
            try:
                return compiled(*args, **kwargs)
            except TorchDynamoException as error:
                self.failed = True
                logger.warning(
                    "--torch_compile: compiling the decoder layers failed (%s); continuing uncompiled.",
                    root_cause(error),
                )
        return eager(*args, **kwargs)

    def guard(self, layer: torch.nn.Module, compiled):
        def call(*args, **kwargs):
            checkpointed = layer.gradient_checkpointing and layer.training
            if checkpointed and self.checkpoint_inside and not self.failed:
                _mark_varying_sizes(args, kwargs)
                try:
                    return compiled(*args, **kwargs)
                except TorchDynamoException as error:
                    self.checkpoint_inside = False
                    logger.warning(
                        "--torch_compile: compiling each decoder layer with its checkpoint failed (%s); compiling the "
                        "checkpointed layer bodies instead, as %s=body does.", root_cause(error), CHECKPOINT_ENV,
                    )
            if checkpointed and not self.checkpoint_inside:
                checkpoint = layer._gradient_checkpointing_func  # set anew by each gradient_checkpointing_enable()
                if not isinstance(checkpoint, _CompiledCheckpoint):
                    layer._gradient_checkpointing_func = _CompiledCheckpoint(checkpoint, self)
                return layer._call_impl(*args, **kwargs)
            return self.run(compiled, layer._call_impl, *args, **kwargs)

        return call


class _CompiledCheckpoint:
    """A layer's gradient-checkpointing function that checkpoints the compiled body instead of the eager one."""

    def __init__(self, checkpoint, fallback: _Fallback) -> None:
        self.checkpoint, self.fallback = checkpoint, fallback

    def __call__(self, function, *args, **kwargs):
        compiled = partial(self.fallback.run, self.fallback.compiled_body, _call, function)
        return self.checkpoint(function if self.fallback.failed else compiled, *args, **kwargs)


def checkpoint_compiled_inside() -> bool:
    """Whether ``TURBO_TUNE_COMPILE_CHECKPOINT`` asks for the whole layer compiled, its checkpoint included: by
    default yes, unless Inductor's C++ wrapper is on (``TORCHINDUCTOR_CPP_WRAPPER=1``), which has no code for the
    RNG-state op a compiled checkpoint carries in torch 2.11 (its layers would all fall back to eager)."""
    cpp_wrapper = bool(inductor_config.cpp_wrapper)
    choice = os.environ.get(CHECKPOINT_ENV, "body" if cpp_wrapper else "layer")
    if choice not in ("body", "layer"):
        raise ConfigError(f"{CHECKPOINT_ENV}={choice}: use layer (compile the whole layer, its checkpoint included; "
                          "the default) or body (compile the checkpointed body, the checkpoint around it).")
    if choice == "layer" and cpp_wrapper:
        raise ConfigError(f"{CHECKPOINT_ENV}=layer cannot compile under Inductor's C++ wrapper "
                          "(TORCHINDUCTOR_CPP_WRAPPER=1): it has no code for the compiled checkpoint's RNG-state op, "
                          f"so every layer would run eagerly. Unset {CHECKPOINT_ENV} (body is then the default) or "
                          "the C++ wrapper.")
    return choice == "layer"


def compile_decoder_layers(model: torch.nn.Module, config: TurboTuneConfig) -> None:
    """Compile every decoder layer with the Trainer's backend and mode flags (idempotent)."""
    if is_compiled_per_layer(model):
        return
    options = {"backend": config.torch_compile_backend or "inductor", "mode": config.torch_compile_mode}
    peft_expert_lora = config.use_lora and config.lora_target_parameters and not config.use_fast_moe_block
    # a higher-order op takes no graph break: not with peft's own expert LoRA, nor with ZeRO-3's hooks (see below)
    inside = checkpoint_compiled_inside() and not peft_expert_lora and not is_deepspeed_zero3_enabled()
    fallback = _Fallback(options, checkpoint_inside=inside)
    layers = decoder_layers(model)
    maybe_install_capturing_hooks(unwrap_peft(model).model)  # what transformers does at the first capturing call
    _defer_capturing_hooks(layers, defer=True)
    for layer in layers:
        # What nn.Module.compile() does, with the guard around the compiled call
        layer._compiled_call_impl = fallback.guard(layer, _replaying_hooks(torch.compile(layer._call_impl, **options)))
    if peft_expert_lora:
        fallback.raise_recompile_limits(len(layers))  # peft folds the expert adapters in through parametrizations
    if fallback.checkpoint_inside:
        fallback.set_dynamo_config(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
    setattr(unwrap_peft(model), COMPILED_MARK, fallback)  # where _fallback_of finds it
    logger.info("torch.compile (%s) on each of the %d decoder layers.", options["backend"], len(layers))
    if is_deepspeed_zero3_enabled():
        logger.warning(
            "--torch_compile under ZeRO-3 trains correctly but gains little: DeepSpeed hooks every submodule to gather "
            "its weights, its pre-forward hook is excluded from compilation (a graph break at every submodule) and its "
            "post-forward hook recompiles per module until Dynamo's recompile limit. FSDP2 (--fsdp) compiles the "
            "layers without either."
        )


def _fallback_of(model: torch.nn.Module) -> _Fallback | None:
    """The compiled layers' shared state, kept on the transformers model (peft may wrap it after the compile)."""
    return getattr(unwrap_peft(model), COMPILED_MARK, None)


def is_compiled_per_layer(model: torch.nn.Module) -> bool:
    return _fallback_of(model) is not None


def compile_fell_back(model: torch.nn.Module) -> bool:
    """Whether the compiled layers hit a compilation failure and now run eagerly."""
    fallback = _fallback_of(model)
    return fallback is not None and fallback.failed


def uncompile_decoder_layers(model: torch.nn.Module) -> None:
    """Undo compile_decoder_layers: the layers run eagerly again (Liger's patches, applied by the Trainer, stay)."""
    fallback = _fallback_of(model)
    if fallback is None:
        return
    _defer_capturing_hooks(decoder_layers(model), defer=False)
    fallback.restore_dynamo_config()
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None
        if isinstance(layer.__dict__.get("_gradient_checkpointing_func"), _CompiledCheckpoint):
            layer._gradient_checkpointing_func = layer._gradient_checkpointing_func.checkpoint
    delattr(unwrap_peft(model), COMPILED_MARK)
