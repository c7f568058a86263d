"""The one place where Turbo-Tune's patches are chosen and applied to a model, from the flags."""

import logging

import torch

from turbo_tune.arguments import TurboTuneConfig
from turbo_tune.errors import ConfigError

logger = logging.getLogger(__name__)


def preflight(config: TurboTuneConfig) -> None:
    """Reject flags this machine cannot honour before any model is loaded."""
    if config.n_gpu > 1:
        # nn.DataParallel copies the modules into replicas each forward, sharing their Python state: the replicas of
        # an experts module would share one LoRA hand-over slot (one replica could run without its adapter).
        raise ConfigError(
            f"one process sees {config.n_gpu} GPUs, so the Trainer would wrap the model in nn.DataParallel, which "
            "Turbo-Tune does not support; start one process per GPU with `bash qwen3_sft.sh` (torchrun), or "
            "choose one GPU with CUDA_VISIBLE_DEVICES=0."
        )
    if config.torch_compile:
        from monkey_patch.torch_compile import checkpoint_compiled_inside

        checkpoint_compiled_inside()  # a misspelt TURBO_TUNE_COMPILE_CHECKPOINT, named before the model loads
    if config.use_fp8:
        from monkey_patch.fp8 import check_fp8_supported

        check_fp8_supported(config)
    if config.fsdp and not torch.cuda.is_available():
        raise ConfigError(
            "--fsdp needs CUDA GPUs: accelerate applies FSDP only on accelerators, so on the CPU the model would "
            "silently train unsharded. Drop --fsdp, or shard on the CPU with --deepspeed_config config/zero3.json."
        )
    if config.use_liger_kernel and not torch.cuda.is_available():
        raise ConfigError(
            "--use_liger_kernel needs a CUDA GPU: Liger's kernels do not run on the CPU, not even in Triton's "
            "interpreter (liger-kernel 0.8.5's RMSNorm kernel fails there); drop the flag."
        )
    if config.activation_offloading and not torch.cuda.is_available():
        raise ConfigError(
            "--activation_offloading moves activations from GPU memory to pinned CPU memory between forward and "
            "backward (TRL's OffloadActivations); without a CUDA GPU there is nothing to offload. Drop the flag."
        )
    if config.use_fast_moe_block and not torch.cuda.is_available():
        logger.warning("--use_fast_moe_block without a GPU: the Triton kernels run in the interpreter (slow).")


def apply_patches(model: torch.nn.Module, config: TurboTuneConfig) -> torch.nn.Module:
    """Apply what the flags ask for; calling it twice changes nothing more."""
    if config.use_fast_moe_block:
        from monkey_patch.fast_moe import apply_fast_moe_block

        apply_fast_moe_block(model)
        logger.info("Experts run through the ScatterMoE Triton kernels.")
    if config.use_fp8:
        from monkey_patch.fp8 import apply_fp8

        apply_fp8(model, config.fp8_recipe, config.fp8_modules, experts=config.fp8_experts)
    if config.use_liger_kernel:
        from monkey_patch.liger import configure_liger

        configure_liger(config)  # the Trainer applies Liger with this config when training starts, once
    if config.torch_compile:
        from monkey_patch.torch_compile import compile_decoder_layers

        compile_decoder_layers(model, config)
    return model


def apply_peft_patches(model: torch.nn.Module, config: TurboTuneConfig) -> torch.nn.Module:
    """What needs peft's wrappers in place: ScatterMoE taking the expert adapters as factors, then FP8 frozen
    experts (the adapters take the weights' dtype when created, so they must exist before the weights change)."""
    if config.use_fast_moe_block:
        from monkey_patch.fast_moe import hand_expert_lora_to_scattermoe

        hand_expert_lora_to_scattermoe(model)
    if config.fp8_frozen_experts:
        from monkey_patch.frozen_experts import apply_fp8_frozen_experts

        apply_fp8_frozen_experts(model)
    return model


def revert_patches(model: torch.nn.Module) -> torch.nn.Module:
    """Undo apply_patches and apply_peft_patches, so the model runs as transformers ships it (FP8 frozen
    experts come back in their dtype with their FP8 rounding)."""
    from monkey_patch.fast_moe import revert_fast_moe_block
    from monkey_patch.fp8 import revert_fp8
    from monkey_patch.frozen_experts import revert_fp8_frozen_experts
    from monkey_patch.torch_compile import uncompile_decoder_layers

    revert_fp8_frozen_experts(model)
    uncompile_decoder_layers(model)
    revert_fp8(model)
    revert_fast_moe_block(model)
    return model
