"""The ScatterMoE expert kernels on a GPU, in bf16 and fp32, against an fp32 eager reference of the same inputs.

bf16 is held to transformers' own bf16 ``grouped_mm`` on the same problem (gate.assert_as_close_as_grouped_mm); fp32
to 1e-4. Triton's CPU interpreter cannot check either (its bf16 ``tl.dot`` is garbage, and it never takes the
compiled launch path), so this is where the production path is asserted."""

import functools
import sys
from pathlib import Path

import pytest
import torch
from gate import (
    GRAD_NAMES,
    QWEN3_30B_A3B,
    QWEN3_235B_A22B,
    RAGGED,
    SMALL,
    UNALIGNED,
    Problem,
    Shape,
    assert_as_close_as_grouped_mm,
    assert_fp32_close,
    experts_outputs,
    needs_cuda,
    relative_error,
    transformers_experts,
    yardstick,
)
from torch.func import functional_call
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
from triton.runtime.errors import OutOfResources

from monkey_patch.fast_moe import register_scattermoe
from monkey_patch.frozen_experts import quantize_rowwise
from monkey_patch.scattermoe import kernels, launch
from monkey_patch.scattermoe.compilable_ops import scattermoe_experts
from monkey_patch.scattermoe.ops import WEIGHT_GRAD_BACKENDS, WEIGHT_GRAD_ENV, LowRank, compute_routing

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from moe_block import router_with_choice  # noqa: E402

pytestmark = needs_cuda
BF16 = torch.bfloat16


@functools.cache
def bf16_baseline(shape: Shape, tokens: int, kind: str) -> tuple[Problem, dict, dict]:
    """The problem, its fp32 eager reference, and transformers' bf16 grouped_mm (eager where it cannot run)."""
    problem = Problem.make(shape, tokens, kind)
    reference = experts_outputs(problem, "eager", torch.float32, shape)
    return problem, reference, experts_outputs(problem, yardstick(shape), BF16, shape)


BF16_CASES = [
    pytest.param(QWEN3_30B_A3B, 4096, "balanced", id="30B-A3B-4096-balanced"),
    pytest.param(QWEN3_30B_A3B, 4096, "skewed", id="30B-A3B-4096-skewed-empty-experts"),
    pytest.param(QWEN3_235B_A22B, 2048, "balanced", id="235B-A22B-2048-balanced"),
    pytest.param(RAGGED, 1003, "skewed", id="ragged-1003-skewed"),
    pytest.param(UNALIGNED, 1003, "skewed", id="unaligned-1003-skewed"),
]


@pytest.mark.parametrize("weight_grad", WEIGHT_GRAD_BACKENDS)
@pytest.mark.parametrize("shape,tokens,kind", BF16_CASES)
def test_bf16_experts_are_as_close_to_fp32_as_grouped_mm(shape, tokens, kind, weight_grad, monkeypatch):
    monkeypatch.setenv(WEIGHT_GRAD_ENV, weight_grad)
    problem, reference, grouped_mm = bf16_baseline(shape, tokens, kind)
    ours = experts_outputs(problem, "scattermoe", BF16, shape)
    assert_as_close_as_grouped_mm(f"experts {shape.name} {tokens} {kind} wgrad={weight_grad}", ours, grouped_mm,
                                  reference)


@pytest.mark.parametrize("shape,tokens,kind", [
    pytest.param(SMALL, 257, "balanced", id="small-top8-257"),
    pytest.param(UNALIGNED, 1003, "skewed", id="unaligned-1003-skewed"),
    pytest.param(QWEN3_30B_A3B, 1024, "skewed", id="30B-A3B-1024-skewed"),
])
def test_fp32_experts_match_the_fp32_reference(shape, tokens, kind):
    problem = Problem.make(shape, tokens, kind)
    reference = experts_outputs(problem, "eager", torch.float32, shape)
    assert_fp32_close(f"experts fp32 {shape.name} {tokens} {kind}",
                      experts_outputs(problem, "scattermoe", torch.float32, shape), reference)


