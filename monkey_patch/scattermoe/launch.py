"""Launching the expert kernels without Triton's per-call Python.

Every ``kernel[grid](...)`` re-binds and re-specializes each argument and, for an autotuned kernel, rebuilds its
autotune key: about 50 µs of host time per launch on an H200 host (9 µs straight to the compiled kernel;
docs/history.md). A LoRA step of a 48-layer model makes about a thousand such launches, and it is bound by host
time, not the GPU. So the first launch of each (autotune key, specialization) goes through Triton, which autotunes
and compiles; later ones call the compiled kernel it chose. The cache key holds everything Triton specializes a
compiled kernel on, so a hit runs exactly the kernel Triton would have run.
"""

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import triton

logger = logging.getLogger(__name__)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The Triton releases whose launch internals (``best_config``, ``warmup``, how a compiled kernel is called, the
# specialization rules) this cache was checked against on a GPU, bit for bit, by tests/gpu (docs/results.md).
TESTED_TRITON = ("3.6.0",)


def cache_supported(version: str = triton.__version__) -> bool:
    """Whether the cache may run on this Triton; on another release it stays off, with one warning."""
    if version in TESTED_TRITON:
        return True
    logger.warning(
        "Triton %s: the ScatterMoE launch cache was tested with Triton %s only, so kernels launch through Triton's "
        "own path (correct, ~40 µs more host time per launch). Install a tested Triton (requirements.txt) to get it.",
        version, ", ".join(TESTED_TRITON),
    )
    return False


# Off in Triton's interpreter, which has no compiled kernels; benchmarks/launch_overhead.py turns it off to time
# Triton's own path against it.
enabled = not INTERPRET and cache_supported()

_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_COMPILED: dict[tuple, tuple] = {}


def specialization(args: tuple) -> tuple:
    """Per argument, what Triton compiles a kernel for: a tensor's dtype and 16-byte alignment; an integer's being 1,
    its divisibility by 16 and whether it fits in 32 bits (else Triton passes it as 64 bits); any other value (None,
    a bool, a float, a string) itself."""
    key = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            key.append((arg.dtype, arg.data_ptr() % 16 == 0))
        elif isinstance(arg, int) and not isinstance(arg, bool):
            key.append((arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31))
        else:
            key.append(arg)
    return tuple(key)


def _compiled_kernel(kernel: Any, grid: Callable[[dict], tuple], args: tuple, constexprs: dict) -> tuple:
    """The compiled kernel Triton's launch just used, the meta-parameters its grid reads and, for each of the
    kernel's parameters in order, the index of the positional argument giving it (None: a constant)."""
    autotuned = isinstance(kernel, triton.runtime.Autotuner)
    jit = kernel.fn if autotuned else kernel
    config = kernel.best_config if autotuned else None
    tuned = config.all_kwargs() if config is not None else {}
    meta = {**constexprs, **(config.kwargs if config is not None else {})}
    compiled = jit.warmup(*args, grid=_as_3d(grid(meta)), **constexprs, **tuned)
    values = {name: value for name, value in meta.items() if name not in _LAUNCH_OPTIONS}
    order = []
    for position, param in enumerate(jit.params):
        order.append((position, None) if position < len(args) else (None, values[param.name]))
    return compiled, meta, tuple(order)


def _as_3d(grid: tuple) -> tuple[int, int, int]:
    return (*grid, *(1,) * (3 - len(grid)))


def launch(kernel: Any, grid: Callable[[dict], tuple], args: tuple, constexprs: dict) -> None:
    """``kernel[grid](*args, **constexprs)``, through the compiled kernel once Triton has chosen and built it (with
    the cache off, as in Triton's interpreter, always through Triton)."""
    if not enabled:
        kernel[grid](*args, **constexprs)
        return
    tuned_by = tuple(args[i] for i in _autotune_positions(kernel, len(args)))
    key = (kernel, args[0].device, tuple(constexprs.items()), tuned_by, specialization(args))
    hit = _COMPILED.get(key)
    if hit is None:
        kernel[grid](*args, **constexprs)
        _COMPILED[key] = _compiled_kernel(kernel, grid, args, constexprs)
        return
    compiled, meta, order = hit
    compiled[_as_3d(grid(meta))](*(args[i] if i is not None else value for i, value in order))


@functools.cache
def _autotune_positions(kernel: Any, num_args: int) -> tuple[int, ...]:
    """Positions of the arguments the autotuner picks a configuration by (their values go into the cache key exactly,
    unlike ``specialization``); the others are constexprs, already in the key. Once per kernel, off the hot path."""
    if not isinstance(kernel, triton.runtime.Autotuner):
        return ()
    positions = (kernel.arg_names.index(name) for name in kernel.keys)
    return tuple(position for position in positions if position < num_args)
