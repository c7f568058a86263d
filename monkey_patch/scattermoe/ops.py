"""The expert block's forward and hand-written backward, composed from the Triton launchers in kernels.py, with
optional LoRA on either projection.

Shapes: T tokens, H hidden, I intermediate, E experts, k experts per token. Weights keep the transformers
layout: ``w_gate_up`` (E, 2I, H) with [gate; up] concatenated, ``w_down`` (E, H, I).

LoRA factors are kept apart from the weights. peft's ``target_parameters`` folds ``W + s·B·A`` into a new
(E, out, in) tensor on every forward, so its cost grows with the expert count. Here each routed (token, expert)
row computes ``x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` instead: two rank-r grouped matmuls over the routed rows, with the
``(x·Aᵀ)·Bᵀ`` term accumulated into the base matmul's tile (no delta, no extra activation-sized buffer). Backward
gives the factors' gradients and, for frozen base weights, nothing for them. Without LoRA the same functions
issue exactly the base kernel calls.

Factors use peft's per-expert layout (see ``ParamWrapper.get_delta_factors``): for a weight (E, N, K),
``a`` is (E, r, K) and ``b`` is (E, N, r), so the delta is ``scale * b @ a``.
"""

import os
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import kernels

WEIGHT_GRAD_ENV = "TURBO_TUNE_MOE_WEIGHT_GRAD"
WEIGHT_GRAD_BACKENDS = ("triton", "grouped_mm", "grouped_mm_gate_up", "auto")


class LowRank(NamedTuple):
    """One projection's LoRA: delta = scale * b @ a, with a (E, r, K) and b (E, N, r)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


def compute_routing(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, k) expert ids -> pair indices sorted by expert (T*k,) and each expert's end row (E,) int32.

    ``searchsorted`` on the sorted ids gives the boundaries without atomics or a host sync.
    """
    sorted_experts, sorted_pairs = torch.sort(top_k_index.reshape(-1), stable=True)
    expert_ids = torch.arange(num_experts, device=top_k_index.device, dtype=sorted_experts.dtype)
    expert_ends = torch.searchsorted(sorted_experts, expert_ids, right=True, out_int32=True)
    return sorted_pairs, expert_ends