def strided_inputs(x, w_gate_up, w_down, weights):
    """Differentiable views with odd layouts of the same values: x one element past a 16-byte boundary with a row
    stride of 2H + 1; the weights transposed views of (E, in, out) storage; routing weights every other column."""
    tokens, hidden = x.shape
    stride = 2 * hidden + 1
    x_view = torch.empty(tokens * stride + 1, device=x.device, dtype=x.dtype).as_strided(
        (tokens, hidden), (stride, 1), storage_offset=1)
    x_view = x_view.copy_(x)  # in-place on a view of a non-leaf: autograd routes the gradient back to x
    assert not x_view.is_contiguous() and x_view.data_ptr() % 16 != 0
    w_gate_up_t = w_gate_up.transpose(1, 2).contiguous().transpose(1, 2)
    w_down_t = w_down.transpose(1, 2).contiguous().transpose(1, 2)
    assert not w_gate_up_t.is_contiguous() and not w_down_t.is_contiguous()
    weights_view = torch.stack([weights, torch.zeros_like(weights)], dim=-1).flatten(1)[:, ::2]
    assert not weights_view.is_contiguous()
    return x_view, w_gate_up_t, w_down_t, weights_view


def test_strided_misaligned_and_transposed_inputs_give_the_contiguous_results():
    problem, reference, grouped_mm = bf16_baseline(QWEN3_30B_A3B, 4096, "skewed")
    ours = experts_outputs(problem, "scattermoe", BF16, QWEN3_30B_A3B, prepare=strided_inputs)
    assert_as_close_as_grouped_mm("experts strided/misaligned/transposed 30B-A3B 4096", ours, grouped_mm, reference)


@pytest.mark.parametrize("name", ["_gather_gate_up_swiglu_kernel", "_scatter_matmul_kernel",
                                  "_grouped_weight_grad_kernel", "_swiglu_backward_kernel"])
def test_every_config_of_each_autotuned_kernel_is_as_close_as_grouped_mm(name, monkeypatch):
    """The autotuner keeps whichever config is fastest on the GPU and shape at hand, so each must be right, the
    persistent ones included: each config in turn runs every launch its autotuner serves (the weight-gradient
    kernel's: both weight gradients). A config needing more shared memory than a block may have is skipped, as the
    autotuner skips it."""
    monkeypatch.setenv(kernels.PERSISTENT_ENV, "1")
    monkeypatch.setenv(WEIGHT_GRAD_ENV, "triton")
    monkeypatch.setattr(launch, "enabled", False)  # Triton's own path, which reads the configs on every launch
    tuner = kernels._autotuner(getattr(kernels, name), BF16)
    problem, reference, grouped_mm = bf16_baseline(QWEN3_30B_A3B, 4096, "skewed")
    configs, ran = tuner.configs, []
    for config in configs:
        monkeypatch.setattr(tuner, "configs", [config])
        try:
            ours = experts_outputs(problem, "scattermoe", BF16, QWEN3_30B_A3B)
        except OutOfResources:
            continue
        assert_as_close_as_grouped_mm(f"experts 30B-A3B 4096 skewed, {name} {config}", ours, grouped_mm, reference)
        ran.append(config)
    assert len(ran) >= len(configs) - 2, ran


@pytest.mark.parametrize("weight_grad", ["grouped_mm_gate_up", "triton"])
def test_gathered_rows_past_two_to_the_31_elements(weight_grad, monkeypatch):
    """135,000 tokens × top-8 × H 2048: the routed rows hold 2.2e9 elements, so every offset must be 64-bit."""
    monkeypatch.setenv(WEIGHT_GRAD_ENV, weight_grad)
    tokens = 135_000
    assert tokens * QWEN3_30B_A3B.top_k * QWEN3_30B_A3B.hidden > 2**31
    problem, reference, grouped_mm = bf16_baseline(QWEN3_30B_A3B, tokens, "balanced")
    ours = experts_outputs(problem, "scattermoe", BF16, QWEN3_30B_A3B)
    assert_as_close_as_grouped_mm(f"experts 30B-A3B {tokens} (>2^31 gathered) wgrad={weight_grad}", ours,
                                  grouped_mm, reference)


def lora_problem(shape: Shape, tokens: int, rank: int = 16, scale: float = 2.0):
    problem = Problem.make(shape, tokens, "skewed", seed=1)
    generator = torch.Generator(device="cuda").manual_seed(2)

    def factor(*size: int) -> torch.Tensor:
        return (torch.randn(size, device="cuda", generator=generator) * 0.02).to(BF16).float()

    e, h, i = shape.experts, shape.hidden, shape.inter
    factors = (factor(e, rank, h), factor(e, 2 * i, rank), factor(e, rank, i), factor(e, h, rank))
    return problem, factors, scale


