"""LoRA on the experts inside the ScatterMoE block, with the low-rank factors kept apart.

peft's ``target_parameters`` folds ``W + s·B·A`` into a new (E, out, in) tensor on every forward, so its cost
grows with the expert count. Here each routed (token, expert) row computes ``x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` instead: two
rank-r grouped matmuls over the routed rows, with the ``(x·Aᵀ)·Bᵀ`` term accumulated into the base matmul's
tile (no delta, no extra activation-sized buffer). Backward is hand-written and gives the factors' gradients
and nothing for the frozen base weights.

Factors use peft's per-expert layout (see ``ParamWrapper.get_delta_factors``): for a weight (E, N, K),
``a`` is (E, r, K) and ``b`` is (E, N, r), so the delta is ``scale * b @ a``.
"""

from typing import NamedTuple

import torch

from . import kernels
from .ops import compute_routing


class LowRank(NamedTuple):
    """One projection's LoRA: delta = scale * b @ a, with a (E, r, K) and b (E, N, r)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


def lora_experts_forward(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    routing_weights: torch.Tensor,
    sorted_pairs: torch.Tensor,
    expert_ends: torch.Tensor,
    a_gate_up: torch.Tensor | None,
    b_gate_up: torch.Tensor | None,
    scale_gate_up: float,
    a_down: torch.Tensor | None,
    b_down: torch.Tensor | None,
    scale_down: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Block output (T, H), pre-activations and h as in ops.experts_forward, and the scaled rank-r inputs of
    B for backward: su = s·x·A_guᵀ and sv = s·h·A_downᵀ, (T*k, r) grouped (None without that adapter)."""
    num_tokens, top_k = routing_weights.shape
    su = sv = None
    if a_gate_up is not None:
        su = kernels.scatter_matmul(
            x, a_gate_up.transpose(1, 2), sorted_pairs, expert_ends, top_k, a_gathered=True, y_scattered=False
        ).mul_(scale_gate_up)
    gate_up, h = kernels.gather_gate_up_swiglu(
        x, w_gate_up.transpose(1, 2), routing_weights.reshape(-1), sorted_pairs, expert_ends, top_k,
        a2=su, w2=None if su is None else b_gate_up.transpose(1, 2),
    )
    if a_down is not None:
        sv = kernels.scatter_matmul(
            h, a_down.transpose(1, 2), sorted_pairs, expert_ends, top_k, a_gathered=False, y_scattered=False
        ).mul_(scale_down)
    out_pairs = kernels.scatter_matmul(
        h, w_down.transpose(1, 2), sorted_pairs, expert_ends, top_k, a_gathered=False, y_scattered=True,
        a2=sv, w2=None if sv is None else b_down.transpose(1, 2),
    )
    return out_pairs.view(num_tokens, top_k, -1).sum(1), gate_up, h, su, sv


