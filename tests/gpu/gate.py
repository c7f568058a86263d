"""What the GPU gate's tests share: problems at the real models' shapes, the fp32 eager reference, transformers'
own bf16 ``grouped_mm`` as the yardstick of bf16 error, and a record of every comparison for the docs."""

import json
import os
from dataclasses import dataclass

import pytest
import torch
from torch.func import functional_call
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from monkey_patch.fast_moe import register_scattermoe
from tests.numerics import relative_error

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU gate: run `bash tests/gpu/run.sh` on a GPU")

# fp32 on the GPU: exact products ("ieee") against the fp32 eager reference, the CPU suite's bound.
FP32_TOLERANCE = 1e-4
# bf16: our error may exceed grouped_mm's on the same problem by this factor (rounding order, not a bug) ...
BF16_SLACK = 1.25
# ... and must stay under this whatever grouped_mm does: a wrong kernel lands far above it.
BF16_CEILING = 2e-2
RECORD_ENV = "TURBO_TUNE_GPU_GATE_RECORD"  # a JSON-lines file the runner turns into docs/results/gpu_gate.json


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int

    def config(self) -> Qwen3MoeConfig:
        return Qwen3MoeConfig(hidden_size=self.hidden, moe_intermediate_size=self.inter, num_experts=self.experts,
                              num_experts_per_tok=self.top_k, norm_topk_prob=True)


QWEN3_30B_A3B = Shape("30B-A3B", 2048, 768, 128, 8)
QWEN3_235B_A22B = Shape("235B-A22B", 4096, 1536, 128, 8)
RAGGED = Shape("ragged", 200, 104, 12, 3)  # no dimension a multiple of a tile, rows 16-byte aligned
UNALIGNED = Shape("unaligned", 196, 100, 12, 3)  # rows not 16-byte aligned: torch's grouped GEMM refuses them
SMALL = Shape("small-top8", 128, 96, 16, 8)  # the fp32 shape that took minutes to autotune (issue 20)


def routing(tokens: int, shape: Shape, kind: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Router-like (T, k) weights and expert ids. ``skewed``: four experts take most tokens and the last three
    none; ``balanced``: softmax of random logits."""
    logits = torch.randn(tokens, shape.experts, device="cuda", generator=generator)
    if kind == "skewed":
        logits[:, :4] += 4.0
        logits[:, -3:] = float("-inf")
    weights, index = logits.softmax(-1).topk(shape.top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), index


@dataclass
class Problem:
    """One experts call, in fp32 tensors holding bf16-representable values: a bf16 run sees exactly the inputs the
    fp32 reference does, so the comparison measures only the computation's error."""

    x: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    weights: torch.Tensor
    index: torch.Tensor
    grad_out: torch.Tensor

    @classmethod
    def make(cls, shape: Shape, tokens: int, kind: str, seed: int = 0) -> "Problem":
        generator = torch.Generator(device="cuda").manual_seed(seed)

        def randn(*size: int, std: float = 1.0) -> torch.Tensor:
            return (torch.randn(size, device="cuda", generator=generator) * std).to(torch.bfloat16).float()

        weights, index = routing(tokens, shape, kind, generator)
        weights = weights.to(torch.bfloat16).float()
        return cls(randn(tokens, shape.hidden), randn(shape.experts, 2 * shape.inter, shape.hidden, std=0.02),
                   randn(shape.experts, shape.hidden, shape.inter, std=0.02), weights, index,
                   randn(tokens, shape.hidden))


GRAD_NAMES = ("x", "gate_up_proj", "down_proj", "routing_weights")


def transformers_experts(shape: Shape, implementation: str) -> Qwen3MoeExperts:
    register_scattermoe()
    config = shape.config()
    config._experts_implementation = implementation
    return Qwen3MoeExperts(config).cuda()


def experts_outputs(problem: Problem, implementation: str, dtype: torch.dtype, shape: Shape,
                    prepare=None) -> dict[str, torch.Tensor]:
    """Output and gradients of x, both expert weights and the routing weights through transformers' experts module
    under ``implementation``, in ``dtype``. ``prepare`` may replace the inputs (non-contiguous views, ...)."""
    module = transformers_experts(shape, implementation)
    tensors = [t.to(dtype).requires_grad_() for t in (problem.x, problem.w_gate_up, problem.w_down, problem.weights)]
    inputs = prepare(*tensors) if prepare else tensors
    x, w_gate_up, w_down, weights = inputs
    out = functional_call(module, {"gate_up_proj": w_gate_up, "down_proj": w_down}, (x, problem.index, weights))
    grads = torch.autograd.grad(out, tensors, problem.grad_out.to(dtype))
    return {"out": out.detach(), **dict(zip(GRAD_NAMES, grads, strict=True))}


def record(**row) -> None:
    """Append one comparison to the gate's record (when the runner asks for one)."""
    path = os.environ.get(RECORD_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def yardstick(shape: Shape) -> str:
    """transformers' bf16 implementation to hold ours to: ``grouped_mm``, or ``eager`` where torch's grouped GEMM
    refuses the rows (not a multiple of 16 bytes)."""
    aligned = all(dim * 2 % 16 == 0 for dim in (shape.hidden, shape.inter))
    return "grouped_mm" if aligned else "eager"


def assert_as_close_as_grouped_mm(test: str, ours: dict, grouped_mm: dict, reference: dict) -> None:
    """Each of our bf16 results is within BF16_SLACK of transformers' bf16 ``grouped_mm``'s error against the same
    fp32 reference (``eager``'s, where ``grouped_mm`` cannot run: see ``yardstick``), and under BF16_CEILING."""
    failures = []
    for name, expected in reference.items():
        error, baseline = relative_error(ours[name], expected), relative_error(grouped_mm[name], expected)
        limit = min(max(BF16_SLACK * baseline, 1e-3), BF16_CEILING)
        record(test=test, tensor=name, dtype="bf16", error=error, grouped_mm_error=baseline, limit=limit)
        if error > limit:
            failures.append(f"{name}: {error:.2e} > {limit:.2e} (grouped_mm {baseline:.2e})")
    assert not failures, "; ".join(failures)


def assert_fp32_close(test: str, ours: dict, reference: dict) -> None:
    failures = []
    for name, expected in reference.items():
        error = relative_error(ours[name], expected)
        record(test=test, tensor=name, dtype="fp32", error=error, limit=FP32_TOLERANCE)
        if error > FP32_TOLERANCE:
            failures.append(f"{name}: {error:.2e} > {FP32_TOLERANCE:.0e}")
    assert not failures, "; ".join(failures)