def lora_outputs(problem: Problem, factors, scale: float, dtype: torch.dtype, implementation: str, shape: Shape,
                 fp8: bool = False) -> dict[str, torch.Tensor]:
    """Frozen experts with LoRA on both projections: scattermoe takes the factors apart (and, with ``fp8``, the
    weights as FP8 with row scales); other implementations run peft's fold W + s·B·A, in ``dtype``."""
    w_gate_up, w_down = problem.w_gate_up, problem.w_down
    scales = (None, None)
    if fp8:
        (w_gate_up, s_gu), (w_down, s_d) = quantize_rowwise(w_gate_up), quantize_rowwise(w_down)
        scales = (s_gu, s_d)
        if implementation != "scattermoe":  # the others see the dequantized weights the kernels compute with
            w_gate_up, w_down = (w_gate_up.float() * s_gu).to(dtype), (w_down.float() * s_d).to(dtype)
    x = problem.x.to(dtype).requires_grad_()
    weights = problem.weights.to(dtype).requires_grad_()
    a_gu, b_gu, a_d, b_d = (f.to(dtype).requires_grad_() for f in factors)
    if implementation == "scattermoe":
        ws = (w_gate_up, w_down) if fp8 else (w_gate_up.to(dtype), w_down.to(dtype))
        out = scattermoe_experts(x, *ws, weights, problem.index, LowRank(a_gu, b_gu, scale), LowRank(a_d, b_d, scale),
                                 *scales)
    else:
        folded = {"gate_up_proj": w_gate_up.to(dtype) + scale * b_gu @ a_gu,
                  "down_proj": w_down.to(dtype) + scale * b_d @ a_d}
        out = functional_call(transformers_experts(shape, implementation), folded, (x, problem.index, weights))
    inputs = (x, weights, a_gu, b_gu, a_d, b_d)
    grads = torch.autograd.grad(out, inputs, problem.grad_out.to(dtype))
    names = ("x", "routing_weights", "lora_A_gate_up", "lora_B_gate_up", "lora_A_down", "lora_B_down")
    return {"out": out.detach(), **dict(zip(names, grads, strict=True))}


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-experts", "fp8-frozen-experts"])
@pytest.mark.parametrize("shape,tokens", [(QWEN3_30B_A3B, 4096), (RAGGED, 1003)], ids=["30B-A3B", "ragged"])
def test_lora_factors_are_as_close_as_peft_fold_on_grouped_mm(shape, tokens, fp8):
    problem, factors, scale = lora_problem(shape, tokens)
    reference = lora_outputs(problem, factors, scale, torch.float32, "eager", shape, fp8=fp8)
    grouped_mm = lora_outputs(problem, factors, scale, BF16, "grouped_mm", shape, fp8=fp8)
    ours = lora_outputs(problem, factors, scale, BF16, "scattermoe", shape, fp8=fp8)
    assert_as_close_as_grouped_mm(f"lora {'fp8 ' if fp8 else ''}{shape.name} {tokens}", ours, grouped_mm, reference)


def test_fp32_lora_matches_the_fp32_fold():
    problem, factors, scale = lora_problem(RAGGED, 1003)
    reference = lora_outputs(problem, factors, scale, torch.float32, "eager", RAGGED)
    assert_fp32_close("lora fp32 ragged 1003", lora_outputs(problem, factors, scale, torch.float32, "scattermoe",
                                                            RAGGED), reference)


def block_outputs(block: Qwen3MoeSparseMoeBlock, hidden: torch.Tensor, grad_out: torch.Tensor, compiled=False):
    """The whole sparse-MoE block (router included): output and gradients of the input, router and both expert
    weights."""
    hidden = hidden.clone().requires_grad_()
    run = torch.compile(block, fullgraph=True) if compiled else block
    out = run(hidden)
    params = (hidden, block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj)
    grads = torch.autograd.grad(out, params, grad_out)
    return {"out": out.detach(), **dict(zip(("x", "router", "gate_up_proj", "down_proj"), grads, strict=True))}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-block", "torch.compile-block"])
