"""flash-attn-4's varlen attention as a ``torch.library`` op pair, for ``varlen_sdpa`` on Hopper and later.

flash-attn-4 (the ``flash-attn-4`` distribution, CuTe DSL kernels under ``flash_attn.cute``) registers no op of its
own, so torch.compile would have to trace into its autograd Function's Python or break the compiled layer's graph
there. Here its forward and backward are two custom ops with fake implementations and the autograd formula between
them, as torch's own ``varlen_attn`` is built, so the compiled layer keeps one graph. Causal attention only, which
is what SFT needs; GQA is native (k and v keep their own heads). The ops call the two functions flash-attn-4's own
autograd Function calls, ``_flash_attn_fwd`` and ``_flash_attn_bwd``: private names, checked against 4.0.0b36 (the
README's pin).
"""

import functools

import torch
from torch import Tensor
from transformers.utils import is_flash_attn_4_available


@functools.cache
def fa4_available() -> bool:
    """Whether flash-attn-4 is installed (transformers' check of its distribution: FlashAttention-2's package ships a
    ``flash_attn.cute`` folder too) and the current GPU is one it has kernels for (sm90 and later)."""
    return is_flash_attn_4_available() and torch.cuda.get_device_capability()[0] >= 9


@torch.library.custom_op("turbo_tune::fa4_varlen_forward", mutates_args=())
def fa4_varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int,
                       scale: float) -> tuple[Tensor, Tensor]:
    """Causal attention over packed sequences: q (T, Hq, D), k and v (T, Hkv, D) in; out (T, Hq, D) and the
    log-sum-exp (Hq, T) in fp32, which the backward needs."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse, *_ = _flash_attn_fwd(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_len,
                                   max_seqlen_k=max_len, softmax_scale=scale, causal=True, return_lse=True)
    return out, lse


@fa4_varlen_forward.register_fake
def _(q, k, v, cu_seqlens, max_len, scale):
    return q.new_empty((*q.shape[:2], v.shape[-1])), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("turbo_tune::fa4_varlen_backward", mutates_args=())
def fa4_varlen_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        cu_seqlens: Tensor, max_len: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k and v from the forward's inputs, output and log-sum-exp."""
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, grad_out, lse, scale, True, cu_seqlens_q=cu_seqlens,
                                 cu_seqlens_k=cu_seqlens, max_seqlen_q=max_len, max_seqlen_k=max_len)
    return dq, dk, dv


@fa4_varlen_backward.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_len, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, ctx.max_len, ctx.scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)


def _backward(ctx, grad_out: Tensor, _grad_lse: Tensor | None):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = fa4_varlen_backward(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_len, ctx.scale)
    return dq, dk, dv, None, None, None


fa4_varlen_forward.register_autograd(_backward, setup_context=_setup_context)


def fa4_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int, scale: float | None) -> Tensor:
    """Causal attention over packed sequences through flash-attn-4; q (T, Hq, D), k and v (T, Hkv, D), in half
    precision (``varlen_sdpa`` casts fp32 down first, as for PyTorch's flash kernel)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return fa4_varlen_forward(q, k, v, cu_seqlens.to(torch.int32), max_len, scale)[0]