def experts_forward(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    routing_weights: torch.Tensor,
    routing: kernels.Routing,
    gate_up_lora: LowRank | None = None,
    down_lora: LowRank | None = None,
    output: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Returns the block output (T, H) and what backward needs: pre-activations (T*k, 2I) and the scaled rank-r
    inputs of B, su = s·x·A_guᵀ and sv = s·h·A_downᵀ (T*k, r), all grouped by expert (su, sv None without that
    adapter). The routing-weighted activations h (T*k, I) are not kept: backward recomputes them from the
    pre-activations in the pass it reads those anyway. Without ``output``, only what backward needs: no down
    projection, and None for the block output."""
    top_k = routing.top_k
    su = sv = None
    if gate_up_lora is not None:
        su = kernels.scatter_matmul(x, gate_up_lora.a.transpose(1, 2), routing, a_gathered=True, y_scattered=False,
                                    scale=gate_up_lora.scale)
    gate_up, h = kernels.gather_gate_up_swiglu(
        x, w_gate_up.transpose(1, 2), routing_weights.reshape(-1), routing,
        a2=su, w2=None if su is None else gate_up_lora.b.transpose(1, 2),
    )
    if down_lora is not None:
        sv = kernels.scatter_matmul(h, down_lora.a.transpose(1, 2), routing, a_gathered=False, y_scattered=False,
                                    scale=down_lora.scale)
    if not output:
        return None, gate_up, su, sv
    out_pairs = kernels.scatter_matmul(
        h, w_down.transpose(1, 2), routing, a_gathered=False, y_scattered=True,
        a2=sv, w2=None if sv is None else down_lora.b.transpose(1, 2),
    )
    return kernels.sum_top_k(out_pairs, top_k), gate_up, su, sv


def _low_rank_grads(
    grad_p: torch.Tensor,
    grad_p_gathered: bool,
    lora: LowRank,
    low_rank_inputs: torch.Tensor,
    routing: kernels.Routing,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For P = inputs·Wᵀ + low_rank_inputs·Bᵀ (low_rank_inputs = s·inputs·Aᵀ): ds = s·dP·B (grouped) and dB.
    ``grad_p_gathered``: dP is in pair/token order and is read through the routing, else grouped."""
    ds = kernels.scatter_matmul(grad_p, lora.b, routing, a_gathered=grad_p_gathered, y_scattered=False,
                                scale=lora.scale)
    grad_b = torch.empty(lora.b.shape, device=lora.b.device, dtype=grad_p.dtype)
    kernels.grouped_weight_grad(grad_p, low_rank_inputs, routing, a_gathered=grad_p_gathered, b_gathered=False,
                                dw=grad_b)
    return ds, grad_b


def _grad_a(ds: torch.Tensor, inputs: torch.Tensor, inputs_gathered: bool, lora: LowRank,
            routing: kernels.Routing) -> torch.Tensor:
    """dA = dsᵀ·inputs per expert (``inputs_gathered``: inputs in token order, read through the routing)."""
    grad_a = torch.empty(lora.a.shape, device=lora.a.device, dtype=inputs.dtype)
    return kernels.grouped_weight_grad(ds, inputs, routing, a_gathered=False, b_gathered=inputs_gathered, dw=grad_a)


def weight_grad_backend() -> str:
    """Which kernel computes the experts' weight gradients, from ``TURBO_TUNE_MOE_WEIGHT_GRAD``.

    ``grouped_mm_gate_up`` (default): dW_gate_up on torch's grouped GEMM (CUTLASS on Hopper) over a copy of the
    routed input rows in expert order; dW_down, computed while dW_gate_up is held, on ScatterMoE's Triton kernel,
    so no row copy sits beside both weight gradients: the block's extra peak stays below transformers'
    ``grouped_mm`` at every shape measured on an H200 (docs/history.md). ``grouped_mm``: both on the grouped
    GEMM, a few percent faster but above ``grouped_mm``'s peak at 235B-A22B and 30B-A3B/8k. ``triton``: both on
    ScatterMoE's kernel, which reads token rows through the routing with no copy (the lowest peak). ``auto``: the
    grouped GEMM and the Triton kernel are timed at the first call of each shape and the faster one is kept. The
    grouped GEMM needs bf16 on a Hopper-or-newer GPU (or the CPU); elsewhere the Triton kernel runs.
    """
    backend = os.environ.get(WEIGHT_GRAD_ENV, "grouped_mm_gate_up")
    if backend not in WEIGHT_GRAD_BACKENDS:
        raise ValueError(f"{WEIGHT_GRAD_ENV}={backend!r}: choose one of {', '.join(WEIGHT_GRAD_BACKENDS)}.")
    return backend


def _time_ms(fn: Callable[[], torch.Tensor], repeats: int = 3) -> float:
    """Best of ``repeats`` timings of ``fn()`` after one warm-up call (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return min(times)


def _grouped_mm_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes aᵀ·b: bf16 on sm90+ (its CUTLASS kernel) with rows of a multiple of 16
    bytes (TMA's alignment), bf16 or fp32 on the CPU."""
    if a.device.type == "cpu":
        return a.dtype in (torch.bfloat16, torch.float32)
    aligned = all(t.shape[-1] * t.element_size() % 16 == 0 for t in (a, b))
    return aligned and a.dtype == torch.bfloat16 and kernels.hopper_or_newer(a.device)


def _rows_in_expert_order(rows: torch.Tensor, routing: kernels.Routing) -> torch.Tensor:
    """Each routed pair's token row, in expert order: Triton's row gather where Triton runs, else ``index_select``."""
    if rows.is_cuda or kernels.INTERPRET:
        return kernels.gather_token_rows(rows, routing)
    return rows.index_select(0, routing.sorted_pairs // routing.top_k)


# ``auto``'s choice per (M, N, row-count bucket, which operand is gathered, dtype, device)
_FASTEST_WEIGHT_GRAD: dict[tuple, str] = {}


def expert_weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    routing: kernels.Routing,
    a_gathered: bool,
    b_gathered: bool,
    weight: torch.Tensor,
    projection: str,
) -> torch.Tensor:
    """Per expert, aᵀ·b over the expert's rows, shaped like ``weight`` (E, M, N); a is (., M), b is (., N).
    ``projection`` ("gate_up" or "down") is which weight it is, for ``grouped_mm_gate_up``."""
    def on_triton() -> torch.Tensor:
        return kernels.grouped_weight_grad(a, b, routing, a_gathered=a_gathered, b_gathered=b_gathered,
                                           dw=torch.empty_like(weight, memory_format=torch.contiguous_format))

    def on_grouped_mm() -> torch.Tensor:
        a_rows = _rows_in_expert_order(a, routing) if a_gathered else a
        b_rows = _rows_in_expert_order(b, routing) if b_gathered else b
        return torch._grouped_mm(a_rows.t(), b_rows, offs=routing.expert_ends)

    backend = weight_grad_backend()
    if backend == "grouped_mm_gate_up":
        backend = "grouped_mm" if projection == "gate_up" else "triton"
    if backend == "triton" or not _grouped_mm_fits(a, b):
        return on_triton()
    if backend == "auto":
        key = (weight.shape[1], weight.shape[2], kernels._rows_bucket(routing.sorted_pairs.numel()), a_gathered,
               b_gathered, a.dtype, a.device)
        if key not in _FASTEST_WEIGHT_GRAD:
            candidates = {"triton": on_triton, "grouped_mm": on_grouped_mm}
            _FASTEST_WEIGHT_GRAD[key] = min(candidates, key=lambda name: _time_ms(candidates[name]))
        backend = _FASTEST_WEIGHT_GRAD[key]
    return on_grouped_mm() if backend == "grouped_mm" else on_triton()


def experts_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weights: list[torch.Tensor],
    routing_weights: torch.Tensor,
    routing: kernels.Routing,
    gate_up: torch.Tensor,
    needs_weight_grads: bool,
    gate_up_lora: LowRank | None = None,
    down_lora: LowRank | None = None,
    su: torch.Tensor | None = None,
    sv: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of x, w_gate_up, w_down (None unless needs_weight_grads, e.g. frozen under LoRA),
    routing_weights, and of the factors a_gate_up, b_gate_up, a_down, b_down (None without that adapter).

    With P = x·Wᵀ + s·(x·Aᵀ)·Bᵀ: dB = dPᵀ·su, ds_u = s·dP·B, dA = ds_uᵀ·x and dx = dP·W + ds_u·A, per expert.
    ``weights`` is [w_gate_up, w_down], which this function empties: frozen weights may be a dequantized copy (FP8
    experts), and w_down's is freed once dh is computed, before the larger buffers of the rest of the backward.
    """
    w_gate_up, w_down = weights
    weights.clear()
    num_tokens, top_k = routing_weights.shape
    grad_out = grad_out.to(x.dtype).contiguous()  # autocast can hand back an fp32 gradient for a bf16 output
    grad_a_gu = grad_b_gu = grad_a_down = grad_b_down = grad_w_gate_up = grad_w_down = None

    dsv = a_down = None
    if down_lora is not None:
        a_down = down_lora.a
        dsv, grad_b_down = _low_rank_grads(grad_out, True, down_lora, sv, routing)
    grad_h = kernels.scatter_matmul(grad_out, w_down, routing, a_gathered=True, y_scattered=False, a2=dsv, w2=a_down)
    if not needs_weight_grads:
        w_down = None  # 0.4 GB at Qwen3-30B-A3B's shape when it is a dequantized FP8 copy
    grad_gate_up, grad_scale, h = kernels.swiglu_backward(
        grad_h, gate_up, routing.sorted_pairs, routing_weights.reshape(-1), want_h=needs_weight_grads or dsv is not None
    )
    del grad_h
    if down_lora is not None:
        grad_a_down = _grad_a(dsv, h, False, down_lora, routing)
    del dsv
    if not needs_weight_grads:
        h = None  # kept for dW_down only: (T*k, I), 0.1 GB at Qwen3-30B-A3B's shape and 8,192 tokens

    dsu = a_gate_up = None
    if gate_up_lora is not None:
        a_gate_up = gate_up_lora.a
        dsu, grad_b_gu = _low_rank_grads(grad_gate_up, False, gate_up_lora, su, routing)
        grad_a_gu = _grad_a(dsu, x, True, gate_up_lora, routing)
    grad_x = kernels.scatter_matmul(grad_gate_up, w_gate_up, routing, a_gathered=False, y_scattered=True,
                                    a2=dsu, w2=a_gate_up)
    del dsu
    grad_x = kernels.sum_top_k(grad_x, top_k)
    if needs_weight_grads:
        # dW_gate_up first, so grad_gate_up is freed before dW_down is allocated: lower peak memory.
        grad_w_gate_up = expert_weight_grad(grad_gate_up, x, routing, False, True, w_gate_up, "gate_up")
        del grad_gate_up
        grad_w_down = expert_weight_grad(grad_out, h, routing, True, False, w_down, "down")
    grad_weights = grad_scale.view(num_tokens, top_k).to(routing_weights.dtype)
    return grad_x, grad_w_gate_up, grad_w_down, grad_weights, grad_a_gu, grad_b_gu, grad_a_down, grad_b_down