def _factor_grad(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(like.shape, device=like.device, dtype=dtype)


def lora_experts_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    routing_weights: torch.Tensor,
    sorted_pairs: torch.Tensor,
    expert_ends: torch.Tensor,
    gate_up: torch.Tensor,
    h: torch.Tensor,
    a_gate_up: torch.Tensor | None,
    b_gate_up: torch.Tensor | None,
    scale_gate_up: float,
    a_down: torch.Tensor | None,
    b_down: torch.Tensor | None,
    scale_down: float,
    su: torch.Tensor | None,
    sv: torch.Tensor | None,
    needs_weight_grads: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of x, w_gate_up, w_down (None unless needs_weight_grads), routing_weights, and of the factors
    a_gate_up, b_gate_up, a_down, b_down (None without that adapter).

    With P = x·Wᵀ + s·(x·Aᵀ)·Bᵀ: dB = dPᵀ·su, ds_u = s·dP·B, dA = ds_uᵀ·x and dx = dP·W + ds_u·A, per expert.
    """
    num_tokens, top_k = routing_weights.shape
    grad_out = grad_out.to(x.dtype).contiguous()  # autocast can hand back an fp32 gradient for a bf16 output
    routing = (sorted_pairs, expert_ends, top_k)
    grad_a_gu = grad_b_gu = grad_a_down = grad_b_down = grad_w_gate_up = grad_w_down = None

    dsv = None
    if a_down is not None:
        dsv = kernels.scatter_matmul(grad_out, b_down, *routing, a_gathered=True, y_scattered=False).mul_(scale_down)
        grad_b_down = kernels.grouped_weight_grad(grad_out, sv, *routing, a_gathered=True, b_gathered=False,
                                                  dw=_factor_grad(b_down, x.dtype))
        grad_a_down = kernels.grouped_weight_grad(dsv, h, *routing, a_gathered=False, b_gathered=False,
                                                  dw=_factor_grad(a_down, x.dtype))
    grad_h = kernels.scatter_matmul(grad_out, w_down, *routing, a_gathered=True, y_scattered=False, a2=dsv, w2=a_down)
    del dsv
    grad_gate_up, grad_scale = kernels.swiglu_backward(grad_h, gate_up, sorted_pairs, routing_weights.reshape(-1))
    del grad_h

    dsu = None
    if a_gate_up is not None:
        dsu = kernels.scatter_matmul(grad_gate_up, b_gate_up, *routing, a_gathered=False,
                                     y_scattered=False).mul_(scale_gate_up)
        grad_b_gu = kernels.grouped_weight_grad(grad_gate_up, su, *routing, a_gathered=False, b_gathered=False,
                                                dw=_factor_grad(b_gate_up, x.dtype))
        grad_a_gu = kernels.grouped_weight_grad(dsu, x, *routing, a_gathered=False, b_gathered=True,
                                                dw=_factor_grad(a_gate_up, x.dtype))
    grad_x = kernels.scatter_matmul(grad_gate_up, w_gate_up, *routing, a_gathered=False, y_scattered=True,
                                    a2=dsu, w2=a_gate_up)
    del dsu
    grad_x = grad_x.view(num_tokens, top_k, -1).sum(1)
    if needs_weight_grads:
        grad_w_gate_up = kernels.grouped_weight_grad(
            grad_gate_up, x, *routing, a_gathered=False, b_gathered=True,
            dw=torch.empty_like(w_gate_up, memory_format=torch.contiguous_format),
        )
        del grad_gate_up
        grad_w_down = kernels.grouped_weight_grad(
            grad_out, h, *routing, a_gathered=True, b_gathered=False,
            dw=torch.empty_like(w_down, memory_format=torch.contiguous_format),
        )
    grad_weights = grad_scale.view(num_tokens, top_k).to(routing_weights.dtype)
    return grad_x, grad_w_gate_up, grad_w_down, grad_weights, grad_a_gu, grad_b_gu, grad_a_down, grad_b_down


def _or_empty(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: an absent result travels as an empty tensor."""
    return like.new_empty(0) if tensor is None else tensor


@torch.library.custom_op("turbo_tune::scattermoe_lora_experts_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    routing_weights: torch.Tensor,
    sorted_pairs: torch.Tensor,
    expert_ends: torch.Tensor,
    a_gate_up: torch.Tensor | None,
    b_gate_up: torch.Tensor | None,
    scale_gate_up: float,
    a_down: torch.Tensor | None,
    b_down: torch.Tensor | None,
    scale_down: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, gate_up, h, su, sv = lora_experts_forward(
        x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends,
        a_gate_up, b_gate_up, scale_gate_up, a_down, b_down, scale_down,
    )
    return out, gate_up, h, _or_empty(su, x), _or_empty(sv, x)


@_forward_op.register_fake
def _forward_fake(x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends,
                  a_gate_up, b_gate_up, scale_gate_up, a_down, b_down, scale_down):
    num_rows = sorted_pairs.shape[0]
    two_inter = w_gate_up.shape[1]

    def low_rank(a):
        return x.new_empty(0) if a is None else x.new_empty(num_rows, a.shape[1])

    return (
        x.new_empty(x.shape),
        x.new_empty(num_rows, two_inter),
        x.new_empty(num_rows, two_inter // 2),
        low_rank(a_gate_up),
        low_rank(a_down),
    )


@torch.library.custom_op("turbo_tune::scattermoe_lora_experts_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    routing_weights: torch.Tensor,
    sorted_pairs: torch.Tensor,
    expert_ends: torch.Tensor,
    gate_up: torch.Tensor,
    h: torch.Tensor,
    a_gate_up: torch.Tensor | None,
    b_gate_up: torch.Tensor | None,
    scale_gate_up: float,
    a_down: torch.Tensor | None,
    b_down: torch.Tensor | None,
    scale_down: float,
    su: torch.Tensor | None,
    sv: torch.Tensor | None,
    needs_weight_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    grads = lora_experts_backward(
        grad_out, x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends, gate_up, h,
        a_gate_up, b_gate_up, scale_gate_up, a_down, b_down, scale_down, su, sv, needs_weight_grads,
    )
    return tuple(_or_empty(grad, x) for grad in grads)


@_backward_op.register_fake
def _backward_fake(grad_out, x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends, gate_up, h,
                   a_gate_up, b_gate_up, scale_gate_up, a_down, b_down, scale_down, su, sv, needs_weight_grads):
    def like(tensor, present=True):
        return x.new_empty(tensor.shape) if tensor is not None and present else x.new_empty(0)

    return (
        like(x), like(w_gate_up, needs_weight_grads), like(w_down, needs_weight_grads),
        routing_weights.new_empty(routing_weights.shape),
        like(a_gate_up), like(b_gate_up), like(a_down), like(b_down),
    )


def _setup_context(ctx, inputs, output):
    (x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends,
     a_gate_up, b_gate_up, scale_gate_up, a_down, b_down, scale_down) = inputs
    _, gate_up, h, su, sv = output
    ctx.mark_non_differentiable(gate_up, h, su, sv)
    ctx.scales = (scale_gate_up, scale_down)
    ctx.has_lora = (a_gate_up is not None, a_down is not None)
    ctx.save_for_backward(x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends, gate_up, h,
                          a_gate_up, b_gate_up, a_down, b_down, su, sv)


def _backward(ctx, grad_out, _grad_gate_up, _grad_h, _grad_su, _grad_sv):
    (x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends, gate_up, h,
     a_gate_up, b_gate_up, a_down, b_down, su, sv) = ctx.saved_tensors
    scale_gate_up, scale_down = ctx.scales
    has_gate_up, has_down = ctx.has_lora
    needs_weight_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grads = torch.ops.turbo_tune.scattermoe_lora_experts_backward(
        grad_out, x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends, gate_up, h,
        a_gate_up, b_gate_up, scale_gate_up, a_down, b_down, scale_down,
        su if has_gate_up else None, sv if has_down else None, needs_weight_grads,
    )
    grad_x, grad_w_gate_up, grad_w_down, grad_weights, grad_a_gu, grad_b_gu, grad_a_down, grad_b_down = grads
    if not needs_weight_grads:
        grad_w_gate_up = grad_w_down = None
    if not has_gate_up:
        grad_a_gu = grad_b_gu = None
    if not has_down:
        grad_a_down = grad_b_down = None
    return (grad_x, grad_w_gate_up, grad_w_down, grad_weights, None, None,
            grad_a_gu, grad_b_gu, None, grad_a_down, grad_b_down, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def scattermoe_lora_experts(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    routing_weights: torch.Tensor,
    top_k_index: torch.Tensor,
    gate_up_lora: LowRank | None,
    down_lora: LowRank | None,
) -> torch.Tensor:
    """Expert block output (T, H) with LoRA on either projection; factors are cast to the weights' dtype (as
    peft does) and laid out contiguously per expert, which the kernels read in tiles."""

    def factors(lora: LowRank | None, weight: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        if lora is None:
            return None, None, 0.0
        return lora.a.to(weight.dtype).contiguous(), lora.b.to(weight.dtype).contiguous(), float(lora.scale)

    sorted_pairs, expert_ends = compute_routing(top_k_index, w_gate_up.shape[0])
    out, *_ = torch.ops.turbo_tune.scattermoe_lora_experts_forward(
        x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends,
        *factors(gate_up_lora, w_gate_up), *factors(down_lora, w_down),
    )
    return out
