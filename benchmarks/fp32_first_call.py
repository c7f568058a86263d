"""Seconds of the first fp32 forward + backward of the ScatterMoE experts at each new shape: autotuning and compiling
included, as a parity run with ``--model_dtype float32`` pays them. ``--tiles fp32`` (what runs): fp32's own small
tiles; ``--tiles bf16``: the bf16 tile list, which fp32 used before (one such shape took over 8 minutes on an H200).

    python benchmarks/fp32_first_call.py --tiles fp32
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import turbo_tune.triton_mode  # noqa: E402, F401  (before anything imports triton)

# isort: split
from monkey_patch.scattermoe import kernels  # noqa: E402
from monkey_patch.scattermoe.compilable_ops import scattermoe_experts  # noqa: E402

# hidden, intermediate, experts, top-k, tokens: three small shapes, then the one that did not finish (issue 20)
SHAPES = [(64, 32, 4, 2, 50), (96, 64, 8, 4, 100), (64, 48, 8, 8, 129), (128, 96, 16, 8, 257)]


def first_call_s(hidden: int, inter: int, experts: int, top_k: int, tokens: int, device: str) -> float:
    torch.manual_seed(0)
    w_gate_up = (torch.randn(experts, 2 * inter, hidden, device=device) * 0.02).requires_grad_()
    w_down = (torch.randn(experts, hidden, inter, device=device) * 0.02).requires_grad_()
    x = torch.randn(tokens, hidden, device=device, requires_grad=True)
    weights, index = torch.randn(tokens, experts, device=device).softmax(-1).topk(top_k, -1)
    start = time.perf_counter()
    out = scattermoe_experts(x, w_gate_up, w_down, weights, index)
    torch.autograd.grad(out, (x, w_gate_up, w_down), torch.randn_like(out))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="how many of SHAPES to run")
    args = parser.parse_args(argv)
    if args.tiles == "bf16":
        kernels._FP32_TWINS = {kernel: kernel for kernel in kernels._FP32_TWINS}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seconds = []
    for shape in SHAPES[: args.shapes]:
        seconds.append(first_call_s(*shape, device))
        print(f"tiles {args.tiles}: H {shape[0]} I {shape[1]} E {shape[2]} top-{shape[3]} {shape[4]} tokens: "
              f"{seconds[-1]:.1f} s", flush=True)
    return seconds


if __name__ == "__main__":
    main()
