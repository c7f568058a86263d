"""Time the Qwen3-MoE expert block: transformers `eager` and `grouped_mm` (also compiled), Liger-Kernel's fused MoE
(what `--use_liger_kernel` alone runs the experts with), `scattermoe` (the default: dW_gate_up on torch's grouped GEMM,
dW_down on ScatterMoE's Triton kernel), `scattermoe_wgrad_triton` (both on the Triton kernel, the lowest peak) and
`scattermoe_wgrad_grouped_mm` (both on the grouped GEMM, a row copy beside both gradients), in one run.

Forward and forward+backward in bf16 (median of CUDA-event timings after warm-up), TFLOP/s
(18 * tokens * top_k * H * I for forward+backward, 6 * ... for forward), extra peak memory of one
forward+backward, and the bf16 error of outputs and gradients against `grouped_mm`. With --profile, a
per-kernel breakdown of scattermoe and grouped_mm at the chosen shapes. Prints a markdown table last.

    python benchmarks/moe_block.py --out results.md
"""

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass

import torch
from common import kernel_table, median_ms, relative_error
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from monkey_patch.fast_moe import register_scattermoe
from monkey_patch.model_parts import register_experts_function
from monkey_patch.scattermoe import kernels
from monkey_patch.scattermoe.ops import WEIGHT_GRAD_ENV

logger = logging.getLogger("moe_block")
SCATTERMOE_WGRAD_TRITON = "scattermoe_wgrad_triton"
SCATTERMOE_WGRAD_GROUPED_MM = "scattermoe_wgrad_grouped_mm"
# scattermoe under each TURBO_TUNE_MOE_WEIGHT_GRAD backend (plain ``scattermoe``: the default, grouped_mm_gate_up)
WEIGHT_GRAD_OF = {"scattermoe": "grouped_mm_gate_up", SCATTERMOE_WGRAD_TRITON: "triton",
                  SCATTERMOE_WGRAD_GROUPED_MM: "grouped_mm"}
GROUPED_MM_COMPILED = "grouped_mm_compiled"
GIB = 1024**3


@dataclass
class Case:
    shape: str
    hidden: int
    inter: int
    experts: int
    top_k: int
    tokens: int
    routing: str
    with_eager: bool


CASES = [
    Case("30B-A3B", 2048, 768, 128, 8, 8192, "balanced", True),
    Case("30B-A3B", 2048, 768, 128, 8, 8192, "skewed", True),
    Case("30B-A3B", 2048, 768, 128, 8, 32768, "balanced", False),
    Case("30B-A3B", 2048, 768, 128, 8, 32768, "skewed", False),
    Case("235B-A22B", 4096, 1536, 128, 8, 16384, "balanced", False),
    Case("235B-A22B", 4096, 1536, 128, 8, 16384, "skewed", False),
]


def register_liger_fused_moe() -> None:
    """Liger's ``LigerFusedMoEFunction`` as the experts implementation ``liger_fused_moe``, timed like the others."""
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    def liger_fused_moe(module, hidden_states, top_k_index, top_k_weights):
        return LigerFusedMoEFunction.apply(
            hidden_states, module.gate_up_proj, module.down_proj, top_k_index.to(torch.int32), top_k_weights
        )

    register_experts_function("liger_fused_moe", liger_fused_moe)


def use_implementation(experts: Qwen3MoeExperts, impl: str) -> None:
    """Select ``impl``: the ``scattermoe_wgrad_*`` names are scattermoe under another weight-gradient backend
    (``WEIGHT_GRAD_OF``); ``grouped_mm_compiled`` is ``grouped_mm`` under torch.compile, what ``--torch_compile``
    makes of the transformers default (run_case compiles it)."""
    os.environ[WEIGHT_GRAD_ENV] = WEIGHT_GRAD_OF.get(impl, "grouped_mm")
    experts.config._experts_implementation = "scattermoe" if impl in WEIGHT_GRAD_OF else {
        GROUPED_MM_COMPILED: "grouped_mm"}.get(impl, impl)


