"""flash-attn-4 behind our op pair (monkey_patch/fa4_attention.py) and the choice of varlen_sdpa's GPU kernel.

flash-attn-4 has no CPU kernels, so its two entry points are stood in for by a per-sequence fp32 reference with
their signatures and layouts (lse as (heads, tokens), the backward taking out and dout in that order): what these
tests pin is our wiring (arguments, fake shapes, the autograd formula, one compiled graph); the GPU gate
(tests/gpu/test_varlen_attention.py) runs the real kernels."""

import sys
import types
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from monkey_patch import attention, fa4_attention
from monkey_patch.fa4_attention import fa4_varlen, fa4_varlen_forward
from tests.numerics import relative_error
from turbo_tune.errors import ConfigError

LENGTHS = (5, 1, 12, 7)


def reference(q, k, v, cu_seqlens, scale):
    """Causal attention per packed sequence (T, H, D), and its log-sum-exp (Hq, T)."""
    outputs, lses = [], []
    for start, end in pairwise(cu_seqlens.tolist()):
        seq = [t[start:end].transpose(0, 1) for t in (q, k, v)]
        groups = seq[0].shape[0] // seq[1].shape[0]
        kk, vv = (t.repeat_interleave(groups, dim=0) for t in seq[1:])
        scores = (seq[0] @ kk.transpose(1, 2)) * scale
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        outputs.append((scores.softmax(-1) @ vv).transpose(0, 1))
        lses.append(scores.logsumexp(-1))
    return torch.cat(outputs), torch.cat(lses, dim=1)


def fake_flash_attn_fwd(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                        return_lse):
    assert causal and return_lse and cu_seqlens_q is cu_seqlens_k and cu_seqlens_q.dtype == torch.int32
    assert max_seqlen_q == max_seqlen_k == max(LENGTHS)
    out, lse = reference(q, k, v, cu_seqlens_q, softmax_scale)
    return out, lse, None, None, None


def fake_flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale, causal, *, cu_seqlens_q, cu_seqlens_k,
                        max_seqlen_q, max_seqlen_k):
    """Flash attention's backward, by hand (autograd does not run inside a custom op): probabilities from the
    forward's log-sum-exp, the softmax gradient from rowsum(dout * out)."""
    assert causal and lse.shape == (q.shape[1], q.shape[0]) and dout.is_contiguous()
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    groups = q.shape[1] // k.shape[1]
    for start, end in pairwise(cu_seqlens_q.tolist()):
        qs, ks, vs, os_, dos = (t[start:end].transpose(0, 1) for t in (q, k, v, out, dout))
        ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
        scores = (qs @ ks.transpose(1, 2)) * softmax_scale
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        probs = (scores - lse[:, start:end, None]).exp()
        dscores = probs * (dos @ vs.transpose(1, 2) - (dos * os_).sum(-1, keepdim=True)) * softmax_scale
        per_head = (dscores @ ks, dscores.transpose(1, 2) @ qs, probs.transpose(1, 2) @ dos)
        for grad, value in zip(grads, per_head, strict=True):
            heads = grad.shape[1]
            grad[start:end] = value.unflatten(0, (heads, -1)).sum(1).transpose(0, 1)
    return tuple(grads)


@pytest.fixture
def fake_fa4(monkeypatch):
    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = fake_flash_attn_fwd, fake_flash_attn_bwd
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", interface)


