"""Triton kernels for the Qwen3-MoE expert block in the ScatterMoE style (Tan et al. 2024).

Rows are the (token, expert) pairs of top-k routing, sorted by expert. A kernel never sees a padded or
permuted copy of its input: it gathers token rows by index (``sorted_pairs // top_k``, top_k a constexpr so that
the division compiles to a shift or a multiply, not a 64-bit division subroutine in a loop) and scatters outputs
to pair order itself. Every weight tensor is passed as a logical (E, K, N) view, so one kernel serves both a
projection and its transpose through strides. Each launcher below owns exactly one kernel. The grouped kernels take
rows in blocks of ROW_BLOCK, each within one expert; ``row_block_schedule`` maps blocks to experts once per routing
(``Routing.of``), so a program starts with three loads instead of a search over the experts.

On Hopper, the operands that are read as whole tiles (every weight, and row blocks of a grouped activation) load
through TMA tensor descriptors (``tl.make_tensor_descriptor``) instead of per-element pointers; rows gathered by
token stay on pointer loads, which TMA cannot gather on Hopper. A descriptor spans all experts, so a tile may
reach past its expert's last row or column into the next expert's: those values only meet zeros (the other
operand's masked rows or columns) or land in masked output, as long as they are finite. ``_weight_tma`` and
``_grouped_rows_tma`` decide per tensor; the pointer path serves everything else (fp32, misaligned views) and
``TURBO_TUNE_MOE_TMA=0``. The matmul kernels also have persistent configs (a program per SM looping over the
tiles), which the autotuner times beside the others unless ``TURBO_TUNE_MOE_PERSISTENT=0``.
"""

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import INTERPRET, launch

TMA_ENV = "TURBO_TUNE_MOE_TMA"
PERSISTENT_ENV = "TURBO_TUNE_MOE_PERSISTENT"


TILES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
# The grouped kernels (gate/up, scatter matmul) take rows in blocks of ROW_BLOCK per expert, mapped to experts once
# per routing by ``row_block_schedule``: BLOCK_M is the launcher's constexpr, not a tuned tile (the autotuner had
# chosen 128 at every model shape on an H200, docs/results.md).
ROW_BLOCK = 64 if INTERPRET else 128
ROW_TILES = ("BLOCK_N", "BLOCK_K")


def _configs(shapes: list[tuple[int, ...]], tiles: tuple[str, ...] = TILES, **flags: bool) -> list[triton.Config]:
    """Autotune space: (*tiles, num_warps, num_stages), one small config in the interpreter (more would be timed).
    ``flags``: constexprs of the same value in every config (PERSISTENT)."""
    if INTERPRET:
        shapes = [(64,) * len(tiles) + (4, 1)]
    return [
        triton.Config(dict(zip(tiles, shape[:-2], strict=True)) | flags, num_warps=shape[-2], num_stages=shape[-1])
        for shape in shapes
    ]


# Hopper-sized tiles first, then tiles that still fill the GPU when an expert gets few rows. The BLOCK_K 32 deep
# pipelines are candidates after the weight-gradient kernel's sweep (below); the autotuner keeps them only if faster.
_GATE_UP_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 5), (128, 32, 8, 6), (64, 64, 4, 4),
                             (128, 64, 4, 4)], ROW_TILES, PERSISTENT=False)
_MATMUL_CONFIGS = _configs(
    [
        (128, 64, 8, 4), (256, 64, 8, 3), (256, 32, 8, 5), (128, 32, 8, 5), (128, 64, 4, 4), (64, 64, 4, 3),
        (32, 64, 4, 4),  # LoRA's rank-sized outputs (N = r)
    ],
    ROW_TILES, PERSISTENT=False,
)
# Short K steps, deep pipelines: a 72-config sweep on an H200 (benchmarks/wgrad_sweep.py, docs/history.md) found
# (256, 128, 32, 8, 5) and (128, 256, 32, 8, 5) 1.16-1.21x faster than the best of the older list at both model shapes.
# With a gathered operand Triton spends about half the stages on the row indices (5 stages buffer 3 tiles of rows, 8
# buffer 4; compiled for sm_90 on the CPU), so the 8-stage pair is a candidate too: on an H200 it ties the 5-stage
# one where dW_gate_up runs on this kernel and trails the 128x256x64 tile for dW_down (docs/history.md, 2026-12-02).
_WEIGHT_GRAD_CONFIGS = _configs(
    [
        (256, 128, 32, 8, 5), (128, 256, 32, 8, 5), (256, 128, 32, 8, 6), (128, 256, 32, 8, 6), (256, 128, 32, 8, 8),
        (128, 256, 32, 8, 8), (256, 128, 64, 8, 5),
        (128, 256, 64, 8, 5), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 4, 2), (128, 128, 64, 8, 5),
        (64, 128, 64, 4, 4), (64, 64, 64, 4, 3),
        (32, 128, 64, 4, 4), (128, 32, 64, 4, 4),  # LoRA factor gradients: one side is the rank
    ],
    PERSISTENT=False,
)

# Persistent configs: a program per SM looping over tiles, so that the next tile's loads start under the last one's
# epilogue; the tiles are those the autotuner chose at the model shapes. The autotuner times them beside the others
# (``_autotuner``) unless TURBO_TUNE_MOE_PERSISTENT=0. (Warp-specialized configs were tried on Triton 3.6 and gave
# wrong results on an H200: docs/history.md.)
_PERSISTENT_CONFIGS = {
    "_gather_gate_up_swiglu_kernel": _configs([(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 6)], ROW_TILES,
                                              PERSISTENT=True),
    "_scatter_matmul_kernel": _configs([(256, 64, 8, 3), (256, 32, 8, 5), (128, 64, 8, 4)], ROW_TILES,
                                       PERSISTENT=True),
    "_grouped_weight_grad_kernel": _configs([(128, 256, 64, 8, 5), (128, 256, 32, 8, 5), (256, 128, 32, 8, 6)],
                                            PERSISTENT=True),
}


# fp32 products are exact ("ieee"): no tensor cores, so the tiles above would spill registers and overflow shared
# memory (a 128x256x64 fp32 tile pipelined 3 deep needs 288 KiB). Compiling and timing them all, the first fp32 call
# at a small shape had not finished after 120 s on an H200; with these small tiles it takes 4-18 s
# (benchmarks/fp32_first_call.py, docs/results.md). fp32 runs (parity checks, --model_dtype float32) use them; the
# grouped kernels' rows stay ROW_BLOCK high, with narrower columns and eight warps to hold the accumulators.
_FP32_SHAPES = {TILES: [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2), (64, 32, 32, 4, 2), (32, 32, 32, 4, 1)],
                ROW_TILES: [(64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 8, 1)]}


