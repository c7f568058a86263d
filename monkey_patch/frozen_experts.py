"""``--fp8_frozen_experts``: keep LoRA's frozen expert weights in FP8, at half the memory of bf16.

Under LoRA the experts' ``gate_up_proj`` and ``down_proj`` never change, and they are most of a Qwen3-MoE model
(~54 of Qwen3-30B-A3B's 57 GiB). Each is stored as float8 e4m3 with one fp32 scale per expert row (amax / 448), as
a frozen ``Parameter`` of that dtype, and the scale as a buffer ``<name>_fp8_scale`` beside it. The ScatterMoE op
dequantizes a layer's weights to the compute dtype when the layer runs, forward and backward (a checkpointed
layer's backward takes its recompute's copy), and autograd keeps only the FP8 tensors, so at most one layer's bf16
copy exists at a time. peft's adapters are created first, in the weights' original dtype (quantize after
``get_peft_model``), and train as usual; saved adapters are ordinary peft adapters for the original full-precision
model.

peft would fold the adapters into FP8 weights (a full fp32 delta per forward, rounded into FP8); ScatterMoE takes
them as factors instead (``fast_moe.hand_expert_lora_to_scattermoe``), which must be in place first.
"""

import logging

import torch
from torch.nn.parallel import DistributedDataParallel

from .model_parts import expert_lora_wrappers, experts_modules
from .scattermoe.compilable_ops import dequantize

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
SCALE_SUFFIX = "_fp8_scale"


def quantize_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, N, K) weight -> FP8 weight and fp32 scales (E, N, 1), one per output row of each expert."""
    amax = weight.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / torch.finfo(FP8).max, torch.ones_like(amax))
    return (weight.detach().float() / scale).to(FP8), scale


def fp8_scale(experts: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The scale of ``experts.<name>`` when it is stored in FP8, else None."""
    return getattr(experts, name + SCALE_SUFFIX, None)


def apply_fp8_frozen_experts(model: torch.nn.Module) -> None:
    """Store every frozen expert weight of ``model`` (after peft wrapped it) in FP8 (idempotent)."""
    from .fast_moe import hands_over_factors  # here: fast_moe imports this module

    folding = [w.parameter_name for w in expert_lora_wrappers(model) if not hands_over_factors(w)]
    if folding:
        raise ValueError(
            f"--fp8_frozen_experts: peft would fold its LoRA into the FP8 weights of {folding[0]}; run "
            "apply_fast_moe_block (or hand_expert_lora_to_scattermoe) on the peft model first."
        )
    modules = experts_modules(model)
    saved_gib = 0.0
    for experts in modules:
        for name in EXPERT_WEIGHTS:
            weight = getattr(experts, name)
            if weight.dtype == FP8:
                continue
            if weight.requires_grad:
                raise ValueError(
                    f"--fp8_frozen_experts: {name} trains, so it cannot be stored in FP8; the flag is for LoRA, "
                    "where the expert weights are frozen."
                )
            quantized, scale = quantize_rowwise(weight)
            saved_gib += (weight.numel() * (weight.element_size() - quantized.element_size())) / 1024**3
            setattr(experts, name, torch.nn.Parameter(quantized, requires_grad=False))
            experts.register_buffer(name + SCALE_SUFFIX, scale, persistent=False)
            experts.fp8_frozen_from = weight.dtype
    # Every rank quantizes the same checkpoint the same way: DDP need not broadcast these (gloo cannot broadcast FP8).
    frozen = [n for n, p in model.named_parameters() if p.dtype == FP8]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, frozen + [n for n, _ in model.named_buffers() if n.endswith(SCALE_SUFFIX)]
    )
    logger.info("FP8 frozen experts: %d experts modules, %.2f GiB of weights saved.", len(modules), saved_gib)


def revert_fp8_frozen_experts(model: torch.nn.Module) -> None:
    """Dequantize the expert weights back to their original dtype (the FP8 rounding stays)."""
    for experts in experts_modules(model):
        for name in EXPERT_WEIGHTS:
            scale = fp8_scale(experts, name)
            if scale is None:
                continue
            weight = dequantize(getattr(experts, name), scale, experts.fp8_frozen_from)
            setattr(experts, name, torch.nn.Parameter(weight, requires_grad=False))
            delattr(experts, name + SCALE_SUFFIX)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [])