def make_experts(case: Case, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Qwen3MoeExperts:
    config = Qwen3MoeConfig(
        hidden_size=case.hidden,
        moe_intermediate_size=case.inter,
        num_experts=case.experts,
        num_experts_per_tok=case.top_k,
    )
    experts = Qwen3MoeExperts(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    return experts


def make_routing(case: Case, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Router as Qwen3-MoE computes it; `skewed` biases 8 hot experts so they take most assignments."""
    router = torch.randn(case.experts, case.hidden, device=x.device, dtype=torch.float32) * 0.02
    logits = x.float() @ router.T
    if case.routing == "skewed":
        logits[:, :8] += 2.5
    probs = logits.softmax(-1)
    weights, index = probs.topk(case.top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
    hot_share = (index < 8).float().mean().item()
    return weights, index, hot_share


def extra_peak_gib(fn) -> float:
    """Peak device memory of ``fn()`` above what was allocated before it (0 without a GPU)."""
    if not torch.cuda.is_available():
        fn()
        return 0.0
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB


def run_case(case: Case, implementations: list[str], repeats: int, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Every implementation at one case; on a CPU (Triton interpreter, fp32) this is a smoke test, not a measurement."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    experts = make_experts(case, device, dtype)
    x = torch.randn(case.tokens, case.hidden, device=device, dtype=dtype, requires_grad=True)
    weights, index, hot_share = make_routing(case, x.detach())
    weights.requires_grad_(True)
    grad_out = torch.randn(case.tokens, case.hidden, device=device, dtype=dtype)
    params = (x, experts.gate_up_proj, experts.down_proj, weights)
    flops_fwd = 6 * case.tokens * case.top_k * case.hidden * case.inter
    rows, results = [], {}
    for impl in implementations:
        if impl == "eager" and not case.with_eager:
            continue
        use_implementation(experts, impl)
        module = torch.compile(experts) if impl == GROUPED_MM_COMPILED else experts

        def forward(module=module):
            return module(x, index, weights)

        def forward_backward():
            return torch.autograd.grad(forward(), params, grad_out)

        slow = impl == "eager"
        try:
            results[impl] = (forward().detach(), forward_backward())
        except Exception:  # one implementation failing at one shape is a finding, not the end of the run
            logger.exception("%s failed at %s, %d tokens, %s routing", impl, case.shape, case.tokens, case.routing)
            continue
        extra_gib = extra_peak_gib(forward_backward)
        fwd_ms = median_ms(forward, 1 if slow else 3, 3 if slow else repeats)
        fwd_bwd_ms = median_ms(forward_backward, 1 if slow else 3, 3 if slow else repeats)
        rows.append(
            {
                "shape": case.shape, "tokens": case.tokens, "routing": case.routing, "hot_share": hot_share,
                "impl": impl, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
                "fwd_tflops": flops_fwd / fwd_ms / 1e9, "fwd_bwd_tflops": 3 * flops_fwd / fwd_bwd_ms / 1e9,
                "extra_gib": extra_gib,
            }
        )
        logger.info("%s", rows[-1])
    reference_out, reference_grads = results["grouped_mm"]
    for row in rows:
        out, grads = results[row["impl"]]
        row["err_out"] = relative_error(out, reference_out)
        row["err_grads"] = max(relative_error(g, r) for g, r in zip(grads, reference_grads, strict=True))
        row["speedup_fwd"] = next(r["fwd_ms"] for r in rows if r["impl"] == "grouped_mm") / row["fwd_ms"]
        row["speedup_fwd_bwd"] = next(r["fwd_bwd_ms"] for r in rows if r["impl"] == "grouped_mm") / row["fwd_bwd_ms"]
    return rows


def profile_kernels(case: Case, impl: str) -> str:
    """Per-kernel CUDA time of one forward+backward of ``impl``, with TFLOP/s of each scattermoe matmul kernel."""
    device = torch.device("cuda")
    experts = make_experts(case, device)
    use_implementation(experts, impl)
    x = torch.randn(case.tokens, case.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    weights, index, _ = make_routing(case, x.detach())
    weights.requires_grad_(True)
    grad_out = torch.randn_like(x)
    params = (x, experts.gate_up_proj, experts.down_proj, weights)
    for _ in range(3):
        torch.autograd.grad(experts(x, index, weights), params, grad_out)
    torch.cuda.synchronize()
    steps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            torch.autograd.grad(experts(x, index, weights), params, grad_out)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) / steps * 1e3
    pair_gemm = 2 * case.tokens * case.top_k * case.hidden * case.inter
    flops = {
        "_gather_gate_up_swiglu_kernel": 2 * pair_gemm,
        "_scatter_matmul_kernel": 4 * pair_gemm,
        "_grouped_weight_grad_kernel": 3 * pair_gemm,
    }
    lines = [f"### {impl} kernels, {case.shape} {case.tokens} tokens {case.routing}", "",
             "| kernel | ms per step | TFLOP/s |", "|---|---|---|"]
    all_events = prof.key_averages()
    kernels_only = [e for e in all_events if e.device_type != torch.autograd.DeviceType.CPU]
    events = sorted(kernels_only, key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / steps / 1e3
    for event in events[:12]:
        ms = event.device_time_total / steps / 1e3
        rate = next((f / ms / 1e9 for name, f in flops.items() if name in event.key), None)
        lines.append(f"| {event.key[:60]} | {ms:.3f} | {'' if rate is None else f'{rate:.0f}'} |")
    lines.append(f"| total | {total:.3f} | {3 * pair_gemm / total / 1e9:.0f} |")
    lines += ["", f"Wall time per step with the profiler on: {wall_ms:.3f} ms. Host side:", "",
              kernel_table(all_events, on_gpu=False, rows=8, steps=steps)]
    return "\n".join(lines)


def autotuned_configs() -> str:
    """The config each autotuned kernel picked, per autotune key."""
    lines = ["### autotuned configs", ""]
    for name in dir(kernels):
        kernel = getattr(kernels, name)
        for key, config in getattr(kernel, "cache", {}).items():
            lines.append(f"- {name} {key[:4]}: {config}")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        (
            "| shape | tokens | routing (share of hot 8) | impl | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s "
            "| speedup fwd / fwd+bwd vs grouped_mm | extra peak GiB | bf16 rel. err out / grads vs grouped_mm |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['tokens']:,} | {r['routing']} ({r['hot_share']:.0%}) | {r['impl']} "
            f"| {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_tflops']:.0f} "
            f"| {r['speedup_fwd']:.2f}× / {r['speedup_fwd_bwd']:.2f}× | {r['extra_gib']:.2f} "
            f"| {r['err_out']:.1e} / {r['err_grads']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--implementations",
                        default=f"eager,grouped_mm,{GROUPED_MM_COMPILED},liger_fused_moe,scattermoe,"
                        f"{SCATTERMOE_WGRAD_TRITON},{SCATTERMOE_WGRAD_GROUPED_MM}")
    parser.add_argument("--cases", default="all", help="comma-separated indices into CASES, or 'all'")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile", default="2", help="comma-separated indices of the cases to profile ('' for none)")
    parser.add_argument("--profile_implementations", default=f"scattermoe,{SCATTERMOE_WGRAD_TRITON},grouped_mm")
    parser.add_argument("--out", default=None, help="write the table (markdown) and rows (json) here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    register_scattermoe()
    register_liger_fused_moe()
    cases = CASES if args.cases == "all" else [CASES[int(i)] for i in args.cases.split(",")]
    rows = []
    for case in cases:
        rows += run_case(case, args.implementations.split(","), args.repeats)
    report = f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n\n{markdown_table(rows)}"
    for index in filter(None, args.profile.split(",")):
        for impl in args.profile_implementations.split(","):
            report += "\n\n" + profile_kernels(CASES[int(index)], impl)
    report += "\n\n" + autotuned_configs()
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump(rows, f, indent=1)
    print(report)


if __name__ == "__main__":
    main()