def _autotuner(kernel: triton.runtime.Autotuner, dtype: torch.dtype,
               low_rank: bool = False) -> triton.runtime.Autotuner:
    """What times and launches ``kernel`` here: for fp32 on a GPU its twin over ``_FP32_SHAPES`` (same code, same
    autotune key); otherwise its twin that also has the persistent configs, or ``kernel`` itself with
    TURBO_TUNE_MOE_PERSISTENT=0 and for launches with LoRA's ``low_rank`` term (two K loops, which Triton does not
    flatten, and not yet run by the GPU gate). In the interpreter, which does not time configs, a twin runs only its
    persistent config, so that the CPU tests run both kinds (one with the variable set to 0)."""
    if dtype == torch.float32 and not INTERPRET:
        return _FP32_TWINS[kernel]
    name = kernel.fn.__name__
    if low_rank or os.environ.get(PERSISTENT_ENV, "1") == "0" or name not in _PERSISTENT_CONFIGS:
        return kernel
    if name not in PERSISTENT_TWINS:
        persistent = _PERSISTENT_CONFIGS[name]
        PERSISTENT_TWINS[name] = _twin(kernel, persistent[-1:] if INTERPRET else kernel.configs + persistent)
    return PERSISTENT_TWINS[name]


PERSISTENT_TWINS: dict[str, triton.runtime.Autotuner] = {}


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact products so fp32 results match torch to 1e-4; bf16/fp16 go to tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _programs_per_launch(device: torch.device) -> int:
    """A persistent kernel's grid: one program per multiprocessor (three in the interpreter, so its CPU tests loop)."""
    return 3 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


def _grid(tiles: int, meta: dict, device: torch.device) -> tuple[int]:
    """A program per tile or, for a persistent config, per multiprocessor (never more than the tiles)."""
    return (min(tiles, _programs_per_launch(device)) if meta["PERSISTENT"] else tiles,)


def _rows_bucket(num_rows: int) -> int:
    """Autotune key for the row count: a power of two, so varying batch sizes do not retune every step."""
    return triton.next_power_of_2(max(num_rows, 1))


