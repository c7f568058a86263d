"""``--fp8_frozen_experts``: keep LoRA's frozen expert weights in FP8, at half the memory of bf16.

Under LoRA the experts' ``gate_up_proj`` and ``down_proj`` never change, and they are most of a Qwen3-MoE model
(~54 of Qwen3-30B-A3B's 57 GiB). Each is stored as float8 e4m3 with one fp32 scale per expert row (amax / 448), as
a frozen ``Parameter`` of that dtype, and the scale as a buffer ``<name>_fp8_scale`` beside it. The ScatterMoE op
dequantizes a layer's weights to the compute dtype when the layer runs, forward and backward, and keeps only the
FP8 tensor for backward, so no bf16 copy outlives its layer. peft's adapters are created first, in the weights'
original dtype (quantize after ``get_peft_model``), and train as usual; saved adapters are ordinary peft adapters
for the original full-precision model.

peft's ``ParamWrapper`` treats an FP8 parameter as one to fold: each forward it forms the whole delta ``s·B·A`` of
the expert stack in fp32, adds it to the FP8 values and rounds the sum back to FP8 (which also adds it in the
wrong units, the weights being scaled). So each wrapper of a quantized weight gets its own adapter activation
instead: it hands the experts module the low-rank factors in the original dtype for the length of the forward,
and ScatterMoE applies them per routed token (``lora_factors``).
"""

import logging
import types
from contextlib import contextmanager

import torch
from torch.nn.parallel import DistributedDataParallel

from .model_parts import experts_modules
from .scattermoe.compilable_ops import dequantize
from .scattermoe.ops import LowRank

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
SCALE_SUFFIX = "_fp8_scale"
ACTIVE_LORA = "fp8_active_lora"  # experts-module attribute: {weight name: LowRank} while a peft forward runs


def quantize_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, N, K) weight -> FP8 weight and fp32 scales (E, N, 1), one per output row of each expert."""
    amax = weight.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / torch.finfo(FP8).max, torch.ones_like(amax))
    return (weight.detach().float() / scale).to(FP8), scale


def fp8_scale(experts: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The scale of ``experts.<name>`` when it is stored in FP8, else None."""
    return getattr(experts, name + SCALE_SUFFIX, None)


def lora_factors(experts: torch.nn.Module, name: str) -> LowRank | None:
    """The LoRA factors of FP8 weight ``experts.<name>`` while its peft wrapper runs, else None."""
    return getattr(experts, ACTIVE_LORA, {}).get(name)


def _low_rank(wrapper: torch.nn.Module, adapter: str, dtype: torch.dtype) -> LowRank:
    """peft's ``ParamWrapper.get_delta_factors`` in ``dtype`` rather than the parameter's (FP8) one."""
    a = wrapper.lora_A[adapter].weight
    b = wrapper.lora_B[adapter].weight
    a = a.reshape(wrapper.num_experts, -1, a.shape[-1])  # (E, r, in)
    b = b.reshape(b.shape[0], -1, wrapper.num_experts).permute(2, 0, 1)  # (E, out, r)
    if not wrapper._did_swap_in_out_features:  # weight stored (E, in, out): delta = Aᵀ·Bᵀ
        a, b = b.transpose(-2, -1), a.transpose(-2, -1)
    return LowRank(a=a.to(dtype), b=b.to(dtype), scale=wrapper.scaling[adapter])


@contextmanager
def _activate_factors(wrapper: torch.nn.Module, active_adapters: list[str]):
    """Stands in for ``ParamWrapper._activate_lora`` on an FP8 weight: expose the factors, fold nothing."""
    adapters = [a for a in active_adapters if a in wrapper.lora_A]
    if not adapters:
        yield
        return
    if len(adapters) > 1:
        raise ValueError(
            f"--fp8_frozen_experts runs one LoRA adapter at a time on the experts; adapters {adapters} are active. "
            "Activate one (model.set_adapter) or train without --fp8_frozen_experts."
        )
    experts = wrapper.get_base_layer()
    active = getattr(experts, ACTIVE_LORA, {})
    active[wrapper.parameter_name] = _low_rank(wrapper, adapters[0], experts.fp8_frozen_from)
    setattr(experts, ACTIVE_LORA, active)
    try:
        yield
    finally:
        active.pop(wrapper.parameter_name)


def _fp8_param_wrappers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """peft's wrappers of the expert weights stored in FP8."""
    return [
        module for module in model.modules()
        if hasattr(module, "parameter_name") and hasattr(module, "get_base_layer")
        and fp8_scale(module.get_base_layer(), module.parameter_name) is not None
    ]


def apply_fp8_frozen_experts(model: torch.nn.Module) -> None:
    """Store every frozen expert weight of ``model`` (after peft wrapped it) in FP8 (idempotent)."""
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
    for wrapper in _fp8_param_wrappers(model):
        wrapper._activate_lora = types.MethodType(_activate_factors, wrapper)
    # Every rank quantizes the same checkpoint the same way: DDP need not broadcast these (gloo cannot broadcast FP8).
    frozen = [n for n, p in model.named_parameters() if p.dtype == FP8]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, frozen + [n for n, _ in model.named_buffers() if n.endswith(SCALE_SUFFIX)]
    )
    logger.info("FP8 frozen experts: %d experts modules, %.2f GiB of weights saved.", len(modules), saved_gib)


def revert_fp8_frozen_experts(model: torch.nn.Module) -> None:
    """Dequantize the expert weights back to their original dtype (the FP8 rounding stays)."""
    for wrapper in _fp8_param_wrappers(model):
        del wrapper._activate_lora  # peft's own method again
    for experts in experts_modules(model):
        for name in EXPERT_WEIGHTS:
            scale = fp8_scale(experts, name)
            if scale is None:
                continue
            weight = dequantize(getattr(experts, name), scale, experts.fp8_frozen_from)
            setattr(experts, name, torch.nn.Parameter(weight, requires_grad=False))
            delattr(experts, name + SCALE_SUFFIX)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [])
