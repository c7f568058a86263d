"""Compile every ScatterMoE kernel, as the expert block launches it, for Hopper (sm_90), on a machine without a GPU.

Triton's interpreter runs the kernels' arithmetic but never their compiler: a kernel that is correct there can still
fail to compile (the compiler's typing of constexpr branches, descriptor layouts, register and shared-memory
limits). This drives the expert block's forward and backward on the CPU, in bf16 with TMA loads on, with LoRA on
both projections, and in fp32, replacing each launch by a compilation to a Hopper cubin (ptxas included) of the
kernel with the arguments and constexprs it was given, under each autotune config (``--configs first``: the first
of each kind in each list only). Nothing runs, so outputs are garbage; only the compilations count.

    TRITON_INTERPRET=0 python tools/compile_for_hopper.py [--configs first|all]

Prints one line per compilation and exits non-zero on the first that fails, when a kernel asked for TMA loads
has no TMA copy in its PTX (or one not asked for has one), or when a config asked for warp specialization was built
without it (Triton then quietly compiles the loop as usual).
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: the real compiler, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from monkey_patch.scattermoe import kernels, ops  # noqa: E402
from monkey_patch.scattermoe.compilable_ops import scattermoe_experts  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
         torch.int32: "i32", torch.float8_e4m3fn: "fp8e4nv"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def source(fn: triton.JITFunction, args: tuple, constexprs: dict) -> ASTSource:
    """The kernel as Triton's launcher would hand it to the compiler: pointer and integer types from ``args``."""
    signature, constants = {}, dict(constexprs)
    for name, value in zip(fn.arg_names, args, strict=False):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
        elif isinstance(value, int) and not isinstance(value, bool):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            constants[name] = value
    signature |= {name: "constexpr" for name in constants}
    return ASTSource(fn, signature, constants)


def autotune_configs(kernel: triton.runtime.Autotuner, which: str) -> list:
    """The configs the autotuner would time; for ``first``, the first one of each kind (the values of its flags
    such as WARP_SPECIALIZE and PERSISTENT)."""
    if which == "all":
        return kernel.configs

    def kind(config: triton.Config) -> tuple:
        return tuple((name, value) for name, value in config.kwargs.items() if not name.startswith("BLOCK_"))

    firsts = {kind(config): config for config in reversed(kernel.configs)}
    return [config for config in kernel.configs if config in firsts.values()]


def compile_only(which: str, compiled: list[str]):
    """A stand-in for ``kernels.launch`` that compiles instead of launching."""

    def launch(kernel, grid, args: tuple, constexprs: dict) -> None:
        autotuned = isinstance(kernel, triton.runtime.Autotuner)
        fn = kernel.fn if autotuned else kernel
        configs = autotune_configs(kernel, which) if autotuned else [None]
        for config in configs:
            meta = {**constexprs, **(config.kwargs if config else {})}
            options = {key: meta.pop(key) for key in LAUNCH_OPTIONS if key in meta}
            if config is not None:
                options |= {"num_warps": config.num_warps, "num_stages": config.num_stages}
            start = time.perf_counter()
            binary = triton.compile(source(fn, args, meta), target=HOPPER, options=options)
            flags = {k: v for k, v in constexprs.items() if k.endswith("TMA") or k.endswith("GATHERED")}
            uses_tma = "cp.async.bulk.tensor" in binary.asm["ptx"]
            if uses_tma != any(v for k, v in flags.items() if k.endswith("TMA")):
                raise AssertionError(f"{fn.__name__} {flags}: TMA copies in its PTX: {uses_tma}")
            specialized = "ttg.warp_specialize" in binary.asm["ttgir"]
            if specialized != bool(meta.get("WARP_SPECIALIZE")):
                raise AssertionError(f"{fn.__name__} {flags} {config.kwargs}: warp-specialized: {specialized}")
            line = (f"{fn.__name__} {flags} {config.kwargs if config else ''} {options}: "
                    f"{binary.metadata.shared} B shared, {time.perf_counter() - start:.1f} s")
            print(line, flush=True)
            compiled.append(line)

    return launch


def drive(dtype: torch.dtype, lora: bool) -> None:
    """One forward and backward of the expert block: every launcher the block uses at ``dtype``."""
    torch.manual_seed(0)
    tokens, hidden, inter, num_experts, top_k, rank = 64, 256, 128, 8, 2, 16
    x = torch.randn(tokens, hidden, dtype=dtype, requires_grad=True)
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden, dtype=dtype, requires_grad=True)
    w_down = torch.randn(num_experts, hidden, inter, dtype=dtype, requires_grad=True)
    weights, index = torch.randn(tokens, num_experts).softmax(-1).topk(top_k, -1)
    weights = weights.to(dtype).requires_grad_()
    low_rank = {}
    if lora:
        low_rank = {
            "gate_up_lora": ops.LowRank(torch.randn(num_experts, rank, hidden, dtype=dtype, requires_grad=True),
                                        torch.randn(num_experts, 2 * inter, rank, dtype=dtype, requires_grad=True),
                                        2.0),
            "down_lora": ops.LowRank(torch.randn(num_experts, rank, inter, dtype=dtype, requires_grad=True),
                                     torch.randn(num_experts, hidden, rank, dtype=dtype, requires_grad=True), 2.0),
        }
    scattermoe_experts(x, w_gate_up, w_down, weights, index, **low_rank).float().sum().backward()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", choices=("first", "all"), default="all")
    args = parser.parse_args(argv)
    compiled: list[str] = []
    kernels.launch = compile_only(args.configs, compiled)
    kernels._tma_wanted = lambda dtype, device: dtype != torch.float32  # as on an H200: TMA for bf16 only
    os.environ[ops.WEIGHT_GRAD_ENV] = "triton"  # the Triton weight-gradient kernel, not torch's grouped GEMM
    for dtype, lora in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False)):
        drive(dtype, lora)
    kernels.dequantize_rows(torch.randn(8, 64).to(torch.float8_e4m3fn), torch.rand(8, 1), torch.bfloat16)
    print(f"{len(compiled)} compilations for sm_90, all succeeded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
