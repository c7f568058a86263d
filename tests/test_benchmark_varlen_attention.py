"""benchmarks/varlen_attention.py's CPU-checkable parts: the packed rows it times and the FLOPs it counts (the
kernels themselves need a GPU)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import varlen_attention  # noqa: E402


def test_packed_rows_cut_sequences_at_each_rows_end_and_cover_every_token():
    bounds = varlen_attention.cu_seqlens_of(8192, 4096, seed=0).tolist()
    assert bounds[0] == 0 and bounds[-1] == 8192 and 4096 in bounds
    lengths = [end - start for start, end in zip(bounds, bounds[1:], strict=False)]
    assert min(lengths) > 0 and max(lengths) <= 4096
    assert len(lengths) > 4  # SFT-like: many sequences a row, not one


def test_causal_flops_count_two_matmuls_over_the_lower_triangle_of_each_sequence():
    bounds = torch.tensor([0, 2, 5], dtype=torch.int32)  # sequences of 2 and 3 tokens: 3 + 6 query-key pairs
    assert varlen_attention.causal_flops(bounds, heads=4, head_dim=8) == 2 * 2 * 4 * 8 * 9


def test_reference_attends_within_each_sequence_only():
    torch.manual_seed(0)
    q, k, v = (torch.randn(5, 2, 4) for _ in range(3))
    bounds = torch.tensor([0, 2, 5], dtype=torch.int32)
    out = varlen_attention.reference(q, k, v, bounds)
    alone = varlen_attention.reference(q[2:], k[2:], v[2:], torch.tensor([0, 3], dtype=torch.int32))
    assert torch.allclose(out[2:], alone) and torch.allclose(out[0], v[0])  # the first token sees only itself


def test_flex_kernel_masks_each_packed_sequence_like_the_reference():
    """FlexAttention's document mask, forward only (its backward has no CPU kernel)."""
    torch.manual_seed(0)
    bounds = varlen_attention.cu_seqlens_of(256, 128, seed=0)
    q, k, v = torch.randn(256, 4, 16), torch.randn(256, 2, 16), torch.randn(256, 2, 16)
    out = varlen_attention.flex(q, k, v, bounds, 0)
    assert varlen_attention.relative_error(out, varlen_attention.reference(q, k, v, bounds)) < 1e-5
    whole = torch.tensor([0, 256], dtype=torch.int32)  # one sequence: a different answer
    assert varlen_attention.relative_error(out, varlen_attention.reference(q, k, v, whole)) > 0.1


def test_a_kernels_row_has_its_times_and_errors_and_a_kernel_that_raises_is_a_failed_row(monkeypatch):
    torch.manual_seed(0)
    bounds = torch.tensor([0, 5, 12], dtype=torch.int32)
    inputs = tuple(torch.randn(12, heads, 8, requires_grad=True) for heads in (4, 2, 2))
    grad_out = torch.randn(12, 4, 8)
    reference_out = varlen_attention.reference(*inputs, bounds)
    expected = (reference_out, *torch.autograd.grad(reference_out, inputs, grad_out))

    def refuses(*args):
        raise RuntimeError("no kernel for these inputs\nsecond line")

    monkeypatch.setitem(varlen_attention.KERNELS, "flash", lambda q, k, v, cu, max_len: varlen_attention.reference(
        q, k, v, cu))
    monkeypatch.setitem(varlen_attention.KERNELS, "fa4", refuses)
    row = varlen_attention.measure("flash", inputs, grad_out, bounds, 7, expected, flops=1e6, repeats=1)
    assert row["ok"] and row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
    assert max(row[key] for key in ("out_err", "dq_err", "dk_err", "dv_err")) < 1e-6
    failed = varlen_attention.measure("fa4", inputs, grad_out, bounds, 7, expected, flops=1e6, repeats=1)
    assert failed == {"kernel": "fa4", "ok": False, "error": "RuntimeError: no kernel for these inputs"}
