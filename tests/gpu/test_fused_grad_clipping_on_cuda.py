"""--fused_grad_clipping on the GPU: torch's CUDA fused AdamW, given the clip as its grad_scale, updates the moments
and weights as clip_grad_norm_ followed by the same step does, in fp32 and in bf16 (where the reference's multiply
rounds the gradients to bf16 and the fused step divides in fp32)."""

import pytest
import torch
from gate import needs_cuda, record

from tests.numerics import relative_error
from turbo_tune.grad_clipping import clip_in_step

pytestmark = needs_cuda

# per dtype: the largest relative error of the first moment and of the weights' change after three clipped steps.
# bf16 rounds the reference's clipped gradients and both sides' weights (on the CPU: 3.7e-3 and 8.4e-3); a clip
# that went missing is off by the gradients' norm over max_norm, about 13,000 here
LIMITS = {torch.float32: 1e-6, torch.bfloat16: 2e-2}
SHAPES = [(128, 1536, 64), (128, 64, 768), (4096, 64), (64,)]  # stacked experts, an attention weight, a norm


def clipped_steps(dtype: torch.dtype, fused_clip: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first moments and the weights' change after three clipped AdamW steps from the same seed."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator, device="cuda", dtype=dtype) * 0.02)
              for s in SHAPES]
    start = [p.detach().float().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    for _ in range(3):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator, device="cuda", dtype=dtype) * 3
        if fused_clip:
            clip_in_step(optimizer, params, max_norm=1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        optimizer.step()
    moments = [optimizer.state[p]["exp_avg"].float() for p in params]
    return moments, [p.detach().float() - s for p, s in zip(params, start, strict=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_clip_in_the_cuda_fused_step_updates_like_clip_grad_norm_then_the_step(dtype):
    """The first moment is linear in the clipped gradient (an unclipped one is about 13,000 times too large here),
    and the weights' change is the step's whole outcome."""
    (moments, changes), (ref_moments, ref_changes) = clipped_steps(dtype, True), clipped_steps(dtype, False)
    moment = max(relative_error(a, b) for a, b in zip(moments, ref_moments, strict=True))
    change = max(relative_error(a, b) for a, b in zip(changes, ref_changes, strict=True))
    record(test=f"fused grad clipping, {dtype}", error=max(moment, change), limit=LIMITS[dtype])
    assert moment <= LIMITS[dtype] and change <= LIMITS[dtype], (moment, change)
