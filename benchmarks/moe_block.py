"""Time the Qwen3-MoE expert block: transformers `eager` and `grouped_mm`, `grouped_mm` under torch.compile (the
baseline that counts: what `--torch_compile` makes of the transformers default), Liger-Kernel's fused MoE (what
`--use_liger_kernel` alone runs the experts with), `scattermoe` (the default: dW_gate_up on torch's grouped GEMM,
dW_down on ScatterMoE's Triton kernel), `scattermoe_wgrad_triton` (both on the Triton kernel, the lowest peak) and
`scattermoe_wgrad_grouped_mm` (both on the grouped GEMM, a row copy beside both gradients), in one run; and,
where it is installed, `sonic_moe` (SonicMoE's CuTe-DSL kernels, the state of the art; see sonic_moe/stage.sh). The
`*_no_tma` names are the same without TMA loads (`TURBO_TUNE_MOE_TMA=0`: every tile through pointer loads), and
`*_no_persistent` without the persistent configs (`TURBO_TUNE_MOE_PERSISTENT=0`: a program per tile).

Two scopes: `experts` (the experts module alone, routing computed outside the timed region) and `block` (the whole
`Qwen3MoeSparseMoeBlock`, router included). Forward and forward+backward in bf16 (median of CUDA-event timings after
warm-up, each call on an empty GPU queue, so it pays its host dispatch), forward+backward "queued" (the mean of
calls issued back to back, the host's work hidden behind the GPU's as inside a model), TFLOP/s of the expert matmuls
(18 * tokens * top_k * H * I for forward+backward, 6 * ... for forward), extra peak memory of one forward+backward,
speed-ups against `grouped_mm` and `grouped_mm_compiled`, and each implementation's bf16 error (outputs, and the
worst gradient) against an fp32 eager reference of the same weights and routing. With --profile, a per-kernel
breakdown of scattermoe and grouped_mm at the chosen shapes. Prints a markdown table last; --out writes it, --json
the rows.

    python benchmarks/moe_block.py --out results.md --json results.json
"""

import argparse
import copy
import datetime
import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
import transformers
import triton
from common import fmt, kernel_table, median_ms, queued_ms, relative_error
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from monkey_patch.fast_moe import register_scattermoe
from monkey_patch.model_parts import register_experts_function
from monkey_patch.scattermoe import kernels
from monkey_patch.scattermoe.ops import WEIGHT_GRAD_ENV

logger = logging.getLogger("moe_block")
SCATTERMOE_WGRAD_TRITON = "scattermoe_wgrad_triton"
SCATTERMOE_WGRAD_GROUPED_MM = "scattermoe_wgrad_grouped_mm"
# scattermoe under each TURBO_TUNE_MOE_WEIGHT_GRAD backend (plain ``scattermoe``: the default, grouped_mm_gate_up),
# and with each of the kernels' default knobs turned off (TURNED_OFF)
WEIGHT_GRAD_OF = {"scattermoe": "grouped_mm_gate_up", SCATTERMOE_WGRAD_TRITON: "triton",
                  SCATTERMOE_WGRAD_GROUPED_MM: "grouped_mm"}
WEIGHT_GRAD_OF |= {f"{name}{suffix}": backend for name, backend in WEIGHT_GRAD_OF.items()
                   for suffix in ("_no_tma", "_no_persistent")}
TURNED_OFF = {"_no_tma": kernels.TMA_ENV, "_no_persistent": kernels.PERSISTENT_ENV}
GROUPED_MM_COMPILED = "grouped_mm_compiled"
BASELINES = ("grouped_mm", GROUPED_MM_COMPILED)
SCOPES = ("experts", "block")
HOT_EXPERTS = 8  # the experts skewed routing favours
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