@pytest.mark.parametrize("shape,tokens", [(QWEN3_30B_A3B, 8192), (QWEN3_235B_A22B, 2048)], ids=["30B-A3B", "235B"])
def test_whole_block_with_router_is_as_close_as_grouped_mm(shape, tokens, compiled):
    """Router included: its gradient comes through the routing weights. Both bf16 implementations route with the
    same bf16 router; the fp32 reference takes that router's choice of experts (router_with_choice)."""
    register_scattermoe()
    torch.manual_seed(0)
    config = shape.config()
    block = Qwen3MoeSparseMoeBlock(config).cuda()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    hidden = torch.randn(2, tokens // 2, shape.hidden, device="cuda")
    grad_out = torch.randn_like(hidden)

    def run(implementation: str, dtype: torch.dtype, compile_it: bool = False, choice=None) -> dict:
        copy = Qwen3MoeSparseMoeBlock(config).cuda().to(dtype)
        copy.load_state_dict({k: v.to(dtype) for k, v in block.state_dict().items()})
        copy.experts.config._experts_implementation = implementation
        if choice is not None:
            copy.gate.forward = functools.partial(router_with_choice, copy.gate, choice)
        return block_outputs(copy, hidden.to(dtype), grad_out.to(dtype), compile_it)

    with torch.no_grad():  # the reference sees the bf16-rounded weights and inputs
        for p in block.parameters():
            p.copy_(p.to(BF16).float())
        hidden, grad_out = hidden.to(BF16).float(), grad_out.to(BF16).float()
        _, _, bf16_choice = block.to(BF16).gate(hidden.to(BF16).view(-1, shape.hidden))
        block.float()
    reference = run("eager", torch.float32, choice=bf16_choice)
    ours = run("scattermoe", BF16, compiled)
    assert_as_close_as_grouped_mm(f"block {'compiled ' if compiled else ''}{shape.name} {tokens}", ours,
                                  run("grouped_mm", BF16), reference)
    if compiled:
        eager = run("scattermoe", BF16)
        assert relative_error(ours["out"], eager["out"]) < 1e-2


def test_launch_cache_runs_exactly_what_tritons_own_launch_runs():
    """Output and six gradients of a LoRA expert block, bit for bit, on the cache's first (miss) and later (hit)
    calls against Triton's path, aligned and misaligned inputs, at three token counts."""
    import launch_overhead

    assert launch.cache_supported(), "this Triton is not one the cache was tested with"
    block = launch_overhead.Block("full", "cuda", BF16)
    rows = launch_overhead.check_exact(block, [4096, 1000, 37])
    assert launch._COMPILED, "the cache was never filled"
    assert all(row["miss_exact"] and row["hit_exact"] for row in rows), rows


def test_fp32_weights_under_bf16_autocast_run_exactly_the_bf16_computation():
    """Full-parameter training keeps fp32 master weights and computes under bf16 autocast: the experts must then do
    what they do with bf16 weights, bit for bit, and hand fp32 gradients to the fp32 weights."""
    problem = Problem.make(QWEN3_30B_A3B, 4096, "skewed")
    bf16 = experts_outputs(problem, "scattermoe", BF16, QWEN3_30B_A3B)
    with torch.autocast("cuda", dtype=BF16):
        autocast = experts_outputs(problem, "scattermoe", torch.float32, QWEN3_30B_A3B)
    assert autocast["gate_up_proj"].dtype == torch.float32 and autocast["down_proj"].dtype == torch.float32
    for name, expected in bf16.items():
        assert torch.equal(autocast[name].to(expected.dtype), expected), name


@pytest.mark.parametrize("shape,tokens", [(QWEN3_30B_A3B, 32768), (QWEN3_235B_A22B, 16384), (UNALIGNED, 1003)],
                         ids=["30B-A3B-32768", "235B-A22B-16384", "unaligned-1003"])
def test_token_rows_gathered_for_the_grouped_gemm_are_index_selects_exact_copy(shape, tokens):
    problem = Problem.make(shape, tokens, "skewed")
    sorted_pairs, expert_ends = compute_routing(problem.index, shape.experts)
    routing = kernels.Routing.of(sorted_pairs, expert_ends, shape.top_k)
    x = problem.x.to(BF16)
    assert torch.equal(kernels.gather_token_rows(x, routing), x.index_select(0, sorted_pairs // shape.top_k))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
def test_a_checkpointed_layer_end_gives_the_uncheckpointed_gradients_bit_for_bit(compiled):
    """`x + experts(x)` as a Qwen3-MoE layer ends, checkpointed as qwen3_sft.py does (the compiled body inside the
    checkpoint): the recompute skips the down projection, and no gradient changes by a bit."""
    problem = Problem.make(QWEN3_30B_A3B, 4096, "skewed")

    def layer_end(x, w_gate_up, w_down, weights):
        return x + scattermoe_experts(x, w_gate_up, w_down, weights, problem.index, skip_recomputed_output=True)

    body = torch.compile(layer_end, fullgraph=True) if compiled else layer_end
    grads = []
    for checkpointed in (False, True):
        leaves = [t.to(BF16).requires_grad_() for t in (problem.x, problem.w_gate_up, problem.w_down, problem.weights)]
        out = torch.utils.checkpoint.checkpoint(body, *leaves, use_reentrant=False) if checkpointed else body(*leaves)
        grads.append(torch.autograd.grad(out, leaves, problem.grad_out.to(BF16)))
    for name, plain, checkpointed in zip(GRAD_NAMES, *grads, strict=True):
        assert torch.equal(plain, checkpointed), name
