"""Compile every ScatterMoE kernel, as the expert block launches it, for Hopper (sm_90), on a machine without a GPU.

Triton's interpreter runs the kernels' arithmetic but never their compiler: a kernel that is correct there can still
fail to compile (the compiler's typing of constexpr branches, descriptor layouts, register and shared-memory
limits). This drives the expert block's forward and backward on the CPU, in bf16 with TMA loads on, with LoRA on
both projections, and in fp32, replacing each launch by a compilation to a Hopper cubin (ptxas included) of the
kernel with the arguments and constexprs it was given, under each autotune config (``--configs first``: the first
of each kind in each list only). Nothing runs, so outputs are garbage; only the compilations count.

    TRITON_INTERPRET=0 python tools/compile_for_hopper.py [--configs first|all] [--ptx DIR]

Prints one line per compilation and exits non-zero on the first that fails, when a kernel asked for TMA loads
has no TMA copy in its PTX (or one not asked for has one), or when rows gathered by token are loaded without an
asynchronous copy (not software-pipelined) in a config with more than one stage, or when a kernel divides 64-bit
integers (a subroutine of dozens of instructions; a token's row, ``pair // top_k``, divides by a constant).
Arguments are specialized as Triton's launcher specializes them (alignment, divisibility by 16, strides of 1):
without that, no pointer load is wide enough to pipeline and the compiled code is not what the GPU runs.
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: the real compiler, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from monkey_patch.scattermoe import kernels, ops  # noqa: E402
from monkey_patch.scattermoe.compilable_ops import scattermoe_experts  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_LIMIT = 227 * 1024  # per block on an H100 or H200; an autotuned config over it is skipped there
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def source(fn: triton.JITFunction, args: tuple, constexprs: dict) -> ASTSource:
    """The kernel as Triton's launcher would hand it to the compiler: each argument specialized by Triton's own rule
    (a tensor's dtype and 16-byte alignment; an integer equal to 1 made a constant, one divisible by 16 marked so,
    unless the kernel says not to), which decides how wide its loads are and whether they can be pipelined."""
    signature, constants, attrs = {}, dict(constexprs), {}
    for param, value in zip(fn.params, args, strict=False):
        kind, attr = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        if kind == "constexpr":
            constants[param.name] = value
        else:
            signature[param.name] = kind
            if attr:
                attrs[(param.num,)] = BaseBackend.parse_attr(attr)
    signature |= {name: "constexpr" for name in constants}
    return ASTSource(fn, signature, constants, attrs)


def autotune_configs(kernel: triton.runtime.Autotuner, which: str) -> list:
    """The configs the autotuner would time; for ``first``, the first one of each kind (the values of its flags
    such as PERSISTENT)."""
    if which == "all":
        return kernel.configs

    def kind(config: triton.Config) -> tuple:
        return tuple((name, value) for name, value in config.kwargs.items() if not name.startswith("BLOCK_"))

    firsts = {kind(config): config for config in reversed(kernel.configs)}
    return [config for config in kernel.configs if config in firsts.values()]


def compile_only(which: str, compiled: list[str], ptx_dir: Path | None = None):
    """A stand-in for ``kernels.launch`` that compiles instead of launching; with ``ptx_dir``, each compilation's PTX
    is written there, numbered in the order of the printed lines."""

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
            pipelined = "cp.async.cg" in binary.asm["ptx"] or "cp.async.ca" in binary.asm["ptx"]
            gathered = any(v for k, v in flags.items() if k.endswith("GATHERED"))
            if gathered and options.get("num_stages", 1) > 1 and not pipelined:
                raise AssertionError(f"{fn.__name__} {flags} {config.kwargs}: rows gathered by pointer, not pipelined")
            if "div.s64" in binary.asm["ptx"] or "div.u64" in binary.asm["ptx"]:
                raise AssertionError(f"{fn.__name__} {flags}: a 64-bit integer division (a long subroutine) in its PTX")
            too_big = binary.metadata.shared > SHARED_MEMORY_LIMIT
            line = (f"{fn.__name__} {flags} {config.kwargs if config else ''} {options}: "
                    f"{binary.metadata.shared} B shared{' (over the limit)' if too_big else ''}, "
                    f"{time.perf_counter() - start:.1f} s")
            print(line, flush=True)
            compiled.append(line)
            if ptx_dir is not None:
                (ptx_dir / f"{len(compiled):03d}-{fn.__name__}.ptx").write_text(binary.asm["ptx"])
            if too_big and config is None:
                raise AssertionError(f"{fn.__name__}: {binary.metadata.shared} B of shared memory, no other config")

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
    parser.add_argument("--ptx", type=Path, default=None, help="write each compilation's PTX into this folder")
    args = parser.parse_args(argv)
    compiled: list[str] = []
    if args.ptx is not None:
        args.ptx.mkdir(parents=True, exist_ok=True)
    kernels.launch = compile_only(args.configs, compiled, args.ptx)
    kernels._tma_wanted = lambda dtype, device: dtype != torch.float32  # as on an H200: TMA for bf16 only
    os.environ[ops.WEIGHT_GRAD_ENV] = "triton"  # the Triton weight-gradient kernel, not torch's grouped GEMM
    os.environ[kernels.PERSISTENT_ENV] = "1"  # the persistent configs too (their autotuners have the rest)
    for dtype, lora in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False)):
        drive(dtype, lora)
    kernels.dequantize_rows(torch.randn(8, 64).to(torch.float8_e4m3fn), torch.rand(8, 1), torch.bfloat16)
    routing = kernels.Routing.of(*ops.compute_routing(torch.randint(0, 8, (64, 2)), 8), 2)
    kernels.gather_token_rows(torch.randn(64, 256, dtype=torch.bfloat16), routing)  # the grouped GEMM's row copy
    over = sum("(over the limit)" in line for line in compiled)
    print(f"{len(compiled)} compilations for sm_90, all succeeded; {over} over the {SHARED_MEMORY_LIMIT} B of shared "
          "memory a block may have, which the autotuner skips")
    return 0


if __name__ == "__main__":
    sys.exit(main())