def register_sonic_moe() -> None:
    """SonicMoE (Dao-AILab's CuTe-DSL kernels on quack-kernels, arXiv 2512.14080) as the experts implementation
    ``sonic_moe``, timed like the others: the state of the art issue 19 measures itself against. Not a Turbo-Tune
    dependency; where ``sonicmoe`` does not import, the implementation fails at its first call, naming
    benchmarks/sonic_moe/stage.sh, which stages it on a GPU machine."""
    # quack's autotuner precompiles in a pool of worker processes; on the lent H200 it waited forever for the first
    # worker's hand-shake, so compile in this process (first call per shape family: about a minute per GEMM kind).
    os.environ.setdefault("QUACK_COMPILE_WORKERS", "1")
    try:
        from sonicmoe import moe_general_routing_inputs
        from sonicmoe.enums import ActivationType
    except ImportError as error:
        missing = f"sonic_moe: {error}; stage it with benchmarks/sonic_moe/stage.sh"

        def sonic_moe_missing(module, hidden_states, top_k_index, top_k_weights):
            raise RuntimeError(missing)

        register_experts_function("sonic_moe", sonic_moe_missing)
        return

    def sonic_moe(module, hidden_states, top_k_index, top_k_weights):
        tokens, top_k = top_k_index.shape
        # its pairs in token order; weights (E, 2I, H) [gate; up] and (E, H, I) seen as (2I, H, E) and (H, I, E)
        token_indices = torch.arange(tokens, device=hidden_states.device, dtype=torch.int32).repeat_interleave(top_k)
        out, _ = moe_general_routing_inputs(
            hidden_states, top_k_weights.reshape(-1).float(), token_indices, top_k_index.reshape(-1).to(torch.int32),
            module.gate_up_proj.permute(1, 2, 0), None, module.down_proj.permute(1, 2, 0), None,
            module.gate_up_proj.shape[0], 0, ActivationType.SWIGLU,  # 0: a stream id this version ignores
            concat_layout=True,
        )
        return out.to(hidden_states.dtype)

    register_experts_function("sonic_moe", sonic_moe)


def use_implementation(block: Qwen3MoeSparseMoeBlock, impl: str) -> None:
    """Select ``impl``: the ``scattermoe_wgrad_*``, ``*_no_tma`` and ``*_no_persistent`` names are scattermoe
    under another weight-gradient backend, without TMA loads or persistent configs (``WEIGHT_GRAD_OF``);
    ``grouped_mm_compiled`` is ``grouped_mm`` (run_case compiles it)."""
    os.environ[WEIGHT_GRAD_ENV] = WEIGHT_GRAD_OF.get(impl, "grouped_mm")
    for suffix, env in TURNED_OFF.items():
        os.environ[env] = "0" if impl.endswith(suffix) else "1"
    block.experts.config._experts_implementation = "scattermoe" if impl in WEIGHT_GRAD_OF else {
        GROUPED_MM_COMPILED: "grouped_mm"}.get(impl, impl)


def make_block(case: Case, device: torch.device, dtype: torch.dtype = torch.bfloat16
               ) -> tuple[Qwen3MoeSparseMoeBlock, torch.Tensor]:
    """The sparse-MoE block (weights and router N(0, 0.02)) and its input (T, H). ``skewed``: every token shares a
    direction that the router rows of HOT_EXPERTS experts read, adding about 2.5 to their logits, so they take
    most assignments."""
    config = Qwen3MoeConfig(hidden_size=case.hidden, moe_intermediate_size=case.inter, num_experts=case.experts,
                            num_experts_per_tok=case.top_k, norm_topk_prob=True)
    block = Qwen3MoeSparseMoeBlock(config).to(device=device, dtype=dtype)
    x = torch.randn(case.tokens, case.hidden, device=device)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.02)
        if case.routing == "skewed":
            hot = torch.randn(case.hidden, device=device)
            hot *= 4 / hot.norm()
            x += hot
            block.gate.weight[:HOT_EXPERTS] += (2.5 * hot / hot.norm() ** 2).to(dtype)
    return block, x.to(dtype)


def router_with_choice(gate, choice: torch.Tensor, hidden: torch.Tensor):
    """Qwen3-MoE's router in full precision, taking the experts ``choice`` a bf16 router made: for an fp32 reference
    of a bf16 block, a near-tie decided the other way would swap a token's expert, an error of the router's
    precision, not of the experts."""
    logits = torch.nn.functional.linear(hidden.reshape(-1, gate.hidden_dim), gate.weight)
    weights = logits.softmax(-1, dtype=torch.float).gather(1, choice)
    if gate.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return logits, weights.to(logits.dtype), choice


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


