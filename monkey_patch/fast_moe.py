"""``--use_fast_moe_block``: run Qwen3-MoE experts through the ScatterMoE Triton kernels.

The kernels plug into transformers' own experts dispatch (``ALL_EXPERTS_FUNCTIONS``) under the name
``scattermoe``, so the router, ``norm_topk_prob``, the load-balancing loss and ``output_router_logits`` stay
transformers' code, and the expert weights keep their layout: checkpoints save and load unchanged.

peft LoRA on the experts (``target_parameters``) runs through a low-rank path that never forms the per-expert delta.
peft's ``ParamWrapper`` activates an adapter by registering a parametrization on the weight for the length of its
forward, and registering one evaluates it: with one adapter that is a ``baddbmm`` of the whole expert stack
(``W + s·B·A``) per layer and forward, and with an FP8 weight a full fp32 delta rounded into FP8. So each wrapper of
an expert weight gets its own activation (``hand_expert_lora_to_scattermoe``): while scattermoe runs the experts and
one adapter is active it hands the experts module that adapter's factors and registers nothing; otherwise peft's own
activation runs.

Under gradient checkpointing the experts of a Qwen3-MoE decoder layer skip their down projection when the layer
is recomputed in backward (``OUTPUT_UNREAD_IN_RECOMPUTE``; scattermoe/compilable_ops.py says why that is exact).
"""

import logging
import types
from contextlib import contextmanager

import torch
import triton.language as tl
from peft.tuners.lora.layer import ParamWrapper
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer, Qwen3MoeSparseMoeBlock
from triton.runtime.interpreter import InterpretedFunction

from .frozen_experts import fp8_scale
from .model_parts import (
    check_swiglu_experts_layout,
    expert_lora_wrappers,
    experts_modules,
    register_experts_function,
    set_experts_implementation,
)
from .scattermoe.compilable_ops import scattermoe_experts
from .scattermoe.ops import LowRank

logger = logging.getLogger(__name__)

IMPLEMENTATION_NAME = "scattermoe"
ACTIVE_LORA = "scattermoe_lora"  # experts-module attribute while peft's forward runs: {weight name: LowRank}
_warned_folded_lora = False
# experts-module attribute: the block's output feeds only the layer's residual add, which saves nothing for backward
OUTPUT_UNREAD_IN_RECOMPUTE = "scattermoe_output_unread_in_recompute"


def _weight_and_lora(experts: torch.nn.Module, name: str) -> tuple[torch.Tensor, LowRank | None]:
    """The base weight and, while a peft wrapper hands them over, its LoRA factors."""
    global _warned_folded_lora
    parametrizations = getattr(experts, "parametrizations", None)
    if parametrizations is not None and name in parametrizations and not _warned_folded_lora:
        logger.warning(
            "scattermoe: peft folded its LoRA into %s (several active adapters, or peft wrapped the model after "
            "apply_fast_moe_block without hand_expert_lora_to_scattermoe); each forward builds a full expert stack.",
            name,
        )
        _warned_folded_lora = True
    return getattr(experts, name), getattr(experts, ACTIVE_LORA, {}).get(name)


def _low_rank(wrapper: ParamWrapper, adapter: str) -> LowRank:
    """peft's ``ParamWrapper.get_delta_factors`` as a LowRank, but in the adapter's dtype: peft's casts the factors to
    the weight's, which is FP8 under --fp8_frozen_experts (the op casts them to the compute dtype)."""
    a = wrapper.lora_A[adapter].weight
    b = wrapper.lora_B[adapter].weight
    a = a.reshape(wrapper.num_experts, -1, a.shape[-1])  # (E, r, in)
    b = b.reshape(b.shape[0], -1, wrapper.num_experts).permute(2, 0, 1)  # (E, out, r)
    if not wrapper._did_swap_in_out_features:  # weight stored (E, in, out): delta = Aᵀ·Bᵀ
        a, b = b.transpose(-2, -1), a.transpose(-2, -1)
    return LowRank(a=a, b=b, scale=wrapper.scaling[adapter])


