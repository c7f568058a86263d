"""Causal attention over packed rows (padding-free SFT), per kernel that can run it: forward and forward + backward
time, TFLOP/s, and the error of output and input gradients against an fp32 reference, per sequence.

    python benchmarks/varlen_attention.py [--tokens 8192] [--seq 4096] [--heads 32] [--kv_heads 4] [--repeats 20]
        [--kernels flash flex fa4 fa4_compiled]

Kernels: ``flash``, PyTorch's ``varlen_attn`` (its FlashAttention-2 build, what ``varlen_sdpa`` runs on a GPU);
``flex``, FlexAttention with a causal document mask (Triton kernels from torch.compile); ``fa4``, flash-attn-4's
varlen kernels through our op pair where that package is installed (a failed row where not), and ``fa4_compiled``,
the same inside a torch.compile graph. Only when named: ``cudnn``, cuDNN's fused
attention over the same ragged rows (``aten._cudnn_attention_forward`` with cumulative sequence lengths, whose
backward autograd already knows), with the key/value heads as they are (GQA), and ``cudnn_repeated_kv``, with them
repeated to the query heads (on torch 2.11 both took ~60 ms a call with wrong gradients: docs/results.md).
Sequence lengths follow e2e.py's SFT mix (log-normal around 600 tokens, packed into rows of --seq). The table is
printed last; --json writes its rows.
"""

import argparse
import functools
import itertools
import json
import sys
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt, median_ms, relative_error  # noqa: E402
from e2e import packed_lengths  # noqa: E402


def cu_seqlens_of(tokens: int, seq: int, seed: int) -> torch.Tensor:
    """Boundaries of ``tokens`` tokens of SFT-like sequences in rows of ``seq`` tokens: a sequence that crosses a row's
    end is cut there, as packing into fixed rows cuts it."""
    ends = list(itertools.accumulate(packed_lengths(tokens, seq, seed)))
    bounds = sorted({0, tokens, *(end for end in ends if end < tokens), *range(seq, tokens, seq)})
    return torch.tensor(bounds, dtype=torch.int32)


