"""``--use_fast_moe_block``: run Qwen3-MoE experts through the ScatterMoE Triton kernels.

The kernels plug into transformers' own experts dispatch (``ALL_EXPERTS_FUNCTIONS``) under the name
``scattermoe``, so the router, ``norm_topk_prob``, the load-balancing loss and ``output_router_logits`` stay
transformers' code, and the expert weights keep their layout: checkpoints save and load unchanged. peft LoRA on
the experts (``target_parameters``) runs through a low-rank path that never forms the per-expert delta.
"""

import logging
import os

import torch

from .frozen_experts import fp8_scale, lora_factors
from .model_parts import (
    check_swiglu_experts_layout,
    experts_modules,
    register_experts_function,
    set_experts_implementation,
)
from .scattermoe.compilable_ops import scattermoe_experts
from .scattermoe.ops import LowRank

try:  # peft's parametrization for one unmerged adapter on a 3D parameter (peft >= 0.21); absent: fold fallback
    from peft.tuners.lora.layer import _LoraFactorsProxy
except ImportError:
    _LoraFactorsProxy = None

logger = logging.getLogger(__name__)

IMPLEMENTATION_NAME = "scattermoe"
_warned_folded_lora = False


def _weight_and_lora(experts: torch.nn.Module, name: str) -> tuple[torch.Tensor, LowRank | None]:
    """The base weight and, when peft's LoRA is active on it, its low-rank factors.

    peft's ``ParamWrapper`` (``target_parameters``) registers a parametrization on the experts module for the
    length of its forward; with one enabled, unmerged adapter it is a ``_LoraFactorsProxy`` holding the factors.
    Reading them (and the parametrization's ``original``) instead of the attribute skips peft's fold of
    ``W + s·B·A`` into a new expert stack. Any other parametrization falls back to the folded attribute.
    """
    global _warned_folded_lora
    if fp8_scale(experts, name) is not None:
        return getattr(experts, name), lora_factors(experts, name)
    parametrizations = getattr(experts, "parametrizations", None)
    if parametrizations is None or name not in parametrizations:
        return getattr(experts, name), None
    chain = parametrizations[name]
    if _LoraFactorsProxy is not None and len(chain) == 1 and isinstance(chain[0], _LoraFactorsProxy):
        proxy = chain[0]
        return chain.original, LowRank(a=proxy.rhs, b=proxy.lhs, scale=proxy.scaling)
    if not _warned_folded_lora:
        logger.warning(
            "scattermoe: %s carries a parametrization other than one peft LoRA adapter (several adapters or "
            "a newer peft); the experts use the folded weight, which costs a full expert stack.", name
        )
        _warned_folded_lora = True
    return getattr(experts, name), None


def scattermoe_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward with transformers' signature.

    Weights are read from the module at call time, never cached: DeepSpeed ZeRO-3 and FSDP gather them just
    before this runs, and peft's LoRA on them is active only then (see ``_weight_and_lora``).
    """
    if hidden_states.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "scattermoe got CPU tensors: its Triton kernels need a GPU. Move the model to a GPU, or set "
            "TRITON_INTERPRET=1 before importing triton to run them (slowly) on the CPU."
        )
    w_gate_up, gate_up_lora = _weight_and_lora(self, "gate_up_proj")
    w_down, down_lora = _weight_and_lora(self, "down_proj")
    gate_up_scale, down_scale = fp8_scale(self, "gate_up_proj"), fp8_scale(self, "down_proj")
    x = hidden_states if gate_up_scale is not None else hidden_states.to(w_gate_up.dtype)
    out = scattermoe_experts(x, w_gate_up, w_down, top_k_weights, top_k_index, gate_up_lora, down_lora,
                             gate_up_scale, down_scale)
    return out.to(hidden_states.dtype)


def register_scattermoe() -> None:
    """Add ``scattermoe`` to transformers' experts implementations (idempotent)."""
    register_experts_function(IMPLEMENTATION_NAME, scattermoe_experts_forward)


def apply_fast_moe_block(model: torch.nn.Module) -> None:
    """Switch every experts module of ``model`` (a PreTrainedModel or a peft wrapper of one) to scattermoe."""
    register_scattermoe()
    experts = experts_modules(model)
    for module in experts:
        check_swiglu_experts_layout(module, IMPLEMENTATION_NAME)
    set_experts_implementation(model, IMPLEMENTATION_NAME)
    logger.info("scattermoe experts enabled for %d experts modules", len(experts))


def revert_fast_moe_block(model: torch.nn.Module, implementation: str = "grouped_mm") -> None:
    """Switch the experts of ``model`` back to a transformers implementation (default ``grouped_mm``)."""
    set_experts_implementation(model, implementation)
    logger.info("experts implementation reverted to %s", implementation)
