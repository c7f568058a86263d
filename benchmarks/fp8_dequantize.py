"""FP8 frozen experts (``--fp8_frozen_experts``): what reading the weights in FP8 costs the LoRA expert block.

Two tables, one run:

- Dequantizing one expert stack: torch's cast then per-row multiply against the fused Triton kernel
  (kernels.dequantize_rows), and whether the kernel's result is bit-identical to torch's fp32 product rounded once
  to bf16.
- The expert block under LoRA (frozen weights, rank-16 factors on both projections, top-8 routing), forward and
  forward+backward, on ``bf16`` weights and on ``fp8`` ones, which the op dequantizes to bf16 for its kernels once
  per forward (its backward takes that copy, as a checkpointed layer's backward takes its recompute's).

    python benchmarks/fp8_dequantize.py [--shape 128,1536,2048] [--tokens 8192]    # Qwen3-30B-A3B's experts
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import median_ms  # noqa: E402

from monkey_patch.frozen_experts import quantize_rowwise  # noqa: E402
from monkey_patch.scattermoe import kernels  # noqa: E402
from monkey_patch.scattermoe.compilable_ops import scattermoe_experts  # noqa: E402
from monkey_patch.scattermoe.ops import LowRank  # noqa: E402

BLOCK_WAYS = ("bf16", "fp8")


def block_rows(num_experts: int, two_inter: int, hidden: int, tokens: int, top_k: int, rank: int, repeats: int,
               device: str) -> list[dict]:
    """Forward and forward+backward ms of the LoRA expert block each way (``BLOCK_WAYS``)."""
    torch.manual_seed(0)
    dtype, inter = torch.bfloat16, two_inter // 2
    gate_up = torch.randn(num_experts, two_inter, hidden, device=device, dtype=dtype) * 0.02
    down = torch.randn(num_experts, hidden, inter, device=device, dtype=dtype) * 0.02
    (gate_up_fp8, gate_up_scale), (down_fp8, down_scale) = quantize_rowwise(gate_up), quantize_rowwise(down)
    factors = [(torch.randn(num_experts, *shape, device=device, dtype=dtype) * 0.02).requires_grad_()
               for shape in ((rank, hidden), (two_inter, rank), (rank, inter), (hidden, rank))]
    loras = LowRank(*factors[:2], 2.0), LowRank(*factors[2:], 2.0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    weights, index = torch.randn(tokens, num_experts, device=device).softmax(-1).topk(top_k, -1)
    weights = weights.to(dtype)
    grad = torch.randn(tokens, hidden, device=device, dtype=dtype)

    def forward(way: str) -> torch.Tensor:
        if way == "bf16":
            return scattermoe_experts(x, gate_up, down, weights, index, *loras)
        return scattermoe_experts(x, gate_up_fp8, down_fp8, weights, index, *loras, gate_up_scale, down_scale)

    def forward_backward(way: str) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(forward(way), (x, *factors), grad)

    rows = []
    for way in BLOCK_WAYS:
        with torch.no_grad():
            fwd_ms = median_ms(lambda way=way: forward(way), 3, repeats)
        rows.append({"way": way, "tokens": tokens, "fwd_ms": fwd_ms,
                     "fwd_bwd_ms": median_ms(lambda way=way: forward_backward(way), 3, repeats)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="128,1536,2048", help="experts, gate_up rows (2I), hidden")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens through the block (0: no block table)")
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = tuple(int(n) for n in args.shape.split(","))
    quantized, scale = quantize_rowwise(torch.randn(shape, device=device, dtype=torch.bfloat16))
    exact = torch.equal(kernels.dequantize_rows(quantized, scale, torch.bfloat16),
                        (quantized.float() * scale).to(torch.bfloat16))
    torch_ms = median_ms(lambda: quantized.to(torch.bfloat16) * scale.to(torch.bfloat16), 3, args.repeats)
    triton_ms = median_ms(lambda: kernels.dequantize_rows(quantized, scale, torch.bfloat16), 3, args.repeats)
    print(f"| shape | bit-identical | torch cast × scale ms | Triton kernel ms | speed-up |\n|---|---|---|---|---|\n"
          f"| {shape} | {exact} | {torch_ms:.3f} | {triton_ms:.3f} | {torch_ms / triton_ms:.2f}× |")
    result = {"exact": exact, "torch_ms": torch_ms, "triton_ms": triton_ms, "block": []}
    if args.tokens:
        result["block"] = rows = block_rows(*shape, args.tokens, args.top_k, args.rank, args.repeats, device)
        base = rows[0]["fwd_bwd_ms"]
        print(f"\nLoRA expert block {shape}, {args.tokens} tokens, top-{args.top_k}, rank {args.rank}\n\n"
              "| weights | fwd ms | fwd+bwd ms | fwd+bwd vs bf16 |\n|---|---|---|---|")
        for row in rows:
            print(f"| {row['way']} | {row['fwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} | {row['fwd_bwd_ms'] / base:.3f} |")
    return result


if __name__ == "__main__":
    main()