def packed(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(LENGTHS)
    q, k, v = (torch.randn(tokens, heads, 16, generator=generator) for heads in (4, 2, 2))
    cu_seqlens = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    return (q, k, v), cu_seqlens, torch.randn(tokens, 4, 16, generator=generator)


def per_sequence_sdpa_with_grads(inputs, cu_seqlens, grad_out, scale):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = attention._per_sequence_sdpa(*leaves, cu_seqlens, scale)
    return (out, *torch.autograd.grad(out, leaves, grad_out))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled_fullgraph"])
def test_fa4_op_pair_gives_causal_attention_and_its_gradients(fake_fa4, compiled):
    inputs, cu_seqlens, grad_out = packed()
    expected = per_sequence_sdpa_with_grads(inputs, cu_seqlens, grad_out, 0.3)
    leaves = [t.clone().requires_grad_() for t in inputs]
    run = fa4_varlen
    if compiled:
        torch._dynamo.reset()
        run = torch.compile(fa4_varlen, fullgraph=True, backend="aot_eager")
    out = run(*leaves, cu_seqlens, max(LENGTHS), 0.3)
    actual = (out, *torch.autograd.grad(out, leaves, grad_out.transpose(0, 1).contiguous().transpose(0, 1)))  # strided
    for got, want in zip(actual, expected, strict=True):
        assert relative_error(got, want) < 1e-5


def test_fa4_op_pair_defaults_to_the_inverse_square_root_scale(fake_fa4):
    inputs, cu_seqlens, _ = packed(1)
    expected = attention._per_sequence_sdpa(*inputs, cu_seqlens, None)
    assert relative_error(fa4_varlen(*inputs, cu_seqlens, max(LENGTHS), None), expected) < 1e-5


def test_fa4_forward_op_passes_torch_library_checks(fake_fa4):
    """Schema, fake implementation against the real one, and the autograd registration, as torch.compile uses them."""
    inputs, cu_seqlens, _ = packed(2)
    args = (*[t.clone().requires_grad_() for t in inputs], cu_seqlens.to(torch.int32), max(LENGTHS), 0.25)
    torch.library.opcheck(fa4_varlen_forward, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize(("setting", "available", "expected"), [
    (None, True, "fa4"), (None, False, "flash"), ("", True, "fa4"), ("flash", True, "flash"), ("fa4", True, "fa4")])
def test_varlen_kernel_is_flash_attn_4_where_it_can_run_unless_overridden(monkeypatch, setting, available, expected):
    if setting is None:
        monkeypatch.delenv(attention.VARLEN_KERNEL_ENV, raising=False)
    else:
        monkeypatch.setenv(attention.VARLEN_KERNEL_ENV, setting)
    monkeypatch.setattr(attention, "fa4_available", lambda: available)
    assert attention.varlen_kernel() == expected


@pytest.mark.parametrize(("available", "named"), [(True, "flash-attn-4's kernels"), (False, "PyTorch's flash kernel")])
def test_the_chosen_varlen_kernel_is_logged_once(monkeypatch, caplog, available, named):
    monkeypatch.delenv(attention.VARLEN_KERNEL_ENV, raising=False)
    monkeypatch.setattr(attention, "fa4_available", lambda: available)
    monkeypatch.setattr(attention, "_CUDA_VARLEN_KWARGS", {})
    with caplog.at_level("INFO", logger=attention.logger.name):
        attention._varlen_kwargs()
        attention._varlen_kwargs()
    assert [r.getMessage() for r in caplog.records if "varlen_sdpa runs" in r.getMessage()] == [
        f"varlen_sdpa runs packed rows through {named} (TURBO_TUNE_VARLEN_KERNEL=flash or =fa4 pins one)."]


@pytest.mark.parametrize(("setting", "message"), [("auto", "use flash"), ("fa4", "needs the flash-attn-4 package")])
def test_unusable_varlen_kernel_setting_is_refused_before_the_model_loads(monkeypatch, setting, message):
    monkeypatch.setenv(attention.VARLEN_KERNEL_ENV, setting)
    monkeypatch.setattr(attention, "fa4_available", lambda: False)
    with pytest.raises(ConfigError, match=f"TURBO_TUNE_VARLEN_KERNEL={setting}:? .*{message}"):
        attention.register_varlen_sdpa()


def test_flash_attention_2s_cute_folder_is_not_taken_for_flash_attn_4(monkeypatch):
    """FlashAttention-2's package ships a ``flash_attn.cute`` folder too: only the flash-attn-4 distribution counts."""
    import importlib.metadata
    import importlib.util

    try:
        importlib.metadata.version("flash-attn-4")
        pytest.skip("flash-attn-4 is installed here")
    except importlib.metadata.PackageNotFoundError:
        pass

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object() if name.startswith("flash_attn")
                        else real_find_spec(name, *args))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    fa4_attention.fa4_available.cache_clear()
    try:
        assert not fa4_attention.fa4_available()
    finally:
        fa4_attention.fa4_available.cache_clear()


def test_flash_attn_4_is_unavailable_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("the CPU answer is pinned here")
    fa4_attention.fa4_available.cache_clear()
    assert not fa4_attention.fa4_available()


def test_per_sequence_reference_agrees_with_sdpa():
    """The stand-in above is itself causal attention (else the op-pair tests would prove nothing)."""
    inputs, cu_seqlens, _ = packed(3)
    out, lse = reference(*inputs, cu_seqlens, 16 ** -0.5)
    first = [t[:LENGTHS[0]].transpose(0, 1) for t in inputs]
    expected = F.scaled_dot_product_attention(*first, is_causal=True, enable_gqa=True).transpose(0, 1)
    assert relative_error(out[:LENGTHS[0]], expected) < 1e-5 and lse.shape == (4, sum(LENGTHS))
