"""``varlen_sdpa``: padding-free attention for packed rows without FlashAttention-2's package.

Registered in transformers' ``AttentionInterface`` (and, with transformers' flash-attention mask function, in its
mask interface), so the model never builds the dense (tokens × tokens) block-diagonal mask that ``sdpa`` needs for
packed rows. Sequence boundaries come the way flash_attention_2 gets them: TRL's padding-free collator passes
``cu_seq_lens_q``/``max_length_q``; otherwise they are derived from ``position_ids`` (or unpadded from a 2D
padding mask) with transformers' own helpers.

On a GPU the packed sequences run through PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (flash kernels, torch
>= 2.10), or, where flash-attn-4 is installed and the GPU is sm90 or newer, through flash-attn-4's
(monkey_patch/fa4_attention.py; 1.1x the full-depth LoRA step, docs/results.md). ``TURBO_TUNE_VARLEN_KERNEL``
(``flash`` or ``fa4``) overrides that choice. On the CPU, where neither has a kernel, each sequence goes through
``scaled_dot_product_attention`` with ``is_causal`` on its own rows — exact, and linear rather than quadratic in the
packed row length. A batch whose rows each hold one whole sequence has nothing to
split and goes to transformers' own causal ``sdpa`` (cuDNN's attention on Hopper ran 1.7x varlen_attn's TFLOP/s at
131k-token rows; docs/history.md).
"""

import inspect
import logging
import os
from itertools import pairwise

import torch
import torch._inductor.config
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
from transformers.modeling_flash_attention_utils import (
    _pad_input,
    _unpad_input,
    _upad_input,
    prepare_fa_kwargs_from_position_ids,
)

from monkey_patch.fa4_attention import fa4_available, fa4_varlen
from turbo_tune.errors import ConfigError

logger = logging.getLogger(__name__)

VARLEN_SDPA = "varlen_sdpa"
VARLEN_KERNEL_ENV = "TURBO_TUNE_VARLEN_KERNEL"  # flash or fa4; unset: fa4 where it can run


def torch_varlen_available() -> bool:
    """Whether this torch ships ``torch.nn.attention.varlen`` (2.10 and later)."""
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        return False
    return True


_CUDA_VARLEN_KWARGS: dict = {}


def _varlen_kwargs() -> dict:
    """Keyword arguments of ``varlen_attn`` for causal GQA attention, read once from its signature (they changed
    between torch 2.10 and 2.13), outside the traced code so torch.compile sees plain constants. Also whether
    Inductor's C++ wrapper is on (``TORCHINDUCTOR_CPP_WRAPPER=1``): it calls a Python custom op back through a
    wrapper that cannot pass a list argument, and ``varlen_attn``'s op takes its window as one. And the kernel
    ``varlen_kernel`` picks."""
    if not _CUDA_VARLEN_KWARGS:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        _CUDA_VARLEN_KWARGS.update(
            window_size=(-1, 0) if "window_size" in params else None,  # causal
            is_causal=None if "window_size" in params else True,
            enable_gqa=True if "enable_gqa" in params else None,
            takes_scale="scale" in params,  # without it the kernel uses 1/sqrt(head_dim), as Qwen3-MoE does
            aten_flash=bool(torch._inductor.config.cpp_wrapper),
            kernel=varlen_kernel(),
        )
        logger.info("varlen_sdpa runs packed rows through %s (%s=flash or =fa4 pins one).",
                    "flash-attn-4's kernels" if _CUDA_VARLEN_KWARGS["kernel"] == "fa4" else "PyTorch's flash kernel",
                    VARLEN_KERNEL_ENV)
    return {name: value for name, value in _CUDA_VARLEN_KWARGS.items()
            if value is not None and name not in ("takes_scale", "aten_flash", "kernel")}


def varlen_kernel() -> str:
    """The GPU kernel ``varlen_sdpa`` runs: flash-attn-4's (``fa4``) where it is installed on an sm90-or-newer GPU,
    as it is faster there, else PyTorch's (``flash``); ``TURBO_TUNE_VARLEN_KERNEL`` overrides the choice."""
    choice = os.environ.get(VARLEN_KERNEL_ENV) or ("fa4" if fa4_available() else "flash")
    if choice not in ("flash", "fa4"):
        raise ConfigError(f"{VARLEN_KERNEL_ENV}={choice}: use flash (PyTorch's varlen_attn) or fa4 (flash-attn-4), "
                          "or unset it to take flash-attn-4 where it can run.")
    if choice == "fa4" and not fa4_available():
        raise ConfigError(f"{VARLEN_KERNEL_ENV}=fa4 needs the flash-attn-4 package and an sm90 or newer GPU; "
                          f"install flash-attn-4 or unset {VARLEN_KERNEL_ENV}.")
    return choice