@contextmanager
def _hand_over_factors(wrapper: ParamWrapper, active_adapters: list[str]):
    """Stands in for ``ParamWrapper._activate_lora`` (see the module docstring)."""
    experts = wrapper.get_base_layer()
    name = wrapper.parameter_name
    adapters = [a for a in active_adapters if a in wrapper.lora_A]
    if len(adapters) == 1 and experts.config._experts_implementation == IMPLEMENTATION_NAME:
        active = getattr(experts, ACTIVE_LORA)  # made with the hand-over (hand_expert_lora_to_scattermoe)
        active[name] = _low_rank(wrapper, adapters[0])
        try:
            yield
        finally:
            active.pop(name)
        return
    if adapters and fp8_scale(experts, name) is not None:
        raise ValueError(
            f"--fp8_frozen_experts: the FP8 {name} takes LoRA only through scattermoe with one active adapter; "
            f"here adapters {adapters} are active under the {experts.config._experts_implementation!r} experts. "
            "Activate one adapter (model.set_adapter) and keep --use_fast_moe_block, or train without the flag."
        )
    with ParamWrapper._activate_lora(wrapper, active_adapters):
        yield


def hand_expert_lora_to_scattermoe(model: torch.nn.Module) -> int:
    """Give every peft wrapper of an expert weight the factor hand-over (idempotent); returns how many."""
    wrappers = expert_lora_wrappers(model)
    for wrapper in wrappers:
        wrapper._activate_lora = types.MethodType(_hand_over_factors, wrapper)
        experts = wrapper.get_base_layer()
        if not hasattr(experts, ACTIVE_LORA):  # now, not at the first forward: torch.compile guards on it
            setattr(experts, ACTIVE_LORA, {})
    return len(wrappers)


def hands_over_factors(wrapper: ParamWrapper) -> bool:
    """Whether ``wrapper`` has the hand-over, rather than peft's own activation (which folds the adapter)."""
    return getattr(wrapper._activate_lora, "__func__", None) is _hand_over_factors


def scattermoe_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward with transformers' signature.

    Weights are read from the module at call time, never cached: DeepSpeed ZeRO-3 and FSDP gather them just
    before this runs, and peft's LoRA on them is active only then (see ``hand_expert_lora_to_scattermoe``).
    """
    if hidden_states.device.type == "cpu" and not isinstance(tl.cdiv, InterpretedFunction):
        raise RuntimeError(
            "scattermoe got CPU tensors: its Triton kernels need a GPU, or Triton's interpreter, which is on only "
            "when TRITON_INTERPRET=1 is set before triton is first imported (qwen3_sft.py does so on a machine "
            "without a GPU). Move the model to a GPU, or set the variable before your imports."
        )
    w_gate_up, gate_up_lora = _weight_and_lora(self, "gate_up_proj")
    w_down, down_lora = _weight_and_lora(self, "down_proj")
    gate_up_scale, down_scale = fp8_scale(self, "gate_up_proj"), fp8_scale(self, "down_proj")
    if gate_up_scale is not None:  # FP8 weights: the op dequantizes them to the activations' dtype
        x = hidden_states
    elif torch.is_autocast_enabled(hidden_states.device.type):
        # As nn.Linear under autocast: fp32 master weights compute in the autocast dtype (casts that autograd undoes).
        compute = torch.get_autocast_dtype(hidden_states.device.type)
        x, w_gate_up, w_down = hidden_states.to(compute), w_gate_up.to(compute), w_down.to(compute)
    else:
        x = hidden_states.to(w_gate_up.dtype)
    out = scattermoe_experts(x, w_gate_up, w_down, top_k_weights, top_k_index, gate_up_lora, down_lora,
                             gate_up_scale, down_scale, getattr(self, OUTPUT_UNREAD_IN_RECOMPUTE, False))
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
    hand_expert_lora_to_scattermoe(model)
    for layer in model.modules():  # transformers' own layer and block: the output goes into `residual + ...` alone
        if type(layer) is Qwen3MoeDecoderLayer and type(layer.mlp) is Qwen3MoeSparseMoeBlock:
            for module in experts_modules(layer.mlp):
                setattr(module, OUTPUT_UNREAD_IN_RECOMPUTE, True)
    logger.info("scattermoe experts enabled for %d experts modules", len(experts))


def revert_fast_moe_block(model: torch.nn.Module, implementation: str = "grouped_mm") -> None:
    """Switch the experts of ``model`` back to a transformers implementation (default ``grouped_mm``)."""
    set_experts_implementation(model, implementation)
    for module in experts_modules(model):
        module.__dict__.pop(OUTPUT_UNREAD_IN_RECOMPUTE, None)
    for wrapper in expert_lora_wrappers(model):
        wrapper.__dict__.pop("_activate_lora", None)  # peft's own activation again
        wrapper.get_base_layer().__dict__.pop(ACTIVE_LORA, None)
    logger.info("experts implementation reverted to %s", implementation)
