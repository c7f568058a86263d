"""The expert block as ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` traces it unbroken.

Forward and backward are opaque ops with fake (meta) implementations over ops.experts_forward/experts_backward;
routing metadata is plain torch and traces normally, except the row-block schedule, which the forward op computes
and hands to the backward op as two more outputs. LoRA factors are optional inputs; custom ops cannot
return None, so an absent result (no adapter, frozen weights) travels as an empty tensor. Frozen weights may come
in FP8 with per-row scales (``--fp8_frozen_experts``): both ops dequantize them on entry, so backward keeps the FP8
tensors, not a full-precision copy. Under gradient checkpointing a layer's recompute and its backward run back to
back and would dequantize the same weights twice: a forward op that runs inside a backward pass (the recompute)
leaves its dequantized pair behind (``_DequantizedPair``) and the backward op takes it when it is of the same,
unchanged tensors. A forward outside a backward pass keeps nothing: its own backward comes next only for the
last layer, after the loss, and the copy would sit through both.

Under gradient checkpointing the forward runs again in backward for what it saves, and in a Qwen3-MoE decoder
layer nothing that backward reads depends on the block's output (a residual add follows, which saves nothing).
With ``skip_recomputed_output`` the forward op, when it runs inside a backward pass, skips the down projection
(a third of its matmul work) and returns the output filled with NaN: a model that did read it would get NaN
gradients, which the run guard stops on, never silently wrong ones.
"""

import threading

import torch

from . import kernels
from .ops import LowRank, compute_routing, experts_backward, experts_forward


