"""varlen_sdpa's GPU kernels on packed rows at Qwen3-30B-A3B's attention shape (32 query heads, 4 key/value heads,
head_dim 128): PyTorch's flash varlen kernel (through ``varlen_attn``, and through aten's op as Inductor's C++
wrapper calls it) and flash-attn-4 through our op pair, eager and inside a fullgraph torch.compile, each against
SDPA with the block-diagonal causal mask in fp32: output and the gradients of q, k and v. The boundaries come as
TRL's padding-free collator passes them (cumulative lengths and the longest, beside the position ids), or as
position ids alone."""

import pytest
import torch
from gate import needs_cuda, record

from monkey_patch import attention
from monkey_patch.attention import varlen_sdpa_attention
from monkey_patch.fa4_attention import fa4_available
from tests.numerics import relative_error

LENGTHS = [700, 1300, 64, 2032, 1, 4096]
BF16_CEILING = 1e-2  # flash kernels land near 4e-3 here; a wrong boundary or scale lands near 1


def packed_problem():
    generator = torch.Generator(device="cuda").manual_seed(0)
    doc = torch.repeat_interleave(torch.arange(len(LENGTHS), device="cuda"), torch.tensor(LENGTHS, device="cuda"))
    position_ids = torch.cat([torch.arange(n, device="cuda") for n in LENGTHS])[None]
    cu_seqlens = torch.tensor([0, *LENGTHS], device="cuda").cumsum(0).to(torch.int32)
    packing = {"position_ids": position_ids, "cu_seq_lens_q": cu_seqlens, "max_length_q": max(LENGTHS)}  # TRL's
    q, k, v = (torch.randn(1, h, sum(LENGTHS), 128, device="cuda", generator=generator).to(torch.bfloat16)
               for h in (32, 4, 4))
    grad_out = torch.randn(1, sum(LENGTHS), 32, 128, device="cuda", generator=generator).to(torch.bfloat16)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(len(doc), len(doc), dtype=torch.bool, device="cuda").tril()
    return (q, k, v), grad_out, packing, mask


@needs_cuda
@pytest.mark.parametrize("boundaries", ["collator", "position_ids"])
@pytest.mark.parametrize("kernel", ["flash", "aten_flash", "fa4", "fa4_compiled"])
def test_varlen_kernel_matches_fp32_masked_sdpa_forward_and_backward(monkeypatch, kernel, boundaries):
    if kernel.startswith("fa4") and not fa4_available():
        pytest.skip("flash-attn-4 is not installed, or this GPU is older than sm90")
    if kernel == "fa4_compiled" and boundaries == "position_ids":
        pytest.skip("a fullgraph compile cannot derive boundaries from position ids (a data-dependent size)")
    attention._varlen_kwargs()
    monkeypatch.setitem(attention._CUDA_VARLEN_KWARGS, "aten_flash", kernel == "aten_flash")
    monkeypatch.setitem(attention._CUDA_VARLEN_KWARGS, "kernel", "fa4" if kernel.startswith("fa4") else "flash")
    inputs, grad_out, packing, mask = packed_problem()
    if boundaries == "position_ids":
        packing = {"position_ids": packing["position_ids"]}
    fp32 = [t.float().requires_grad_() for t in inputs]
    expected = torch.nn.functional.scaled_dot_product_attention(*fp32, attn_mask=mask, enable_gqa=True)
    expected = (expected.transpose(1, 2), *torch.autograd.grad(expected.transpose(1, 2), fp32, grad_out.float()))
    half = [t.clone().requires_grad_() for t in inputs]

    def run(q, k, v):
        return varlen_sdpa_attention(torch.nn.Module(), q, k, v, None, **packing)[0]

    if kernel == "fa4_compiled":
        torch._dynamo.reset()
        run = torch.compile(run, fullgraph=True)
    out = run(*half)
    actual = (out, *torch.autograd.grad(out, half, grad_out))
    for name, got, want in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
        error = relative_error(got.float(), want)
        record(test=f"varlen_attention[{kernel}-{boundaries}]", tensor=name, dtype="bf16", error=error,
               limit=BF16_CEILING)
        assert error < BF16_CEILING, f"{kernel} {name}: relative error {error:.2e}"
