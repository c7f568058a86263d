"""The expert block's forward and hand-written backward, composed from the Triton launchers in kernels.py.

Shapes: T tokens, H hidden, I intermediate, E experts, k experts per token. Weights keep the transformers
layout: ``w_gate_up`` (E, 2I, H) with [gate; up] concatenated, ``w_down`` (E, H, I).
"""

import torch

from . import kernels


def compute_routing(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, k) expert ids -> pair indices sorted by expert (T*k,) and each expert's end row (E,) int32.

    ``searchsorted`` on the sorted ids gives the boundaries without atomics or a host sync.
    """
    sorted_experts, sorted_pairs = torch.sort(top_k_index.reshape(-1), stable=True)
    expert_ids = torch.arange(num_experts, device=top_k_index.device, dtype=sorted_experts.dtype)
    expert_ends = torch.searchsorted(sorted_experts, expert_ids, right=True).to(torch.int32)
    return sorted_pairs, expert_ends


def experts_forward(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    routing_weights: torch.Tensor,
    sorted_pairs: torch.Tensor,
    expert_ends: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns the block output (T, H) and what backward needs: pre-activations (T*k, 2I) and the
    routing-weighted activations h (T*k, I), both grouped by expert."""
    num_tokens, top_k = routing_weights.shape
    gate_up, h = kernels.gather_gate_up_swiglu(
        x, w_gate_up.transpose(1, 2), routing_weights.reshape(-1), sorted_pairs, expert_ends, top_k
    )
    out_pairs = kernels.scatter_matmul(
        h, w_down.transpose(1, 2), sorted_pairs, expert_ends, top_k, a_gathered=False, y_scattered=True
    )
    return out_pairs.view(num_tokens, top_k, -1).sum(1), gate_up, h


def experts_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    routing_weights: torch.Tensor,
    sorted_pairs: torch.Tensor,
    expert_ends: torch.Tensor,
    gate_up: torch.Tensor,
    h: torch.Tensor,
    needs_weight_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Gradients of x, w_gate_up, w_down (None when frozen, e.g. LoRA elsewhere) and routing_weights."""
    num_tokens, top_k = routing_weights.shape
    grad_out = grad_out.to(x.dtype).contiguous()  # autocast can hand back an fp32 gradient for a bf16 output
    grad_h = kernels.scatter_matmul(grad_out, w_down, sorted_pairs, expert_ends, top_k, a_gathered=True,
                                    y_scattered=False)
    grad_gate_up, grad_scale = kernels.swiglu_backward(grad_h, gate_up, sorted_pairs, routing_weights.reshape(-1))
    del grad_h
    grad_x = kernels.scatter_matmul(grad_gate_up, w_gate_up, sorted_pairs, expert_ends, top_k, a_gathered=False,
                                    y_scattered=True)
    grad_x = grad_x.view(num_tokens, top_k, -1).sum(1)
    grad_w_gate_up = grad_w_down = None
    if needs_weight_grads:
        # dW_gate_up first, so grad_gate_up is freed before dW_down is allocated: lower peak memory.
        grad_w_gate_up = kernels.grouped_weight_grad(
            grad_gate_up, x, sorted_pairs, expert_ends, top_k, a_gathered=False, b_gathered=True,
            dw=torch.empty_like(w_gate_up, memory_format=torch.contiguous_format),
        )
        del grad_gate_up
        grad_w_down = kernels.grouped_weight_grad(
            grad_out, h, sorted_pairs, expert_ends, top_k, a_gathered=True, b_gathered=False,
            dw=torch.empty_like(w_down, memory_format=torch.contiguous_format),
        )
    return grad_x, grad_w_gate_up, grad_w_down, grad_scale.view(num_tokens, top_k).to(routing_weights.dtype)


class ScatterMoEExperts(torch.autograd.Function):
    """Eager autograd path over the same kernels as the torch.library ops (see compilable_ops.py)."""

    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, routing_weights, top_k_index):
        sorted_pairs, expert_ends = compute_routing(top_k_index, w_gate_up.shape[0])
        out, gate_up, h = experts_forward(x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends)
        ctx.save_for_backward(x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends, gate_up, h)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        needs_weight_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        grad_x, grad_w_gate_up, grad_w_down, grad_weights = experts_backward(grad_out, *saved, needs_weight_grads)
        return grad_x, grad_w_gate_up, grad_w_down, grad_weights, None


def scattermoe_experts_autograd(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    routing_weights: torch.Tensor,
    top_k_index: torch.Tensor,
) -> torch.Tensor:
    """Expert block output (T, H) through the autograd Function (no torch.compile support)."""
    return ScatterMoEExperts.apply(x, w_gate_up, w_down, routing_weights, top_k_index)
