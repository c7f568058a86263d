"""Host time of the expert block's kernel launches: Triton's own launch path against the launch cache
(monkey_patch/scattermoe/launch.py), and a check that the cache runs exactly the kernels Triton would.

A LoRA step of full-depth Qwen3-30B-A3B at 4,096 tokens is bound by host time, not the GPU (docs/history.md),
so the Python spent per launch counts. For the block with LoRA on both projections, forward and backward, at a
few token counts with 16-byte-aligned and misaligned inputs: the output and the six gradients through the cache,
on its first (miss) and second (hit) call, against Triton's path bit for bit. Then the host time of one call on
each path (few tokens, so the GPU never holds the host back; median of trials). On a CPU the kernels run in
Triton's interpreter, where the cache steps aside: the check is trivially exact and the times are the
interpreter's.

    python benchmarks/launch_overhead.py [--tokens 4096,1000,37] [--timing_tokens 256] [--trials 5]
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import turbo_tune.triton_mode  # noqa: E402, F401  (before anything imports triton)

# isort: split
from monkey_patch.scattermoe import kernels, launch  # noqa: E402
from monkey_patch.scattermoe.compilable_ops import scattermoe_experts  # noqa: E402
from monkey_patch.scattermoe.ops import LowRank, compute_routing  # noqa: E402

SHAPES = {  # hidden, intermediate, experts, top-k, LoRA rank
    "full": (2048, 768, 128, 8, 16),  # Qwen3-30B-A3B
    "small": (32, 16, 4, 2, 4),  # CPU smoke test
}


class Block:
    """One expert block's frozen weights and LoRA factors, and inputs for any token count."""

    def __init__(self, shape: str, device: str, dtype: torch.dtype) -> None:
        self.hidden, inter, self.experts, self.top_k, rank = SHAPES[shape]
        self.device, self.dtype = device, dtype
        generator = torch.Generator(device=device).manual_seed(0)

        def weight(*size: int, grad: bool = False) -> torch.Tensor:
            tensor = torch.randn(size, device=device, dtype=dtype, generator=generator) * 0.02
            return tensor.requires_grad_(grad)

        experts, hidden = self.experts, self.hidden
        self.w_gate_up, self.w_down = weight(experts, 2 * inter, hidden), weight(experts, hidden, inter)
        self.factors = [weight(experts, rank, hidden, grad=True), weight(experts, 2 * inter, rank, grad=True),
                        weight(experts, rank, inter, grad=True), weight(experts, hidden, rank, grad=True)]

    def inputs(self, tokens: int, misaligned: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (one element past an aligned start when ``misaligned``), routing weights and expert ids."""
        generator = torch.Generator(device=self.device).manual_seed(tokens)
        flat = torch.randn(tokens * self.hidden + 1, device=self.device, dtype=self.dtype, generator=generator)
        x = (flat[1:] if misaligned else flat[:-1]).view(tokens, self.hidden).requires_grad_()
        logits = torch.randn(tokens, self.experts, device=self.device, generator=generator)
        weights, ids = torch.softmax(logits, -1).topk(self.top_k, -1)
        return x, weights.to(self.dtype).requires_grad_(), ids

    def forward_backward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
        """Output and gradients of x, the routing weights and the four factors."""
        a_gu, b_gu, a_d, b_d = self.factors
        out = scattermoe_experts(x, self.w_gate_up, self.w_down, weights, ids, LowRank(a_gu, b_gu, 2.0),
                                 LowRank(a_d, b_d, 2.0))
        return [out, *torch.autograd.grad(out, [x, weights, *self.factors], out)]


def check_exact(block: Block, token_counts: list[int]) -> list[dict]:
    """Per (tokens, alignment): whether the cache's miss and hit calls equal Triton's path bit for bit."""
    rows = []
    for tokens in token_counts:
        for misaligned in (False, True):
            inputs = block.inputs(tokens, misaligned)
            launch.enabled = False
            reference = block.forward_backward(*inputs)
            launch.enabled = not launch.INTERPRET
            exact = [all(torch.equal(a, b) for a, b in zip(block.forward_backward(*inputs), reference, strict=True))
                     for _ in ("miss", "hit")]
            rows.append({"tokens": tokens, "misaligned": misaligned, "miss_exact": exact[0], "hit_exact": exact[1]})
    return rows


def host_ms(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Host milliseconds per ``fn()`` after a warm-up call, the GPU left to run behind (synchronized only before and
    after the timed calls)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    elapsed = time.perf_counter() - start
    sync()
    return elapsed / repeats * 1e3


def block_ms(block: Block, tokens: int, repeats: int) -> float:
    """Host milliseconds per LoRA expert-block forward + backward."""
    inputs = block.inputs(tokens, misaligned=False)
    return host_ms(lambda: block.forward_backward(*inputs), block.device, repeats)


def one_launch_ms(block: Block, tokens: int, repeats: int) -> float:
    """Host milliseconds per launch of one kernel (the gathered gate_up projection, without LoRA)."""
    x, _, ids = block.inputs(tokens, misaligned=False)
    routing = kernels.Routing.of(*compute_routing(ids, block.experts), block.top_k)
    w = block.w_gate_up.transpose(1, 2)
    return host_ms(lambda: kernels.scatter_matmul(x, w, routing, a_gathered=True, y_scattered=False),
                   block.device, repeats)


def time_paths(measure: Callable[[], float], trials: int) -> dict[str, float]:
    """Median of ``measure()`` on each path, trials interleaved so both see the same host."""
    times: dict[str, list[float]] = {"Triton's launch path": [], "launch cache": []}
    for _ in range(trials):
        for path, on in (("Triton's launch path", False), ("launch cache", not launch.INTERPRET)):
            launch.enabled = on
            times[path].append(measure())
    launch.enabled = not launch.INTERPRET
    return {path: statistics.median(values) for path, values in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="full")
    parser.add_argument("--tokens", default="4096,1000,37", help="token counts of the exactness check")
    parser.add_argument("--timing_tokens", type=int, default=256)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30, help="calls per timing trial")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    block = Block(args.shape, device, torch.bfloat16 if device == "cuda" else torch.float32)
    checks = check_exact(block, [int(n) for n in args.tokens.split(",")])
    per_block = time_paths(lambda: block_ms(block, args.timing_tokens, args.repeats), args.trials)
    per_launch = time_paths(lambda: one_launch_ms(block, args.timing_tokens, 10 * args.repeats), args.trials)

    print(f"\n{torch.cuda.get_device_name() if device == 'cuda' else 'CPU (Triton interpreter)'}, shape {args.shape}\n")
    print("| tokens | input | miss call bit-identical | hit call bit-identical |\n|---|---|---|---|")
    for row in checks:
        print(f"| {row['tokens']} | {'misaligned' if row['misaligned'] else 'aligned'} | {row['miss_exact']} | "
              f"{row['hit_exact']} |")
    print(f"\nHost time at {args.timing_tokens} tokens, median of {args.trials} trials:\n\n"
          "| launch path | one LoRA expert-block forward + backward, ms | one scatter_matmul launch, µs |\n"
          "|---|---|---|")
    for path in per_block:
        print(f"| {path} | {per_block[path]:.3f} | {per_launch[path] * 1e3:.1f} |")
    return {"checks": checks, "host_ms": per_block, "launch_ms": per_launch}


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(r["miss_exact"] and r["hit_exact"] for r in result["checks"]) else 1)
