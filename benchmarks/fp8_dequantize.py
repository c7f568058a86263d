"""Time the dequantization of FP8 frozen experts (``--fp8_frozen_experts``): torch's cast then per-row multiply
against the fused Triton kernel (kernels.dequantize_rows), on one expert stack, and check the kernel's result is
bit-identical to torch's fp32 product rounded once to bf16.

    python benchmarks/fp8_dequantize.py [--shape 128,1536,2048]    # Qwen3-30B-A3B's gate_up_proj
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import median_ms  # noqa: E402

from monkey_patch.frozen_experts import quantize_rowwise  # noqa: E402
from monkey_patch.scattermoe import kernels  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="128,1536,2048", help="experts, rows, row length")
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
    return {"exact": exact, "torch_ms": torch_ms, "triton_ms": triton_ms}


if __name__ == "__main__":
    main()