class Problem:
    """One case at one scope: the block, the tensors it differentiates, and a forward for any module standing in
    for the block (the block itself, a compiled block, a float copy)."""

    def __init__(self, case: Case, scope: str, device: torch.device, dtype: torch.dtype) -> None:
        torch.manual_seed(0)
        self.case, self.scope = case, scope
        self.block, x = make_block(case, device, dtype)
        self.x = x.requires_grad_()
        with torch.no_grad():
            _, weights, self.index = self.block.gate(x)
        self.weights = weights.requires_grad_()
        self.hot_share = (self.index < HOT_EXPERTS).float().mean().item()
        self.grad_out = torch.randn_like(x)

    def params(self, block: Qwen3MoeSparseMoeBlock, x: torch.Tensor, weights: torch.Tensor) -> tuple:
        experts = (block.experts.gate_up_proj, block.experts.down_proj)
        return (x, *experts, weights) if self.scope == "experts" else (x, block.gate.weight, *experts)

    def run(self, module, block: Qwen3MoeSparseMoeBlock, x: torch.Tensor, weights: torch.Tensor, backward: bool):
        """Output (forward) or output and gradients (forward + backward) of ``module`` standing in for ``block``."""
        if self.scope == "experts":
            out = module(x, self.index, weights)
        else:
            out = module(x.view(1, *x.shape)).view(x.shape)
        if not backward:
            return out
        return out, torch.autograd.grad(out, self.params(block, x, weights), self.grad_out.to(out.dtype))

    def module(self, impl: str):
        use_implementation(self.block, impl)
        target = self.block.experts if self.scope == "experts" else self.block
        return torch.compile(target) if impl == GROUPED_MM_COMPILED else target

    def reference(self) -> tuple[torch.Tensor, tuple]:
        """Output and gradients of an fp32 eager copy, on the same weights and routing (block scope: the bf16
        router's choice of experts)."""
        block = copy.deepcopy(self.block).float()
        block.experts.config = copy.copy(block.experts.config)
        block.experts.config._experts_implementation = "eager"
        block.gate.forward = functools.partial(router_with_choice, block.gate, self.index)
        x = self.x.detach().float().requires_grad_()
        weights = self.weights.detach().float().requires_grad_()
        module = block.experts if self.scope == "experts" else block
        return self.run(module, block, x, weights, backward=True)


def run_case(case: Case, implementations: list[str], repeats: int, dtype: torch.dtype = torch.bfloat16,
             scope: str = "experts") -> list[dict]:
    """Every implementation at one case and scope; on a CPU (Triton interpreter, fp32) a smoke test, not a
    measurement."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = Problem(case, scope, device, dtype)
    reference_out, reference_grads = problem.reference()
    flops_fwd = 3 * pair_flops(case)
    rows = []
    for impl in implementations:
        if impl == "eager" and not case.with_eager:
            continue
        module = problem.module(impl)

        def forward(module=module):
            return problem.run(module, problem.block, problem.x, problem.weights, backward=False)

        def forward_backward(module=module):
            return problem.run(module, problem.block, problem.x, problem.weights, backward=True)

        slow = impl == "eager"
        try:
            out, grads = forward_backward()
        except Exception:  # one implementation failing at one shape is a finding, not the end of the run
            logger.exception("%s failed at %s, %d tokens, %s routing, %s", impl, case.shape, case.tokens,
                             case.routing, scope)
            continue
        extra_gib = extra_peak_gib(forward_backward)
        fwd_ms = median_ms(forward, 1 if slow else 3, 3 if slow else repeats)
        fwd_bwd_ms = median_ms(forward_backward, 1 if slow else 3, 3 if slow else repeats)
        fwd_bwd_queued_ms = queued_ms(forward_backward, 0, 3 if slow else repeats)
        rows.append({
            "shape": case.shape, "tokens": case.tokens, "routing": case.routing, "scope": scope,
            "hot_share": problem.hot_share, "impl": impl, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
            "fwd_bwd_queued_ms": fwd_bwd_queued_ms,
            "fwd_tflops": flops_fwd / fwd_ms / 1e9, "tflops": 3 * flops_fwd / fwd_bwd_ms / 1e9,
            "extra_peak_gib": extra_gib, "err_out": relative_error(out, reference_out),
            "err_grads": max(relative_error(g, r) for g, r in zip(grads, reference_grads, strict=True)),
        })
        logger.info("%s", rows[-1])
    baselines = {row["impl"]: row for row in rows if row["impl"] in BASELINES}
    for row in rows:
        for name, base in baselines.items():
            row[f"speedup_vs_{name}"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
            row[f"speedup_fwd_vs_{name}"] = base["fwd_ms"] / row["fwd_ms"]
            row[f"speedup_queued_vs_{name}"] = base["fwd_bwd_queued_ms"] / row["fwd_bwd_queued_ms"]
        base = baselines.get("grouped_mm")
        if base and base["err_out"] and base["err_grads"]:  # the bar: no worse than transformers' own bf16 experts
            row["err_vs_grouped_mm"] = max(row["err_out"] / base["err_out"], row["err_grads"] / base["err_grads"])
    return rows


@functools.cache
def dense_ceiling_tflops(size: int = 8192) -> float:
    """bf16 TFLOP/s of one dense size³ matmul on this GPU, measured now: the ceiling the kernels are held to."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    return 2 * size**3 / median_ms(lambda: a @ b, 3, 10) / 1e9