def _or_empty(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if tensor is None else tensor


def _low_rank(a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> LowRank | None:
    return None if a is None else LowRank(a, b, scale)


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A weight in ``dtype``: as it is without a scale, else FP8 values times their fp32 per-row scales, rounded
    once to ``dtype`` (one fused Triton pass where Triton runs, the same arithmetic in torch elsewhere)."""
    if scale is None:
        return weight
    if weight.is_cuda or kernels.INTERPRET:
        return kernels.dequantize_rows(weight, scale, dtype)
    return (weight.float() * scale.float()).to(dtype)


def _inside_backward() -> bool:
    """Whether this runs within a backward pass: a checkpointed layer's recompute, not a plain forward."""
    return torch._C._current_graph_task_id() != -1


class _DequantizedPair:
    """The expert pair a recompute dequantized, for the backward op that follows it. At most one pair is held (one
    layer's experts in full precision, 1.2 GB at Qwen3-30B-A3B's shape): it is dropped before the next pair is
    dequantized and when a backward takes it. Only a forward inside a backward pass keeps its pair: a plain
    forward's pair would wait, through every later layer and the loss, for a backward that is the last layer's
    alone. Its key is the FP8 tensors' and scales' addresses and version counters: a backward finds it only if its
    weights are those tensors, unchanged, which autograd keeps alive from the forward to the backward. Forward and
    backward run on different threads (and DataParallel replicas on several), so a lock keeps key and pair
    together."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.pair: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lock = threading.Lock()

    def get(self, weights: tuple, scales: tuple, dtype: torch.dtype, for_backward: bool) -> list[torch.Tensor]:
        """The weights in ``dtype``, dequantized now or, for a backward, taken from the recompute before it."""
        if all(scale is None for scale in scales):
            return list(weights)
        key = (dtype, *((t.data_ptr(), t._version) for t in (*weights, *scales) if t is not None))
        with self.lock:
            held, pair = self.key, self.pair
            self.key = self.pair = None
        if for_backward and held == key:
            return list(pair)
        del pair  # before dequantizing: never two layers' full-precision experts at once
        pair = tuple(dequantize(weight, scale, dtype) for weight, scale in zip(weights, scales, strict=True))
        if not for_backward and _inside_backward():
            with self.lock:
                self.key, self.pair = key, pair
        return list(pair)


DEQUANTIZED = _DequantizedPair()


@torch.library.custom_op("turbo_tune::scattermoe_experts_forward", mutates_args=())
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
    w_gate_up_scale: torch.Tensor | None,
    w_down_scale: torch.Tensor | None,
    skip_recomputed_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    routing = kernels.Routing.of(sorted_pairs, expert_ends, routing_weights.shape[1])
    recomputing = skip_recomputed_output and _inside_backward()
    out, gate_up, su, sv = experts_forward(
        x, *DEQUANTIZED.get((w_gate_up, w_down), (w_gate_up_scale, w_down_scale), x.dtype, for_backward=False),
        routing_weights, routing,
        _low_rank(a_gate_up, b_gate_up, scale_gate_up), _low_rank(a_down, b_down, scale_down), output=not recomputing,
    )
    if out is None:
        out = torch.full_like(x, float("nan"))
    return out, gate_up, _or_empty(su, x), _or_empty(sv, x), routing.schedule, routing.used_blocks


@_forward_op.register_fake
def _forward_fake(x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends, a_gate_up, b_gate_up,
                  scale_gate_up, a_down, b_down, scale_down, w_gate_up_scale, w_down_scale,
                  skip_recomputed_output=False):
    num_rows = sorted_pairs.shape[0]
    two_inter = w_gate_up.shape[1]

    def low_rank(a):
        return x.new_empty(0) if a is None else x.new_empty(num_rows, a.shape[1])

    return (
        x.new_empty(x.shape),
        x.new_empty(num_rows, two_inter),
        low_rank(a_gate_up),
        low_rank(a_down),
        expert_ends.new_empty(kernels.row_blocks(num_rows, expert_ends.shape[0]), 3),
        expert_ends.new_empty(1),
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
    schedule: torch.Tensor,
    used_blocks: torch.Tensor,
    gate_up: torch.Tensor,
    needs_weight_grads: bool,
    a_gate_up: torch.Tensor | None,
    b_gate_up: torch.Tensor | None,
    scale_gate_up: float,
    a_down: torch.Tensor | None,
    b_down: torch.Tensor | None,
    scale_down: float,
    su: torch.Tensor | None,
    sv: torch.Tensor | None,
    w_gate_up_scale: torch.Tensor | None,
    w_down_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    routing = kernels.Routing(sorted_pairs, expert_ends, schedule, used_blocks, routing_weights.shape[1])
    grads = experts_backward(
        grad_out, x, DEQUANTIZED.get((w_gate_up, w_down), (w_gate_up_scale, w_down_scale), x.dtype, for_backward=True),
        routing_weights, routing, gate_up, needs_weight_grads,
        _low_rank(a_gate_up, b_gate_up, scale_gate_up), _low_rank(a_down, b_down, scale_down), su, sv,
    )
    return tuple(_or_empty(grad, x) for grad in grads)


@_backward_op.register_fake
def _backward_fake(grad_out, x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends, schedule, used_blocks,
                   gate_up, needs_weight_grads, a_gate_up, b_gate_up, scale_gate_up, a_down, b_down, scale_down, su, sv,
                   w_gate_up_scale, w_down_scale):
    def like(tensor, dtype_of, present=True):
        return dtype_of.new_empty(tensor.shape) if tensor is not None and present else x.new_empty(0)

    return (
        like(x, x), like(w_gate_up, w_gate_up, needs_weight_grads), like(w_down, w_down, needs_weight_grads),
        routing_weights.new_empty(routing_weights.shape),
        like(a_gate_up, x), like(b_gate_up, x), like(a_down, x), like(b_down, x),
    )


def _setup_context(ctx, inputs, output):
    (x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends,
     a_gate_up, b_gate_up, scale_gate_up, a_down, b_down, scale_down, w_gate_up_scale, w_down_scale, _) = inputs
    _, gate_up, su, sv, schedule, used_blocks = output
    ctx.mark_non_differentiable(gate_up, su, sv, schedule, used_blocks)
    # Else autograd hands backward a zero gradient for each of those: a (T*k, 2I) tensor filled on every step,
    # 0.75 GiB at Qwen3-30B-A3B's shape and 32,768 tokens, alive through the whole backward.
    ctx.set_materialize_grads(False)
    ctx.scales = (scale_gate_up, scale_down)
    ctx.has_lora = (a_gate_up is not None, a_down is not None)
    ctx.save_for_backward(x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends, schedule, used_blocks,
                          gate_up, a_gate_up, b_gate_up, a_down, b_down, su, sv, w_gate_up_scale, w_down_scale)


def _backward(ctx, grad_out, _grad_gate_up, _grad_su, _grad_sv, _grad_schedule, _grad_used_blocks):
    (x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends, schedule, used_blocks, gate_up,
     a_gate_up, b_gate_up, a_down, b_down, su, sv, w_gate_up_scale, w_down_scale) = ctx.saved_tensors
    scale_gate_up, scale_down = ctx.scales
    has_gate_up, has_down = ctx.has_lora
    needs_weight_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grads = torch.ops.turbo_tune.scattermoe_experts_backward(
        grad_out, x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends, schedule, used_blocks, gate_up,
        needs_weight_grads,
        a_gate_up, b_gate_up, scale_gate_up, a_down, b_down, scale_down,
        su if has_gate_up else None, sv if has_down else None, w_gate_up_scale, w_down_scale,
    )
    grad_x, grad_w_gate_up, grad_w_down, grad_weights, grad_a_gu, grad_b_gu, grad_a_down, grad_b_down = grads
    if not needs_weight_grads:
        grad_w_gate_up = grad_w_down = None
    if not has_gate_up:
        grad_a_gu = grad_b_gu = None
    if not has_down:
        grad_a_down = grad_b_down = None
    return (grad_x, grad_w_gate_up, grad_w_down, grad_weights, None, None,
            grad_a_gu, grad_b_gu, None, grad_a_down, grad_b_down, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def scattermoe_experts(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    routing_weights: torch.Tensor,
    top_k_index: torch.Tensor,
    gate_up_lora: LowRank | None = None,
    down_lora: LowRank | None = None,
    w_gate_up_scale: torch.Tensor | None = None,
    w_down_scale: torch.Tensor | None = None,
    skip_recomputed_output: bool = False,
) -> torch.Tensor:
    """Expert block output (T, H) for x (T, H) routed to ``top_k_index`` (T, k) with ``routing_weights`` (T, k),
    with optional LoRA on either projection; factors are cast to x's dtype (the weights' dtype, as peft does,
    unless the weights are FP8 with ``*_scale``) and laid out contiguously per expert, which the kernels read in
    tiles. ``skip_recomputed_output``: see the module doc."""

    def factors(lora: LowRank | None) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        if lora is None:
            return None, None, 0.0
        return lora.a.to(x.dtype).contiguous(), lora.b.to(x.dtype).contiguous(), float(lora.scale)

    sorted_pairs, expert_ends = compute_routing(top_k_index, w_gate_up.shape[0])
    out, *_ = torch.ops.turbo_tune.scattermoe_experts_forward(
        x, w_gate_up, w_down, routing_weights, sorted_pairs, expert_ends,
        *factors(gate_up_lora), *factors(down_lora), w_gate_up_scale, w_down_scale, skip_recomputed_output,
    )
    return out