def causal_flops(cu_seqlens: torch.Tensor, heads: int, head_dim: int) -> float:
    """Forward FLOPs of causal attention: two matmuls over half of each sequence's square."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    return float(2 * 2 * heads * head_dim * (lengths * (lengths + 1) / 2).sum())


def reference(q, k, v, cu_seqlens) -> torch.Tensor:
    """fp32 causal attention per sequence."""
    out = []
    for start, end in pairwise(cu_seqlens.tolist()):
        seq = [t[start:end].float().transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        out.append(F.scaled_dot_product_attention(*seq, is_causal=True, enable_gqa=True).squeeze(0).transpose(0, 1))
    return torch.cat(out)


def flash(q, k, v, cu_seqlens, max_len):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, window_size=(-1, 0))


def cudnn(q, k, v, cu_seqlens, max_len):
    return torch.ops.aten._cudnn_attention_forward(
        q, k, v, None, cu_seqlens, cu_seqlens, max_len, max_len, True, 0.0, True, False)[0]


def cudnn_repeated_kv(q, k, v, cu_seqlens, max_len):
    groups = q.shape[1] // k.shape[1]
    return cudnn(q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), cu_seqlens, max_len)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _causal_document_mask(tokens: int, bounds: tuple[int, ...], device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    ends = torch.tensor(bounds[1:], device=device)
    document = torch.bucketize(torch.arange(tokens, device=device), ends, right=True)

    def causal_document(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(causal_document, 1, 1, tokens, tokens, device=device)


def flex(q, k, v, cu_seqlens, max_len):
    """FlexAttention (Triton kernels made by torch.compile) with a causal document mask, built once per set of
    boundaries, as a model builds it once per batch for all its layers."""
    mask = _causal_document_mask(q.shape[0], tuple(cu_seqlens.tolist()), str(q.device))
    heads_first = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
    return _compiled_flex_attention()(*heads_first, block_mask=mask, enable_gqa=True).squeeze(0).transpose(0, 1)


def fa4(q, k, v, cu_seqlens, max_len):
    """flash-attn-4's varlen kernels (CuTe DSL; Hopper and Blackwell) through our op pair, as ``varlen_sdpa`` runs
    them (monkey_patch/fa4_attention.py); a failed row where flash-attn-4 is not installed."""
    from monkey_patch.fa4_attention import fa4_varlen

    return fa4_varlen(q, k, v, cu_seqlens, max_len, None)


@functools.cache
def _compiled_fa4():
    from monkey_patch.fa4_attention import fa4_varlen

    return torch.compile(fa4_varlen, fullgraph=True, dynamic=False)


def fa4_compiled(q, k, v, cu_seqlens, max_len):
    """The same op pair inside one torch.compile graph (fullgraph): its fake implementations at work."""
    return _compiled_fa4()(q, k, v, cu_seqlens, max_len, None)


KERNELS = {"flash": flash, "flex": flex, "fa4": fa4, "fa4_compiled": fa4_compiled, "cudnn": cudnn,
           "cudnn_repeated_kv": cudnn_repeated_kv}


def measure(name: str, inputs: tuple, grad_out: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
            expected: tuple, flops: float, repeats: int) -> dict:
    """One kernel's row: its times and its errors on output and input gradients against ``expected``."""
    kernel = KERNELS[name]

    def forward():
        return kernel(*inputs, cu_seqlens, max_len)

    def forward_backward():
        out = forward()
        return out, *torch.autograd.grad(out, inputs, grad_out)

    try:
        results = forward_backward()
    except Exception as error:  # a kernel that refuses these inputs is a row, not a crash
        return {"kernel": name, "ok": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    errors = [relative_error(got, want) for got, want in zip(results, expected, strict=True)]

    fwd_ms = median_ms(forward, 3, repeats)
    fwd_bwd_ms = median_ms(forward_backward, 3, repeats)
    return {"kernel": name, "ok": True, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
            # a backward is 2.5 forwards (two matmuls recomputed or re-read, three for the gradients)
            "fwd_tflops": flops / fwd_ms / 1e9, "fwd_bwd_tflops": 3.5 * flops / fwd_bwd_ms / 1e9,
            "out_err": errors[0], "dq_err": errors[1], "dk_err": errors[2], "dv_err": errors[3]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=["flash", "flex", "fa4", "fa4_compiled"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        cu_seqlens = cu_seqlens_of(args.tokens, args.seq, seed).cuda()
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        torch.manual_seed(seed)
        inputs = tuple(torch.randn(args.tokens, heads, args.head_dim, device="cuda", dtype=torch.bfloat16)
                       .requires_grad_(True) for heads in (args.heads, args.kv_heads, args.kv_heads))
        grad_out = torch.randn(args.tokens, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16)
        fp32 = tuple(t.detach().float().requires_grad_(True) for t in inputs)
        ref_out = reference(*fp32, cu_seqlens)
        expected = (ref_out, *torch.autograd.grad(ref_out, fp32, grad_out.float()))
        flops = causal_flops(cu_seqlens, args.heads, args.head_dim)
        for name in args.kernels:
            row = measure(name, inputs, grad_out, cu_seqlens, max_len, expected, flops, args.repeats)
            rows.append({"seed": seed, "sequences": len(cu_seqlens) - 1, "max_len": max_len, **row})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| seed | sequences | kernel | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s "
             "| error out / dq / dk / dv (vs fp32) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['seed']} | {r['sequences']} | {r['kernel']} | failed: {r['error']} | | | | |")
            continue
        errors = " / ".join(fmt(r[key], ".1e") for key in ("out_err", "dq_err", "dk_err", "dv_err"))
        lines.append(f"| {r['seed']} | {r['sequences']} | {r['kernel']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                     f"{r['fwd_tflops']:.0f} | {r['fwd_bwd_tflops']:.0f} | {errors} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