@functools.cache
def copy_bandwidth_gbps(size_gib: int = 2) -> float:
    """GB/s of a device-to-device copy (read + write) of ``size_gib`` GiB: the ceiling of the memory-bound passes."""
    source = torch.empty(size_gib * GIB, device="cuda", dtype=torch.uint8)
    target = torch.empty_like(source)
    return 2 * source.numel() / median_ms(lambda: target.copy_(source), 3, 10) / 1e6


def pair_flops(case: Case) -> int:
    """FLOPs of one (T*k, I) x (I, H) product: the down projection; gate/up is twice it, forward+backward 9 times."""
    return 2 * case.tokens * case.top_k * case.hidden * case.inter


def matmul_flops(case: Case, impl: str) -> dict[str, int]:
    """FLOPs per step of each matmul kernel of ``impl``, by a substring of its name: the Triton weight-gradient
    kernel computes dW_down alone when torch's grouped GEMM (CUTLASS) computes dW_gate_up."""
    if impl not in WEIGHT_GRAD_OF:
        return {}
    flops = {"_gather_gate_up_swiglu_kernel": 2 * pair_flops(case), "_scatter_matmul_kernel": 4 * pair_flops(case)}
    backend = WEIGHT_GRAD_OF[impl]
    if backend == "triton":
        flops["_grouped_weight_grad_kernel"] = 3 * pair_flops(case)
    elif backend == "grouped_mm_gate_up":
        flops |= {"_grouped_weight_grad_kernel": pair_flops(case), "cutlass": 2 * pair_flops(case)}
    else:
        flops["cutlass"] = 3 * pair_flops(case)
    return flops


def memory_bytes(case: Case, impl: str) -> dict[str, int]:
    """Bytes each memory-bound pass of ``impl`` reads and writes per step (bf16), by a substring of its kernel name:
    the SwiGLU backward (gradient of h and the pre-activations in, their gradients and h out), the two top-k
    combines (forward output and input gradient) and, with torch's grouped GEMM for a weight gradient, the copy of
    the routed rows it reads (``gather_token_rows``: one for dW_gate_up, a second for dW_down)."""
    if impl not in WEIGHT_GRAD_OF:
        return {}
    rows = case.tokens * case.top_k
    element = 2
    moved = {"_swiglu_backward_kernel": element * rows * 6 * case.inter,
             "_sum_top_k_kernel": 2 * element * (rows + case.tokens) * case.hidden}
    copies = {"triton": 0, "grouped_mm_gate_up": 1, "grouped_mm": 2}[WEIGHT_GRAD_OF[impl]]
    if copies:
        moved["_gather_token_rows_kernel"] = copies * 2 * element * rows * case.hidden
    return moved


