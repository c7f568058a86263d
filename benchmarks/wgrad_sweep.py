"""Sweep tile configurations of ScatterMoE's weight-gradient kernel, the slowest part of the expert block's backward.

The autotuner only chooses among `_WEIGHT_GRAD_CONFIGS` in monkey_patch/scattermoe/kernels.py. This times a wider
grid (tile sizes, warps, pipeline stages) on the two weight gradients of a Qwen3-MoE expert block, at the shapes of
benchmarks/moe_block.py, checks each result against the autotuned kernel, and prints the fastest configs per case
beside the autotuned one, so a better config can be added to the list with its measured gain. The second row is
ops.expert_weight_grad's grouped-GEMM backend (rows copied into expert order, then torch's grouped GEMM; by default
dW_gate_up's, TURBO_TUNE_MOE_WEIGHT_GRAD=grouped_mm for both), copy included.

    python benchmarks/wgrad_sweep.py [--cases 30b-32k,235b-16k] [--top 5] [--persistent]

With ``--persistent`` every config is also timed in the kernel's persistent form (a program per SM over its tiles'
row chunks, as in the kernel's persistent configs), a sixth field of the config.
"""

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import median_ms, relative_error  # noqa: E402

from monkey_patch.scattermoe import kernels, ops  # noqa: E402
from monkey_patch.scattermoe.ops import compute_routing  # noqa: E402

# name -> (tokens, hidden, intermediate); 128 experts, top-8, balanced random routing
CASES = {"30b-8k": (8192, 2048, 768), "30b-32k": (32768, 2048, 768), "235b-16k": (16384, 4096, 1536)}
# Hopper-sized output tiles only (the autotuner's smaller ones exist for LoRA's rank-wide factors): 99 configs,
# compiled once per gradient (the gathered operand differs), a few minutes in all. Deep pipelines at eight warps:
# for a gathered operand Triton 3.6 spends about half the stages on the row indices, so 5 stages buffer 3 tiles of
# data and 8 stages 4 (compiled for sm_90 on the CPU); the H200 sweep of 2026-12-02 timed them level with 5 stages.
TILES = [(m, n, k) for m, n in ((128, 128), (128, 256), (256, 128)) for k in (32, 64, 128)]
LAUNCH = [(w, s) for w in (4, 8) for s in (2, 3, 4, 5)] + [(8, s) for s in (6, 8, 10)]
WARMUP, REPEATS = 1, 10
GROUPED_MM = "torch._grouped_mm, rows copied"  # ops.expert_weight_grad's grouped-GEMM backend, beside the tiles
DOES_NOT_RUN = (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError, RuntimeError)


def weight_grad_problems(tokens: int, hidden: int, inter: int, experts: int, top_k: int, device: str,
                         dtype: torch.dtype) -> dict[str, tuple]:
    """The arguments of `kernels.grouped_weight_grad` for dW_gate_up and dW_down of one expert block."""
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    top_k_index = torch.rand(tokens, experts, device=device).topk(top_k, dim=1).indices
    sorted_pairs, expert_ends = compute_routing(top_k_index, experts)
    rows = tokens * top_k
    grad_gate_up = torch.randn(rows, 2 * inter, device=device, dtype=dtype)
    grad_out = torch.randn(tokens, hidden, device=device, dtype=dtype)  # read by token through the routing
    h = torch.randn(rows, inter, device=device, dtype=dtype)
    routing = kernels.Routing.of(sorted_pairs, expert_ends, top_k)
    return {
        "dW_gate_up": (grad_gate_up, x, routing, False, True,
                       torch.empty(experts, 2 * inter, hidden, device=device, dtype=dtype)),
        "dW_down": (grad_out, h, routing, True, False,
                    torch.empty(experts, hidden, inter, device=device, dtype=dtype)),
    }


def launch(problem: tuple, block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int,
           persistent: bool = False) -> torch.Tensor:
    """`kernels.grouped_weight_grad` with one fixed config instead of the autotuner's choice."""
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "PERSISTENT": persistent},
                           num_warps=num_warps, num_stages=num_stages)
    return kernels.grouped_weight_grad(*problem, config=config)


def sweep(problem: tuple, configs: list[tuple[int, ...]], flops: float) -> list[dict]:
    """The autotuned kernel's time, then the grouped_mm backend's and each config's, or why it did not run; results
    are checked against the autotuned kernel."""
    a, b, routing, a_gathered, b_gathered, dw = problem
    reference = kernels.grouped_weight_grad(a, b, routing, a_gathered, b_gathered, torch.empty_like(dw))

    def checked_and_timed(config, fn) -> dict:
        error = relative_error(fn(), reference)
        if error > 1e-2:
            return {"config": config, "error": f"result differs (rel. err {error:.1e})"}
        return {"config": config, "ms": median_ms(fn, WARMUP, REPEATS)}

    rows = [{"config": "autotuned", "ms": median_ms(lambda: kernels.grouped_weight_grad(
        a, b, routing, a_gathered, b_gathered, dw), WARMUP, REPEATS)}]
    os.environ[ops.WEIGHT_GRAD_ENV] = "grouped_mm"
    rows.append(checked_and_timed(GROUPED_MM, lambda: ops.expert_weight_grad(  # either projection: grouped_mm
        a, b, routing, a_gathered, b_gathered, dw, "gate_up")))
    os.environ[ops.WEIGHT_GRAD_ENV] = "triton"
    for config in configs:
        try:
            rows.append(checked_and_timed(config, lambda c=config: launch(problem, *c)))
        except DOES_NOT_RUN as exc:  # too much shared memory or registers for this tile and pipeline depth
            rows.append({"config": config, "error": type(exc).__name__})
    for row in rows:
        if "ms" in row:
            row["tflops"] = flops / row["ms"] / 1e9
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="30b-32k,235b-16k", help=f"comma-separated among {', '.join(CASES)}")
    parser.add_argument("--top", type=int, default=5, help="fastest configs shown per case")
    parser.add_argument("--persistent", action="store_true", help="also time each config's persistent form")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/wgrad_sweep.py times GPU kernels; this machine has no CUDA GPU.", file=sys.stderr)
        return 2
    forms = (False, True) if args.persistent else (False,)
    configs = [(*tile, *launch_, persistent) for tile, launch_, persistent in itertools.product(TILES, LAUNCH, forms)]
    print(f"{torch.cuda.get_device_name()}, {len(configs)} configs (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, "
          "persistent)\n\n| case | gradient | config | ms | TFLOP/s | vs autotuned |\n|---|---|---|---|---|---|",
          flush=True)
    for case in args.cases.split(","):
        tokens, hidden, inter = CASES[case]
        problems = weight_grad_problems(tokens, hidden, inter, 128, 8, "cuda", torch.bfloat16)
        for name, problem in problems.items():
            flops = 2.0 * tokens * 8 * hidden * inter * (2 if name == "dW_gate_up" else 1)
            autotuned, on_grouped_mm, *tiles = sweep(problem, configs, flops)
            timed = sorted((r for r in tiles if "ms" in r), key=lambda r: r["ms"])
            for row in [autotuned, on_grouped_mm, *timed[: args.top]]:  # printed now: a run cut short keeps them
                if "ms" not in row:
                    print(f"| {case} | {name} | {row['config']} | {row['error']} | | |")
                    continue
                print(f"| {case} | {name} | {row['config']} | {row['ms']:.3f} | {row['tflops']:.0f} | "
                      f"{autotuned['ms'] / row['ms']:.2f}× |")
            failed = len(tiles) - len(timed)
            print(f"| {case} | {name} | {len(timed)} configs ran, {failed} did not | | | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