@functools.cache
def hopper_or_newer(device: torch.device) -> bool:
    """Whether ``device`` is a GPU of compute capability 9.0 or later; asked at every launch, so asked of the driver
    once per device."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def _tma_allocator(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global scratch for the descriptors a kernel builds on the device."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _tma_wanted(dtype: torch.dtype, device: torch.device) -> bool:
    """TMA for bf16/fp16 on Hopper or newer (in Triton's interpreter for any dtype, so the CPU tests run it), unless
    ``TURBO_TUNE_MOE_TMA=0``. The allocator is a context variable: set here, on the thread that launches, since
    backward runs on autograd's own threads."""
    if os.environ.get(TMA_ENV, "1") == "0":
        return False
    if INTERPRET:
        return True
    if dtype not in (torch.bfloat16, torch.float16) or not hopper_or_newer(device):
        return False
    triton.set_allocator(_tma_allocator)
    return True


def _tma_rows(tensor: torch.Tensor, row_stride: int, column_offsets: tuple[int, ...] = ()) -> bool:
    """Whether ``tensor`` read as rows of ``row_stride`` elements with unit stride along the row fits a descriptor:
    a 16-byte aligned start and row stride, and 16-byte aligned column offsets a kernel starts tiles at."""
    size = tensor.element_size()
    return (tensor.data_ptr() % 16 == 0 and row_stride * size % 16 == 0
            and all(offset * size % 16 == 0 for offset in column_offsets))


def _grouped_rows_tma(a: torch.Tensor) -> bool:
    """A (rows, K) activation in grouped order as a descriptor: unit column stride, aligned rows."""
    return _tma_wanted(a.dtype, a.device) and a.stride(1) == 1 and _tma_rows(a, a.stride(0))


def _weight_tma(w: torch.Tensor, column_offsets: tuple[int, ...] = ()) -> tuple[bool, bool]:
    """(TMA, K contiguous) for a logical (E, K, N) weight view: one 2D descriptor over all experts, rows of
    (E*N, K) when K is contiguous (transformers' layout for the forward), of (E*K, N) when N is."""
    if not _tma_wanted(w.dtype, w.device):
        return False, False
    num_experts, k_dim, n_dim = w.shape
    if w.stride(1) == 1 and w.stride(0) == n_dim * w.stride(2):
        return _tma_rows(w, w.stride(2)), True
    if w.stride(2) == 1 and w.stride(0) == k_dim * w.stride(1):
        return _tma_rows(w, w.stride(1), column_offsets), False
    return False, False


@triton.jit
def _weight_descriptor(w_ptr, NUM_EXPERTS, K, N_TOTAL, stride_wk, stride_wn, W_TMA: tl.constexpr,
                       W_K_CONTIG: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """All experts' (K, N_TOTAL) weights as one descriptor, rows of whichever dimension is not contiguous; without
    W_TMA the pointer itself."""
    if not W_TMA:  # one return: the compiler types every return of a function, even under a constexpr branch
        desc = w_ptr
    elif W_K_CONTIG:
        desc = tl.make_tensor_descriptor(w_ptr, shape=[NUM_EXPERTS * N_TOTAL, K], strides=[stride_wn, 1],
                                         block_shape=[BLOCK_N, BLOCK_K])
    else:
        desc = tl.make_tensor_descriptor(w_ptr, shape=[NUM_EXPERTS * K, N_TOTAL], strides=[stride_wk, 1],
                                         block_shape=[BLOCK_K, BLOCK_N])
    return desc


@triton.jit
def _rows_descriptor(ptr, NUM_ROWS, COLS, stride_rows, TMA: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                     BLOCK_COLS: tl.constexpr):
    """A (NUM_ROWS, COLS) activation in grouped order, unit stride along its rows, as a descriptor of
    (BLOCK_ROWS, BLOCK_COLS) tiles; without TMA the pointer itself."""
    if TMA:  # one return, as in _weight_descriptor
        desc = tl.make_tensor_descriptor(ptr, shape=[NUM_ROWS, COLS], strides=[stride_rows, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_COLS])
    else:
        desc = ptr
    return desc


@triton.jit
def _expert_rows(expert_ends_ptr, NUM_EXPERTS, E_POW2: tl.constexpr):
    """Every expert's (index, whether it is one, first row, end row) in grouped order, E_POW2 lanes."""
    experts = tl.arange(0, E_POW2)
    valid = experts < NUM_EXPERTS
    ends = tl.load(expert_ends_ptr + experts, mask=valid, other=0)
    starts = tl.load(expert_ends_ptr + experts - 1, mask=valid & (experts > 0), other=0)
    return experts, valid, starts, ends


@triton.jit
def _load_weight(w_desc, w_ptrs, expert, K, N_TOTAL, k0, n0, k_mask, col_mask,
                 W_TMA: tl.constexpr, W_K_CONTIG: tl.constexpr):
    """The (BLOCK_K, BLOCK_N) tile of W[expert] at (k0, n0): through the descriptor, or pointers ``w_ptrs``."""
    if W_TMA:  # one return, as in _weight_descriptor
        if W_K_CONTIG:
            w = w_desc.load([expert * N_TOTAL + n0, k0]).T
        else:
            w = w_desc.load([expert * K + k0, n0])
    else:
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
    return w


@triton.jit(do_not_specialize=["NUM_ROWS", "NUM_BLOCKS"])  # both follow the token count (as num_rows below)
def _row_block_schedule_kernel(expert_ends_ptr, schedule_ptr, used_blocks_ptr, NUM_EXPERTS, NUM_ROWS, NUM_BLOCKS,
                               E_POW2: tl.constexpr, ROWS: tl.constexpr, BLOCK_B: tl.constexpr):
    """For BLOCK_B row blocks of ROWS grouped rows: (expert, first row, end row of the expert), experts in order,
    each starting a new block. Blocks past the last hold (NUM_EXPERTS, NUM_ROWS, NUM_ROWS): no rows. The first
    program also stores how many blocks hold rows."""
    experts, _, starts, ends = _expert_rows(expert_ends_ptr, NUM_EXPERTS, E_POW2)
    blocks = (ends - starts + ROWS - 1) // ROWS
    block_ends = tl.cumsum(blocks, 0)
    ids = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    expert = tl.sum((block_ends[None, :] <= ids[:, None]).to(tl.int32), 1)
    is_expert = experts[None, :] == expert[:, None]
    first_block = tl.sum(tl.where(is_expert, (block_ends - blocks)[None, :], 0), 1)
    in_use = expert < NUM_EXPERTS
    row_start = tl.sum(tl.where(is_expert, starts[None, :], 0), 1) + (ids - first_block) * ROWS
    row_end = tl.sum(tl.where(is_expert, ends[None, :], 0), 1)
    entries = schedule_ptr + ids * 3
    stored = ids < NUM_BLOCKS
    tl.store(entries, tl.where(in_use, expert, NUM_EXPERTS), mask=stored)
    tl.store(entries + 1, tl.where(in_use, row_start, NUM_ROWS), mask=stored)
    tl.store(entries + 2, tl.where(in_use, row_end, NUM_ROWS), mask=stored)
    tl.store(used_blocks_ptr, tl.max(block_ends, 0), mask=tl.program_id(0) == 0)


@triton.jit
def _row_block(schedule_ptr, pid_m):
    """(expert, first row, end row of the expert) of row block ``pid_m``: three loads, no search per program."""
    entry = schedule_ptr + pid_m * 3
    return tl.load(entry), tl.load(entry + 1), tl.load(entry + 2)


@triton.jit
def _accumulate(acc, a_ptrs, a_desc, row_start, w_ptrs, w_desc, expert, n0, row_mask, col_mask, K, N_TOTAL,
                stride_ak, stride_wk, A_TMA: tl.constexpr, W_TMA: tl.constexpr, W_K_CONTIG: tl.constexpr,
                BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc += a @ W[expert] over K in BLOCK_K steps: a's (BLOCK_M, BLOCK_K) tiles from pointers ``a_ptrs`` or, for
    grouped rows, descriptor ``a_desc`` at ``row_start``; W's (BLOCK_K, BLOCK_N) tiles at column ``n0``."""
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k_mask = ks < K - k0
        if A_TMA:
            a = a_desc.load([row_start, k0])
        else:
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = _load_weight(w_desc, w_ptrs, expert, K, N_TOTAL, k0, n0, k_mask, col_mask, W_TMA, W_K_CONTIG)
        acc = tl.dot(a, w, acc=acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _accumulate_gate_up(acc_gate, acc_up, a_ptrs, w_ptrs, w_desc, expert, n0, up_offset, row_mask, col_mask, K,
                        N_TOTAL, stride_ak, stride_wk, stride_wn, W_TMA: tl.constexpr, W_K_CONTIG: tl.constexpr,
                        BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """The gate and up halves of ``_accumulate`` at once, one load of ``a`` feeding both (up columns start
    ``up_offset`` after gate's)."""
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k_mask = ks < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_gate = _load_weight(w_desc, w_ptrs, expert, K, N_TOTAL, k0, n0, k_mask, col_mask, W_TMA, W_K_CONTIG)
        w_up = _load_weight(w_desc, w_ptrs + up_offset * stride_wn, expert, K, N_TOTAL, k0, n0 + up_offset, k_mask,
                            col_mask, W_TMA, W_K_CONTIG)
        acc_gate = tl.dot(a, w_gate, acc=acc_gate, input_precision=INPUT_PRECISION)
        acc_up = tl.dot(a, w_up, acc=acc_up, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    return acc_gate, acc_up


@triton.jit
def _gate_up_tile(
    expert, row_start, row_end, pid_n, x_ptr, w_ptr, w_desc, a2_ptr, w2_ptr, sorted_pairs_ptr, scale_ptr, gate_up_ptr,
    h_ptr,
    K, K2, N, TOP_K: tl.constexpr, stride_xm, stride_xk, stride_we, stride_wk, stride_wn,
    stride_a2m, stride_a2k, stride_w2e, stride_w2k, stride_w2n,
    HAS_A2: tl.constexpr, W_TMA: tl.constexpr, W_K_CONTIG: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (row block, column block) tile of ``_gather_gate_up_swiglu_kernel``."""
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    pairs = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    tokens = pairs // TOP_K
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xm + ks[None, :] * stride_xk
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_gate, acc_up = _accumulate_gate_up(acc_gate, acc_up, x_ptrs, w_ptrs, w_desc, expert, n0, N, row_mask,
                                           col_mask, K, 2 * N, stride_xk, stride_wk, stride_wn, W_TMA, W_K_CONTIG,
                                           BLOCK_K, INPUT_PRECISION)
    if HAS_A2:
        a2_ptrs = a2_ptr + rows[:, None].to(tl.int64) * stride_a2m + ks[None, :] * stride_a2k
        w2_ptrs = w2_ptr + expert.to(tl.int64) * stride_w2e + ks[:, None] * stride_w2k + cols[None, :] * stride_w2n
        acc_gate, acc_up = _accumulate_gate_up(acc_gate, acc_up, a2_ptrs, w2_ptrs, w2_ptr, expert, n0, N, row_mask,
                                               col_mask, K2, 2 * N, stride_a2k, stride_w2k, stride_w2n, False, False,
                                               BLOCK_K, INPUT_PRECISION)
    scale = tl.load(scale_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up * scale[:, None]
    out_mask = row_mask[:, None] & col_mask[None, :]
    gate_up_ptrs = gate_up_ptr + rows[:, None].to(tl.int64) * (2 * N) + cols[None, :]
    tl.store(gate_up_ptrs, acc_gate.to(gate_up_ptr.dtype.element_ty), mask=out_mask)
    tl.store(gate_up_ptrs + N, acc_up.to(gate_up_ptr.dtype.element_ty), mask=out_mask)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=_GATE_UP_CONFIGS, key=["K", "N", "ROWS_BUCKET", "HAS_A2", "W_TMA"])
@triton.jit
def _gather_gate_up_swiglu_kernel(
    x_ptr, w_ptr, a2_ptr, w2_ptr, sorted_pairs_ptr, schedule_ptr, used_blocks_ptr, scale_ptr, gate_up_ptr, h_ptr,
    NUM_EXPERTS, K, K2, N, ROWS_BUCKET,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn,
    stride_a2m, stride_a2k, stride_w2e, stride_w2k, stride_w2n,
    TOP_K: tl.constexpr, HAS_A2: tl.constexpr, W_TMA: tl.constexpr, W_K_CONTIG: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """gate|up = x[token] @ W[e] for the gate and up halves at once; SwiGLU and routing weight in the epilogue.

    Writes the pre-activations (for backward) and h = scale[pair] * silu(gate) * up, both in grouped row order.
    Scaling h instead of the down projection's output leaves the down projection and its weight gradient
    plain grouped matmuls. With HAS_A2, grouped rows a2 @ W2[e] join the same accumulators before the
    activation: LoRA's low-rank path (u @ B^T) without a pre-activation-sized buffer.

    One tile per program or, with PERSISTENT, a program per SM looping over the tiles of the row blocks in use,
    a loop Triton flattens with the K loop (its trip count is the same for every tile) so that the next tile's loads
    start under this one's epilogue.
    """
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    w_desc = _weight_descriptor(w_ptr, NUM_EXPERTS, K, 2 * N, stride_wk, stride_wn, W_TMA, W_K_CONTIG, BLOCK_K,
                                BLOCK_N)
    if PERSISTENT:
        tiles = tl.load(used_blocks_ptr) * num_n_blocks
        for tile in tl.range(pid, tiles, tl.num_programs(0), flatten=True):
            expert, row_start, row_end = _row_block(schedule_ptr, tile // num_n_blocks)
            _gate_up_tile(expert, row_start, row_end, tile % num_n_blocks, x_ptr, w_ptr, w_desc, a2_ptr, w2_ptr,
                          sorted_pairs_ptr, scale_ptr, gate_up_ptr, h_ptr, K, K2, N, TOP_K, stride_xm, stride_xk,
                          stride_we, stride_wk, stride_wn, stride_a2m, stride_a2k, stride_w2e, stride_w2k, stride_w2n,
                          HAS_A2, W_TMA, W_K_CONTIG, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        expert, row_start, row_end = _row_block(schedule_ptr, pid // num_n_blocks)
        if expert >= NUM_EXPERTS:  # past the last row block
            return
        _gate_up_tile(expert, row_start, row_end, pid % num_n_blocks, x_ptr, w_ptr, w_desc, a2_ptr, w2_ptr,
                      sorted_pairs_ptr, scale_ptr, gate_up_ptr, h_ptr, K, K2, N, TOP_K, stride_xm, stride_xk,
                      stride_we, stride_wk, stride_wn, stride_a2m, stride_a2k, stride_w2e, stride_w2k, stride_w2n,
                      HAS_A2, W_TMA, W_K_CONTIG, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _scatter_matmul_tile(
    expert, row_start, row_end, pid_n, a_ptr, a_desc, w_ptr, w_desc, a2_ptr, w2_ptr, sorted_pairs_ptr, y_ptr,
    y_scale, K, K2, N, TOP_K: tl.constexpr, stride_am, stride_ak, stride_we, stride_wk, stride_wn,
    stride_a2m, stride_a2k, stride_w2e, stride_w2k, stride_w2n,
    A_GATHERED: tl.constexpr, Y_SCATTERED: tl.constexpr, HAS_A2: tl.constexpr, A_TMA: tl.constexpr,
    W_TMA: tl.constexpr, W_K_CONTIG: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (row block, column block) tile of ``_scatter_matmul_kernel``."""
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    pairs = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    a_rows = pairs // TOP_K if A_GATHERED else rows.to(tl.int64)
    y_rows = pairs if Y_SCATTERED else rows.to(tl.int64)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = _accumulate(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a_ptrs, a_desc, row_start, w_ptrs, w_desc,
                      expert, n0, row_mask, col_mask, K, N, stride_ak, stride_wk, A_TMA, W_TMA, W_K_CONTIG, BLOCK_K,
                      INPUT_PRECISION)
    if HAS_A2:
        a2_ptrs = a2_ptr + rows[:, None].to(tl.int64) * stride_a2m + ks[None, :] * stride_a2k
        w2_ptrs = w2_ptr + expert.to(tl.int64) * stride_w2e + ks[:, None] * stride_w2k + cols[None, :] * stride_w2n
        acc = _accumulate(acc, a2_ptrs, a2_ptr, row_start, w2_ptrs, w2_ptr, expert, n0, row_mask, col_mask, K2, N,
                          stride_a2k, stride_w2k, False, False, False, BLOCK_K, INPUT_PRECISION)
    y_ptrs = y_ptr + y_rows[:, None] * N + cols[None, :]
    tl.store(y_ptrs, (acc * y_scale).to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(configs=_MATMUL_CONFIGS, key=["K", "N", "ROWS_BUCKET", "A_GATHERED", "HAS_A2", "A_TMA", "W_TMA"])
@triton.jit(do_not_specialize=["NUM_ROWS"])  # a descriptor's extent only: one compile for every row count
def _scatter_matmul_kernel(
    a_ptr, w_ptr, a2_ptr, w2_ptr, sorted_pairs_ptr, schedule_ptr, used_blocks_ptr, y_ptr, y_scale,
    NUM_EXPERTS, K, K2, N, ROWS_BUCKET, NUM_ROWS,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn,
    stride_a2m, stride_a2k, stride_w2e, stride_w2k, stride_w2n,
    TOP_K: tl.constexpr, A_GATHERED: tl.constexpr, Y_SCATTERED: tl.constexpr, HAS_A2: tl.constexpr, A_TMA: tl.constexpr,
    W_TMA: tl.constexpr, W_K_CONTIG: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """y = y_scale · a @ W[e] per expert row block. ``a`` rows are gathered by token or read in grouped order (A_TMA:
    through a descriptor); ``y`` rows are scattered to pair order or written in grouped order. With HAS_A2, a2 @ W2[e]
    over grouped rows of a2 joins the same accumulator before the scale (LoRA's low-rank term, added without a second
    output buffer). ``y_scale`` is LoRA's scale on its rank-r products (1 elsewhere), applied in fp32 before the store
    instead of by a kernel of its own.

    One tile per program or, with PERSISTENT, a program per SM over the tiles of the row blocks in use: a loop that
    Triton flattens with the K loop (the same trip count for every tile), so that the next tile's loads start under
    this one's store."""
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    a_desc = _rows_descriptor(a_ptr, NUM_ROWS, K, stride_am, A_TMA, BLOCK_M, BLOCK_K)
    w_desc = _weight_descriptor(w_ptr, NUM_EXPERTS, K, N, stride_wk, stride_wn, W_TMA, W_K_CONTIG, BLOCK_K, BLOCK_N)
    if PERSISTENT:
        tiles = tl.load(used_blocks_ptr) * num_n_blocks
        for tile in tl.range(pid, tiles, tl.num_programs(0), flatten=True):
            expert, row_start, row_end = _row_block(schedule_ptr, tile // num_n_blocks)
            _scatter_matmul_tile(
                expert, row_start, row_end, tile % num_n_blocks, a_ptr, a_desc, w_ptr, w_desc, a2_ptr, w2_ptr,
                sorted_pairs_ptr, y_ptr, y_scale, K, K2, N, TOP_K, stride_am, stride_ak, stride_we, stride_wk,
                stride_wn, stride_a2m, stride_a2k, stride_w2e, stride_w2k, stride_w2n, A_GATHERED, Y_SCATTERED, HAS_A2,
                A_TMA, W_TMA, W_K_CONTIG, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        expert, row_start, row_end = _row_block(schedule_ptr, pid // num_n_blocks)
        if expert >= NUM_EXPERTS:  # past the last row block
            return
        _scatter_matmul_tile(
            expert, row_start, row_end, pid % num_n_blocks, a_ptr, a_desc, w_ptr, w_desc, a2_ptr, w2_ptr,
            sorted_pairs_ptr, y_ptr, y_scale, K, K2, N, TOP_K, stride_am, stride_ak, stride_we, stride_wk, stride_wn,
            stride_a2m, stride_a2k, stride_w2e, stride_w2k, stride_w2n, A_GATHERED, Y_SCATTERED, HAS_A2, A_TMA,
            W_TMA, W_K_CONTIG, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


# Rows per program and warps: one row of 4 warps was the fixed choice until 2026-12-01; the autotuner now times more.
_SWIGLU_BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_R": r}, num_warps=w)
    for r, w in ([(64, 4)] if INTERPRET else [(1, 4), (2, 4), (2, 8), (4, 8)])
]


@triton.autotune(configs=_SWIGLU_BACKWARD_CONFIGS, key=["N", "ROWS_BUCKET", "STORE_H"])
@triton.jit(do_not_specialize=["num_rows"])  # varies with packed rows: no second compile when it hits a multiple of 16
def _swiglu_backward_kernel(
    grad_h_ptr, gate_up_ptr, sorted_pairs_ptr, scale_ptr, grad_gate_up_ptr, grad_scale_ptr, h_ptr,
    num_rows, N, ROWS_BUCKET, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, STORE_H: tl.constexpr,
):
    """BLOCK_R grouped rows (a few on a GPU; more in the interpreter, where programs are costly): from
    g = grad_out[token] @ W_down[e] (unweighted), the routing-weight gradient rowsum(g * silu(gate) * up) and
    the pre-activation gradients of scale * g; with STORE_H also the forward's h = scale * silu(gate) * up, which
    costs one write here instead of an activation kept from forward to backward.

    Kept apart from the matmul: fused, its epilogue forced small tiles and halved the matmul's rate.
    """
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_mask = rows < num_rows
    cols = tl.arange(0, BLOCK_N)
    mask = row_mask[:, None] & (cols < N)[None, :]
    offsets = rows[:, None] * 2 * N + cols[None, :]
    g = tl.load(grad_h_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + offsets + N, mask=mask, other=0.0).to(tl.float32)
    pairs = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0)
    scale = tl.load(scale_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    tl.store(grad_scale_ptr + pairs, tl.sum(g * silu * up, 1), mask=row_mask)
    grad_h = g * scale[:, None]
    grad_gate = grad_h * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(grad_gate_up_ptr + offsets, grad_gate.to(grad_gate_up_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_gate_up_ptr + offsets + N, (grad_h * silu).to(grad_gate_up_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        h = silu * up * scale[:, None]
        tl.store(h_ptr + rows[:, None] * N + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


_SUM_TOP_K_CONFIGS = [
    triton.Config({"BLOCK_T": t, "BLOCK_H": h}, num_warps=w)
    for t, h, w in ([(64, 128, 1)] if INTERPRET else [(8, 256, 4), (16, 128, 4), (4, 512, 4), (32, 256, 8)])
]


@triton.autotune(configs=_SUM_TOP_K_CONFIGS, key=["H", "TOP_K"])
@triton.jit(do_not_specialize=["T"])  # as num_rows above
def _sum_top_k_kernel(y_ptr, out_ptr, T, H, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum_j y[t * TOP_K + j] in fp32: the combine of a token's k expert outputs, at memory speed
    (torch's reduction over the middle dim of (T, k, H) runs at about half the bandwidth)."""
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (tokens < T)[:, None] & (cols < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (tokens[:, None] * TOP_K + j) * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + tokens[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_chunks(rows, BLOCK_K: tl.constexpr):
    """An expert's chunks of BLOCK_K rows in the weight-gradient kernel: at least one, so that an expert without rows
    still stores its zeros. Both the persistent loop's length and its walk through the tiles count them so."""
    return tl.maximum((rows + BLOCK_K - 1) // BLOCK_K, 1)


@triton.jit
def _weight_grad_tile(tile, expert_ends_ptr, NUM_EXPERTS, num_n_blocks, tiles_per_expert,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Output tile ``tile`` of dW: its expert, first row m0 and column n0, the expert's first and end input rows, and
    its chunks of BLOCK_K rows (``_row_chunks``). Past the last expert: no rows."""
    expert = tile // tiles_per_expert
    within = tile % tiles_per_expert
    valid = expert < NUM_EXPERTS
    row_start = tl.load(expert_ends_ptr + expert - 1, mask=valid & (expert > 0), other=0)
    row_end = tl.load(expert_ends_ptr + expert, mask=valid, other=0)
    chunks = _row_chunks(row_end - row_start, BLOCK_K)
    return expert, (within // num_n_blocks) * BLOCK_M, (within % num_n_blocks) * BLOCK_N, row_start, row_end, chunks


@triton.jit
def _chunks_of_program(pid, programs, expert_ends_ptr, NUM_EXPERTS, tiles_per_expert,
                       E_POW2: tl.constexpr, BLOCK_K: tl.constexpr):
    """How many chunks of BLOCK_K rows program ``pid`` of ``programs`` runs over its tiles pid, pid + programs, ...:
    per expert, its tiles there times the expert's chunks (``_weight_grad_tile``)."""
    experts, valid, starts, ends = _expert_rows(expert_ends_ptr, NUM_EXPERTS, E_POW2)
    chunks = tl.where(valid, _row_chunks(ends - starts, BLOCK_K), 0)
    first = experts * tiles_per_expert - pid  # the expert's tiles, counted from this program's first
    last = first + tiles_per_expert
    tiles = (tl.where(last > 0, (last + programs - 1) // programs, 0)
             - tl.where(first > 0, (first + programs - 1) // programs, 0))
    return tl.sum(tiles * chunks, 0)


@triton.jit
def _weight_grad_chunk(acc, r0, row_end, m0, n0, a_ptr, a_desc, b_ptr, b_desc, sorted_pairs_ptr, M, N,
                       TOP_K: tl.constexpr, stride_ar, stride_am, stride_br, stride_bn,
                       A_GATHERED: tl.constexpr, B_GATHERED: tl.constexpr, A_TMA: tl.constexpr, B_TMA: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """acc += a[rows]ᵀ b[rows] over the BLOCK_K rows from r0 that come before row_end, a's columns from m0 and b's
    from n0."""
    rows = r0 + tl.arange(0, BLOCK_K)
    row_mask = rows < row_end
    cols_m = m0 + tl.arange(0, BLOCK_M)
    cols_n = n0 + tl.arange(0, BLOCK_N)
    if A_GATHERED or B_GATHERED:
        # 32-bit, by a constant: in the loop over rows, a 64-bit division by a runtime value is a long subroutine
        pairs = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0).to(tl.int32)
        tokens = (pairs // TOP_K).to(tl.int64)
    a_rows = tokens if A_GATHERED else rows.to(tl.int64)
    b_rows = tokens if B_GATHERED else rows.to(tl.int64)
    if A_TMA:
        a = a_desc.load([r0, m0]).T
    else:
        a = tl.load(a_ptr + cols_m[:, None] * stride_am + (a_rows * stride_ar)[None, :],
                    mask=(cols_m < M)[:, None] & row_mask[None, :], other=0.0)
    if B_TMA:
        b = b_desc.load([r0, n0])
    else:
        b = tl.load(b_ptr + cols_n[None, :] * stride_bn + (b_rows * stride_br)[:, None],
                    mask=row_mask[:, None] & (cols_n < N)[None, :], other=0.0)
    return tl.dot(a, b, acc=acc, input_precision=INPUT_PRECISION)


@triton.jit
def _store_weight_grad(dw_ptr, acc, expert, m0, n0, M, N, NUM_EXPERTS, stride_de, stride_dm, stride_dn,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile's sum into dW[expert]; never past the last expert, whatever a loop's count."""
    cols_m = m0 + tl.arange(0, BLOCK_M)
    cols_n = n0 + tl.arange(0, BLOCK_N)
    dw_ptrs = dw_ptr + expert.to(tl.int64) * stride_de + cols_m[:, None] * stride_dm + cols_n[None, :] * stride_dn
    mask = (cols_m < M)[:, None] & (cols_n < N)[None, :] & (expert < NUM_EXPERTS)
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_WEIGHT_GRAD_CONFIGS, key=["M", "N", "ROWS_BUCKET", "A_GATHERED", "A_TMA", "B_TMA"])
@triton.jit(do_not_specialize=["NUM_ROWS"])  # a descriptor's extent only: one compile for every row count
def _grouped_weight_grad_kernel(
    a_ptr, b_ptr, sorted_pairs_ptr, expert_ends_ptr, dw_ptr,
    M, N, ROWS_BUCKET, NUM_ROWS, NUM_EXPERTS,
    stride_ar, stride_am, stride_br, stride_bn, stride_de, stride_dm, stride_dn,
    TOP_K: tl.constexpr, A_GATHERED: tl.constexpr, B_GATHERED: tl.constexpr, A_TMA: tl.constexpr, B_TMA: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """dW[e] = sum over the expert's rows of a[row]^T b[row], accumulated in fp32.

    An operand is gathered by token (``pair // top_k``) or read in grouped order, through a descriptor where
    A_TMA/B_TMA (only opposite a gathered operand, whose masked rows zero the rows a tile reads past the expert's
    end). Experts without rows get zeros, since dW is a full tensor.

    A program per output tile or, with PERSISTENT, a program per SM running the chunks of its tiles (every
    ``num_programs``-th) as one loop: an expert has only ~512 rows at 8k tokens, 8 chunks of 64, so a tile's
    pipeline fill and store weigh as much as its products unless the next tile's loads start under them.
    """
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    tiles_per_expert = tl.cdiv(M, BLOCK_M) * num_n_blocks
    a_desc = _rows_descriptor(a_ptr, NUM_ROWS, M, stride_ar, A_TMA, BLOCK_K, BLOCK_M)
    b_desc = _rows_descriptor(b_ptr, NUM_ROWS, N, stride_br, B_TMA, BLOCK_K, BLOCK_N)
    if PERSISTENT:
        programs = tl.num_programs(0)
        steps = _chunks_of_program(pid, programs, expert_ends_ptr, NUM_EXPERTS, tiles_per_expert, E_POW2, BLOCK_K)
        tile = pid
        expert, m0, n0, row_start, row_end, chunks = _weight_grad_tile(
            tile, expert_ends_ptr, NUM_EXPERTS, num_n_blocks, tiles_per_expert, BLOCK_M, BLOCK_N, BLOCK_K)
        chunk = 0
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, steps):
            acc = _weight_grad_chunk(acc, row_start + chunk * BLOCK_K, row_end, m0, n0, a_ptr, a_desc, b_ptr, b_desc,
                                     sorted_pairs_ptr, M, N, TOP_K, stride_ar, stride_am, stride_br, stride_bn,
                                     A_GATHERED, B_GATHERED, A_TMA, B_TMA, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            if chunk == chunks - 1:  # the tile's last chunk: store it and start the next tile's sum
                _store_weight_grad(dw_ptr, acc, expert, m0, n0, M, N, NUM_EXPERTS, stride_de, stride_dm,
                                   stride_dn, BLOCK_M, BLOCK_N)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            chunk += 1
            if chunk == chunks:
                tile += programs
                expert, m0, n0, row_start, row_end, chunks = _weight_grad_tile(
                    tile, expert_ends_ptr, NUM_EXPERTS, num_n_blocks, tiles_per_expert, BLOCK_M, BLOCK_N, BLOCK_K)
                chunk = 0
    else:
        expert, m0, n0, row_start, row_end, _ = _weight_grad_tile(
            pid, expert_ends_ptr, NUM_EXPERTS, num_n_blocks, tiles_per_expert, BLOCK_M, BLOCK_N, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(row_start, row_end, BLOCK_K):
            acc = _weight_grad_chunk(acc, r0, row_end, m0, n0, a_ptr, a_desc, b_ptr, b_desc, sorted_pairs_ptr, M, N,
                                     TOP_K, stride_ar, stride_am, stride_br, stride_bn, A_GATHERED, B_GATHERED, A_TMA,
                                     B_TMA, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        _store_weight_grad(dw_ptr, acc, expert, m0, n0, M, N, NUM_EXPERTS, stride_de, stride_dm, stride_dn,
                           BLOCK_M, BLOCK_N)


def _twin(kernel: triton.runtime.Autotuner, configs: list[triton.Config]) -> triton.runtime.Autotuner:
    """The same kernel and autotune key over other configs, with its own cache of choices."""
    return triton.autotune(configs=configs, key=kernel.keys)(kernel.fn)


def _fp32_twin(kernel: triton.runtime.Autotuner) -> triton.runtime.Autotuner:
    """``kernel`` autotuned over ``_FP32_SHAPES`` of its tiles, one tile per program (fp32 runs check numerics;
    they are not what a GPU is timed on)."""
    first = kernel.configs[0].kwargs
    tiles = TILES if "BLOCK_M" in first else ROW_TILES
    flags = {name: value for name, value in first.items() if name not in tiles}
    return _twin(kernel, _configs(_FP32_SHAPES[tiles], tiles, **flags))


_FP32_TWINS = {
    kernel: _fp32_twin(kernel)
    for kernel in (_gather_gate_up_swiglu_kernel, _scatter_matmul_kernel, _grouped_weight_grad_kernel)
}


class Routing(NamedTuple):
    """The (token, expert) pairs of top-k routing, sorted by expert, as the launchers read them."""

    sorted_pairs: torch.Tensor  # (T*k,) pair ids (token * top_k + slot) in expert order
    expert_ends: torch.Tensor  # (E,) int32, each expert's end row in that order
    schedule: torch.Tensor  # (row blocks, 3) int32, from row_block_schedule
    used_blocks: torch.Tensor  # (1,) int32: how many of those blocks hold rows (they come first)
    top_k: int

    @classmethod
    def of(cls, sorted_pairs: torch.Tensor, expert_ends: torch.Tensor, top_k: int) -> "Routing":
        return cls(sorted_pairs, expert_ends, *row_block_schedule(expert_ends, sorted_pairs.numel()), top_k)


def row_blocks(num_rows: int, num_experts: int) -> int:
    """Row blocks of ROW_BLOCK any routing of ``num_rows`` rows can need: each expert leaves at most one partial."""
    return triton.cdiv(num_rows, ROW_BLOCK) + num_experts


def row_block_schedule(expert_ends: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of ROW_BLOCK grouped rows, (expert, first row, end row of the expert), computed once per routing
    on the device (no host sync) for every grouped kernel: (``row_blocks``, 3) int32, the unused blocks last and
    without rows; and (1,) int32, how many are used."""
    num_experts = expert_ends.numel()
    num_blocks = row_blocks(num_rows, num_experts)
    schedule = torch.empty(num_blocks, 3, device=expert_ends.device, dtype=torch.int32)
    used_blocks = torch.empty(1, device=expert_ends.device, dtype=torch.int32)
    blocks_per_program = 64
    launch(_row_block_schedule_kernel, lambda meta: (triton.cdiv(num_blocks, blocks_per_program),),
           (expert_ends, schedule, used_blocks, num_experts, num_rows, num_blocks),
           dict(E_POW2=triton.next_power_of_2(num_experts), ROWS=ROW_BLOCK, BLOCK_B=blocks_per_program, num_warps=4))
    return schedule, used_blocks


def _second_operand(
    a2: torch.Tensor | None, w2: torch.Tensor | None, fallback: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, ...]]:
    """Pointers, K2 and strides for the optional grouped ``a2 @ W2[e]`` term; ``fallback`` fills unused slots."""
    if a2 is None or w2 is None:
        return fallback, fallback, 0, (0, 0, 0, 0, 0)
    return a2, w2, w2.shape[1], (a2.stride(0), a2.stride(1), w2.stride(0), w2.stride(1), w2.stride(2))


def gather_gate_up_swiglu(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    row_scale: torch.Tensor,
    routing: Routing,
    a2: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, H), w_gate_up as (E, H, 2I) view -> pre-activations (T*k, 2I) and weighted h (T*k, I), grouped.

    ``a2`` (T*k, K2) grouped with ``w2`` as (E, K2, 2I) view adds a2 @ W2[e] to the pre-activations.
    """
    num_experts, hidden, two_inter = w_gate_up.shape
    inter = two_inter // 2
    num_rows = routing.sorted_pairs.numel()
    row_scale = row_scale.contiguous()  # indexed flat by pair; a strided (T, k) view flattens with a stride
    gate_up = torch.empty(num_rows, two_inter, device=x.device, dtype=x.dtype)
    h = torch.empty(num_rows, inter, device=x.device, dtype=x.dtype)

    def grid(meta):
        return _grid(routing.schedule.shape[0] * triton.cdiv(inter, meta["BLOCK_N"]), meta, x.device)

    a2, w2, k2, a2_strides = _second_operand(a2, w2, x)
    w_tma, w_k_contig = _weight_tma(w_gate_up, column_offsets=(inter,))
    launch(_autotuner(_gather_gate_up_swiglu_kernel, x.dtype, low_rank=k2 > 0), grid, (
        x, w_gate_up, a2, w2, routing.sorted_pairs, routing.schedule, routing.used_blocks, row_scale, gate_up, h,
        num_experts, hidden, k2, inter, _rows_bucket(num_rows),
        x.stride(0), x.stride(1), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2), *a2_strides,
    ), dict(TOP_K=routing.top_k, HAS_A2=k2 > 0, W_TMA=w_tma, W_K_CONTIG=w_k_contig,
            INPUT_PRECISION=_input_precision(x.dtype), BLOCK_M=ROW_BLOCK))
    return gate_up, h


def scatter_matmul(
    a: torch.Tensor,
    w: torch.Tensor,
    routing: Routing,
    a_gathered: bool,
    y_scattered: bool,
    a2: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """scale · (a @ W[e]) for w as (E, K, N) view -> (T*k, N); a is (T, K) gathered by token or (T*k, K) grouped,
    and the output is in pair order (scattered) or grouped order. ``a2`` (T*k, K2) grouped with ``w2`` as (E, K2, N)
    view adds a2 @ W2[e] inside the scaled sum."""
    num_experts, k_dim, n_dim = w.shape
    num_rows = routing.sorted_pairs.numel()
    y = torch.empty(num_rows, n_dim, device=a.device, dtype=a.dtype)

    def grid(meta):
        return _grid(routing.schedule.shape[0] * triton.cdiv(n_dim, meta["BLOCK_N"]), meta, a.device)

    a2, w2, k2, a2_strides = _second_operand(a2, w2, a)
    w_tma, w_k_contig = _weight_tma(w)
    a_tma = not a_gathered and _grouped_rows_tma(a)
    launch(_autotuner(_scatter_matmul_kernel, a.dtype, low_rank=k2 > 0), grid, (
        a, w, a2, w2, routing.sorted_pairs, routing.schedule, routing.used_blocks, y, float(scale),
        num_experts, k_dim, k2, n_dim, _rows_bucket(num_rows), a.shape[0],
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), *a2_strides,
    ), dict(TOP_K=routing.top_k, A_GATHERED=a_gathered, Y_SCATTERED=y_scattered, HAS_A2=k2 > 0, A_TMA=a_tma,
            W_TMA=w_tma, W_K_CONTIG=w_k_contig, INPUT_PRECISION=_input_precision(a.dtype), BLOCK_M=ROW_BLOCK))
    return y


def swiglu_backward(
    grad_h: torch.Tensor, gate_up: torch.Tensor, sorted_pairs: torch.Tensor, row_scale: torch.Tensor, want_h: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """grad_h (T*k, I) unweighted, grouped -> grad of pre-activations (T*k, 2I), of row_scale (T*k,) fp32 and,
    when ``want_h``, the weighted activations h (T*k, I) recomputed (else None)."""
    num_rows, inter = grad_h.shape
    row_scale = row_scale.contiguous()  # as in gather_gate_up_swiglu
    grad_gate_up = torch.empty_like(gate_up)
    grad_scale = torch.empty(num_rows, device=grad_h.device, dtype=torch.float32)
    h = torch.empty_like(grad_h) if want_h else None
    launch(_swiglu_backward_kernel, lambda meta: (triton.cdiv(num_rows, meta["BLOCK_R"]),), (
        grad_h, gate_up, sorted_pairs, row_scale, grad_gate_up, grad_scale, grad_h if h is None else h, num_rows,
        inter, _rows_bucket(num_rows),
    ), dict(BLOCK_N=triton.next_power_of_2(inter), STORE_H=want_h))
    return grad_gate_up, grad_scale, h


def grouped_weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    routing: Routing,
    a_gathered: bool,
    b_gathered: bool,
    dw: torch.Tensor,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Fill dw (E, M, N) with per-expert a^T b over the expert's rows; a is (., M), b is (., N). ``config``: these
    tiles instead of the autotuner's choice (benchmarks/wgrad_sweep.py)."""
    num_experts, m_dim, n_dim = dw.shape
    num_rows = routing.sorted_pairs.numel()

    def grid(meta):
        return _grid(num_experts * triton.cdiv(m_dim, meta["BLOCK_M"]) * triton.cdiv(n_dim, meta["BLOCK_N"]), meta,
                     a.device)

    kernel = _autotuner(_grouped_weight_grad_kernel, a.dtype)
    args = (a, b, routing.sorted_pairs, routing.expert_ends, dw, m_dim, n_dim, _rows_bucket(num_rows), num_rows,
            num_experts, a.stride(0), a.stride(1), b.stride(0), b.stride(1), dw.stride(0), dw.stride(1), dw.stride(2))
    constexprs = dict(TOP_K=routing.top_k, A_GATHERED=a_gathered, B_GATHERED=b_gathered,
                      A_TMA=b_gathered and not a_gathered and _grouped_rows_tma(a),
                      B_TMA=a_gathered and not b_gathered and _grouped_rows_tma(b),
                      INPUT_PRECISION=_input_precision(a.dtype), E_POW2=triton.next_power_of_2(num_experts))
    if config is None:
        launch(kernel, grid, args, constexprs)
    else:
        kernel.fn[grid(config.kwargs)](*args, **constexprs, **config.all_kwargs())
    return dw


def sum_top_k(y: torch.Tensor, top_k: int) -> torch.Tensor:
    """(T*k, H) rows in pair order -> (T, H), each token's k rows summed."""
    num_rows, hidden = y.shape
    num_tokens = num_rows // top_k
    out = torch.empty(num_tokens, hidden, device=y.device, dtype=y.dtype)
    if num_tokens == 0:
        return out

    def grid(meta):
        return (triton.cdiv(num_tokens, meta["BLOCK_T"]), triton.cdiv(hidden, meta["BLOCK_H"]))

    launch(_sum_top_k_kernel, grid, (y.contiguous(), out, num_tokens, hidden), dict(TOP_K=top_k))
    return out


def _row_tiles(row_len: int, values: int) -> tuple[int, int]:
    """(rows, columns) of a copy kernel's tile: up to 1,024 columns of a row, as many rows as make about ``values``
    values (smaller tiles in the interpreter)."""
    cols = min(triton.next_power_of_2(row_len), 256 if INTERPRET else 1024)
    return max(1, (1024 if INTERPRET else values) // cols), cols


@triton.jit(do_not_specialize=["num_rows"])  # the routed rows: a new count every step
def _gather_token_rows_kernel(src_ptr, sorted_pairs_ptr, out_ptr, num_rows, row_len, stride_src,
                              TOP_K: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    tokens = (tl.load(sorted_pairs_ptr + rows, mask=rows < num_rows, other=0).to(tl.int32) // TOP_K).to(tl.int64)
    mask = (rows < num_rows)[:, None] & (cols < row_len)[None, :]
    values = tl.load(src_ptr + tokens[:, None] * stride_src + cols[None, :], mask=mask)
    tl.store(out_ptr + rows[:, None] * row_len + cols[None, :], values, mask=mask)


def gather_token_rows(src: torch.Tensor, routing: Routing) -> torch.Tensor:
    """(T, N) rows in token order -> (T*k, N), each routed pair's token row, in expert order: what a grouped GEMM
    reads. One read and one write per value in wide rows; torch's ``index_select``, which it replaces, took 0.55 ms
    for Qwen3-30B-A3B's 32,768 tokens on an H200 (about 1 TB/s; docs/history.md)."""
    if src.stride(-1) != 1:
        src = src.contiguous()
    num_rows, row_len = routing.sorted_pairs.numel(), src.shape[1]
    out = torch.empty(num_rows, row_len, device=src.device, dtype=src.dtype)
    if out.numel():
        rows, cols = _row_tiles(row_len, 8192)
        launch(_gather_token_rows_kernel,
               lambda meta: (triton.cdiv(num_rows, rows), triton.cdiv(row_len, cols)),
               (src, routing.sorted_pairs, out, num_rows, row_len, src.stride(0)),
               dict(TOP_K=routing.top_k, BLOCK_ROWS=rows, BLOCK_COLS=cols, num_warps=8))
    return out


@triton.jit
def _dequantize_rows_kernel(w_ptr, scale_ptr, out_ptr, num_rows, row_len,
                            BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < num_rows)[:, None] & (cols < row_len)[None, :]
    offs = rows[:, None] * row_len + cols[None, :]
    scale = tl.load(scale_ptr + rows, mask=rows < num_rows)
    w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (w * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_rows(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., K) FP8 weight times its fp32 per-row scales (..., 1), in ``dtype``: one read and one write per value
    (torch's cast then multiply makes three passes, at a third of the bandwidth). Tiles of whole rows, so each
    value finds its scale without a 64-bit division."""
    weight, scale = weight.contiguous(), scale.contiguous().float()
    out = torch.empty(weight.shape, device=weight.device, dtype=dtype)
    if weight.numel():
        row_len = weight.shape[-1]
        num_rows = weight.numel() // row_len
        rows, cols = _row_tiles(row_len, 4096)
        launch(_dequantize_rows_kernel,
               lambda meta: (triton.cdiv(num_rows, rows), triton.cdiv(row_len, cols)),
               (weight, scale, out, num_rows, row_len), dict(BLOCK_ROWS=rows, BLOCK_COLS=cols, num_warps=8))
    return out
