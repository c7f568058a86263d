"""``--fused_grad_clipping``: clip the gradients inside a fused optimizer's step instead of in a pass of their own.

``clip_grad_norm_`` multiplies every gradient by the clip coefficient after computing their norm: a pass that reads
and writes all gradients (5 % of the GPU time of an 8-layer Qwen3-30B-A3B-shaped full-parameter step on an H200,
docs/results.md). torch's fused optimizers (``adamw_torch_fused``, the Trainer's default) divide each gradient by
``optimizer.grad_scale`` inside their step, the hook fp16's GradScaler uses; set to the inverse of the clip
coefficient, it clips there. The norm is computed as before, and the step still writes the divided gradients back
(as it does for GradScaler), so one read of every gradient is what it saves.
"""

import torch


def fused_step_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
    """The torch optimizer under accelerate's wrapper if its step divides the gradients by ``grad_scale`` (a fused
    Adam, AdamW, SGD...), else None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if getattr(inner, "_step_supports_amp_scaling", False) else None


def clip_in_step(optimizer: torch.optim.Optimizer, parameters, max_norm: float) -> torch.Tensor:
    """The gradients' total 2-norm, as ``clip_grad_norm_`` returns it; their clipping left to ``optimizer``'s next
    step: clip_grad_norm_'s coefficient ``max_norm / (norm + 1e-6)``, at most 1, as the divisor of the step."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)
    return norm