def _torch_flash_varlen(q, k, v, cu_seqlens, max_len: int, scale: float | None, kwargs: dict) -> torch.Tensor:
    """PyTorch's flash varlen kernel with ``_varlen_kwargs()``; under Inductor's C++ wrapper the aten op that
    ``varlen_attn`` wraps, called directly (the same flash kernels on Hopper, list-free arguments)."""
    from torch.nn.attention.varlen import varlen_attn

    if _CUDA_VARLEN_KWARGS["aten_flash"]:
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False, scale=scale)[0]
    if _CUDA_VARLEN_KWARGS["takes_scale"]:
        kwargs["scale"] = scale
    if q.shape[1] != k.shape[1] and "enable_gqa" not in kwargs:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)


def _cuda_varlen(q, k, v, cu_seqlens, max_len: int, scale: float | None) -> torch.Tensor:
    """The chosen GPU kernel, in half precision (the only one either takes)."""
    dtype = q.dtype
    if dtype == torch.float32:
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = q.to(half), k.to(half), v.to(half)
    kwargs, cu_seqlens = _varlen_kwargs(), cu_seqlens.to(torch.int32)
    if _CUDA_VARLEN_KWARGS["kernel"] == "fa4":
        return fa4_varlen(q, k, v, cu_seqlens, max_len, scale).to(dtype)
    return _torch_flash_varlen(q, k, v, cu_seqlens, max_len, scale, kwargs).to(dtype)


def _per_sequence_sdpa(q, k, v, cu_seqlens, scale: float | None) -> torch.Tensor:
    """Causal SDPA on each packed sequence separately: (T, H, D) in, (T, H, D) out."""
    bounds = cu_seqlens.tolist()
    outputs = []
    for start, end in pairwise(bounds):
        if end == start:
            continue
        seq = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*seq, is_causal=True, scale=scale, enable_gqa=True)
        outputs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outputs, dim=0)


def varlen(q, k, v, cu_seqlens: torch.Tensor, max_len: int, scale: float | None) -> torch.Tensor:
    """Causal attention over packed sequences; q (T, Hq, D), k and v (T, Hkv, D)."""
    if q.is_cuda:
        return _cuda_varlen(q, k, v, cu_seqlens, max_len, scale)
    return _per_sequence_sdpa(q, k, v, cu_seqlens, scale)


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: q, k, v (B, H, S, D) in, (B, S, H, D) out."""
    if dropout:
        raise ValueError(f"{VARLEN_SDPA} has no attention dropout; the model asks for {dropout}.")
    if sliding_window is not None:
        raise ValueError(f"{VARLEN_SDPA} implements full causal attention; this model uses a sliding window.")
    batch, _, seq_len, _ = query.shape
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D)
    if attention_mask is not None:  # padded rows: transformers' flash mask leaves a 2D mask only when there is padding
        q, k, v, indices, (cu_seqlens, _), (max_len, _) = _upad_input(q, k, v, attention_mask, seq_len, _unpad_input)
        out = varlen(q, k, v, cu_seqlens, int(max_len), scaling)
        return _pad_input(out, indices, batch, seq_len), None
    cu_seqlens, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is None or batch != 1:
        (cu_seqlens, _), (max_len, _) = prepare_fa_kwargs_from_position_ids(kwargs["position_ids"].expand(batch, -1))
    if cu_seqlens.numel() - 1 == batch and int(max_len) == seq_len:  # one whole sequence per row
        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, is_causal=True)
    flat = [t.reshape(batch * seq_len, t.shape[2], t.shape[3]) for t in (q, k, v)]
    out = varlen(*flat, cu_seqlens, int(max_len), scaling)
    return out.view(batch, seq_len, *out.shape[1:]), None


def register_varlen_sdpa() -> str:
    """Add ``varlen_sdpa`` to transformers' attention and mask interfaces (idempotent); returns its name."""
    if AttentionInterface._global_mapping.get(VARLEN_SDPA) is not varlen_sdpa_attention:
        AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, flash_attention_mask)
    varlen_kernel()  # a misspelt or unusable TURBO_TUNE_VARLEN_KERNEL, named before the model loads
    if torch.cuda.is_available() and torch_varlen_available():
        _varlen_kwargs()
    return VARLEN_SDPA
