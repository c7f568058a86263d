"""The expert block as ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` traces it unbroken.

Forward and backward are opaque ops with fake (meta) implementations; routing metadata is plain torch and
traces normally. Kernels and their composition are shared with the eager autograd path in ops.py.
"""

import torch

from .ops import compute_routing, experts_backward, experts_forward


@torch.library.custom_op("turbo_tune::scattermoe_experts_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    routing_weights: torch.Tensor,
    sorted_pairs: torch.Tensor,
    expert_ends: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return experts_forward(x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends)


@_forward_op.register_fake
def _forward_fake(x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends):
    num_rows = sorted_pairs.shape[0]
    two_inter = w_gate_up.shape[1]
    return (
        x.new_empty(x.shape),
        x.new_empty(num_rows, two_inter),
        x.new_empty(num_rows, two_inter // 2),
    )


@torch.library.custom_op("turbo_tune::scattermoe_experts_backward", mutates_args=())
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
    needs_weight_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x, grad_w_gate_up, grad_w_down, grad_weights = experts_backward(
        grad_out, x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends, gate_up, h, needs_weight_grads
    )
    if not needs_weight_grads:
        grad_w_gate_up, grad_w_down = w_gate_up.new_empty(0), w_down.new_empty(0)
    return grad_x, grad_w_gate_up, grad_w_down, grad_weights


@_backward_op.register_fake
def _backward_fake(grad_out, x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends, gate_up, h,
                   needs_weight_grads):
    weight_grads = (
        (w_gate_up.new_empty(w_gate_up.shape), w_down.new_empty(w_down.shape))
        if needs_weight_grads
        else (w_gate_up.new_empty(0), w_down.new_empty(0))
    )
    return x.new_empty(x.shape), *weight_grads, routing_weights.new_empty(routing_weights.shape)


def _setup_context(ctx, inputs, output):
    x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends = inputs
    _, gate_up, h = output
    ctx.mark_non_differentiable(gate_up, h)
    ctx.save_for_backward(x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends, gate_up, h)


def _backward(ctx, grad_out, _grad_gate_up, _grad_h):
    needs_weight_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_x, grad_w_gate_up, grad_w_down, grad_weights = torch.ops.turbo_tune.scattermoe_experts_backward(
        grad_out, *ctx.saved_tensors, needs_weight_grads
    )
    if not needs_weight_grads:
        grad_w_gate_up = grad_w_down = None
    return grad_x, grad_w_gate_up, grad_w_down, grad_weights, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def scattermoe_experts(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    routing_weights: torch.Tensor,
    top_k_index: torch.Tensor,
) -> torch.Tensor:
    """Expert block output (T, H) for x (T, H) routed to ``top_k_index`` (T, k) with ``routing_weights`` (T, k)."""
    sorted_pairs, expert_ends = compute_routing(top_k_index, w_gate_up.shape[0])
    out, _, _ = torch.ops.turbo_tune.scattermoe_experts_forward(
        x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends
    )
    return out