def profile_kernels(case: Case, impl: str, scope: str = "experts") -> str:
    """Per-kernel CUDA time of one forward+backward of ``impl``: each scattermoe matmul kernel's TFLOP/s and share of
    the dense bf16 ceiling, each memory-bound pass's bytes, GB/s and share of a device copy's bandwidth, both
    ceilings measured in the same run."""
    problem = Problem(case, scope, torch.device("cuda"), torch.bfloat16)
    module = problem.module(impl)

    def step():
        problem.run(module, problem.block, problem.x, problem.weights, backward=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    steps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) / steps * 1e3
    ceiling, bandwidth = dense_ceiling_tflops(), copy_bandwidth_gbps()
    flops, moved = matmul_flops(case, impl), memory_bytes(case, impl)
    lines = [f"### {impl} kernels, {case.shape} {case.tokens} tokens {case.routing}, {scope}", "",
             f"Ceilings in this run: dense bf16 (8192³ matmul) {ceiling:.0f} TFLOP/s, device copy "
             f"{bandwidth:.0f} GB/s.",
             "", "| kernel | ms per step | TFLOP/s | share of the ceiling | GB moved | GB/s | share of the copy's |",
             "|---|---|---|---|---|---|---|"]
    all_events = prof.key_averages()
    kernels_only = [e for e in all_events if e.device_type != torch.autograd.DeviceType.CPU]
    events = sorted(kernels_only, key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / steps / 1e3
    for event in events[:12]:
        ms = event.device_time_total / steps / 1e3
        rate = next((f / ms / 1e9 for name, f in flops.items() if name in event.key), None)
        size = next((b for name, b in moved.items() if name in event.key), None)
        cells = ["", ""] if rate is None else [f"{rate:.0f}", f"{rate / ceiling:.0%}"]
        cells += ["", "", ""] if size is None else [f"{size / 1e9:.2f}", f"{size / ms / 1e6:.0f}",
                                                      f"{size / ms / 1e6 / bandwidth:.0%}"]
        lines.append(f"| {event.key[:60]} | {ms:.3f} | {' | '.join(cells)} |")
    rate = 9 * pair_flops(case) / total / 1e9
    lines.append(f"| total | {total:.3f} | {rate:.0f} | {rate / ceiling:.0%} | | | |")
    lines += ["", f"Wall time per step with the profiler on: {wall_ms:.3f} ms. Host side:", "",
              kernel_table(all_events, on_gpu=False, rows=8, steps=steps)]
    return "\n".join(lines)


def autotuned_configs() -> str:
    """The config each autotuned kernel picked, per autotune key (fp32's twins included)."""
    lines = ["### autotuned configs", ""]
    tuners = {name: getattr(kernels, name) for name in dir(kernels)}
    tuners |= {f"{tuner.fn.__name__} (fp32)": tuner for tuner in kernels._FP32_TWINS.values()}
    tuners |= {f"{name} (persistent configs offered)": tuner for name, tuner in kernels.PERSISTENT_TWINS.items()}
    for name, tuner in tuners.items():
        if isinstance(tuner, triton.runtime.Autotuner):
            lines += [f"- {name} {key[:4]}: {config}" for key, config in tuner.cache.items()]
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        ("| scope | shape | tokens | routing (share of hot 8) | impl | fwd ms | fwd+bwd ms | fwd+bwd queued ms "
         "| fwd+bwd TFLOP/s | vs grouped_mm / vs compiled (fwd+bwd) | vs compiled, queued | extra peak GiB "
         "| bf16 rel. err out / grads vs fp32 | err vs grouped_mm's |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedups = " / ".join(fmt(r.get(f"speedup_vs_{name}"), ".2f") + "×" for name in BASELINES)
        lines.append(
            f"| {r['scope']} | {r['shape']} | {r['tokens']:,} | {r['routing']} ({r['hot_share']:.0%}) | {r['impl']} "
            f"| {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_queued_ms']:.2f} | {r['tflops']:.0f} "
            f"| {speedups} | {fmt(r.get(f'speedup_queued_vs_{GROUPED_MM_COMPILED}'), '.2f')}× "
            f"| {r['extra_peak_gib']:.2f} | {r['err_out']:.1e} / {r['err_grads']:.1e} "
            f"| {fmt(r.get('err_vs_grouped_mm'), '.2f')} |"
        )
    return "\n".join(lines)


def stack() -> dict[str, str]:
    return {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--implementations",
                        default=f"eager,grouped_mm,{GROUPED_MM_COMPILED},liger_fused_moe,scattermoe,"
                        f"{SCATTERMOE_WGRAD_TRITON},{SCATTERMOE_WGRAD_GROUPED_MM}")
    parser.add_argument("--cases", default="all", help="comma-separated indices into CASES, or 'all'")
    parser.add_argument("--scopes", default=",".join(SCOPES), help="experts, block or both (comma-separated)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile", default="2", help="comma-separated indices of the cases to profile ('' for none)")
    parser.add_argument("--profile_implementations", default=f"scattermoe,{SCATTERMOE_WGRAD_TRITON},grouped_mm")
    parser.add_argument("--out", default=None, help="write the report (markdown) here")
    parser.add_argument("--json", default=None, help="write the rows, with device, stack, date and command, here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    register_scattermoe()
    register_liger_fused_moe()
    register_sonic_moe()
    cases = CASES if args.cases == "all" else [CASES[int(i)] for i in args.cases.split(",")]
    rows = []
    for scope in args.scopes.split(","):
        for case in cases:
            rows += run_case(case, args.implementations.split(","), args.repeats, scope=scope)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)"
    report = f"{device}, torch {torch.__version__}\n\n{markdown_table(rows)}"
    for index in filter(None, args.profile.split(",")):
        for impl in args.profile_implementations.split(","):
            report += "\n\n" + profile_kernels(CASES[int(index)], impl)
    report += "\n\n" + autotuned_configs()
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "stack": stack(), "date": datetime.date.today().isoformat(),
                       "command": " ".join(["python3 benchmarks/moe_block.py", *(argv or sys.argv[1:])]),
                       "rows": rows}, f, indent=1)
    print(report)
    return rows


if __name__ == "__main__":
    main()
