"""End-to-end SFT training steps of a random-init Qwen3-MoE, one variant per flag set, through TurboSFTTrainer.

    python benchmarks/e2e.py [--layers 4] [--seq 4096] [--batch 2] [--gradient_accumulation_steps 1]
        [--variants defaults fast_moe ...] [--out DIR]
    python benchmarks/e2e.py --max_seq_search [--variants lora all_lora] [--budget_s 420] [--start_seq 4096]
        [--search_gpus 0,1]

The model has Qwen3-30B-A3B's shape (hidden 2048, 128 experts, top-8, moe_intermediate 768, 32/4 heads of 128,
vocab 151,936) with --layers decoder layers, built from its config (no download). Each variant runs in its own
process, built the way qwen3_sft.py builds a run (preflight, attention choice, patches, LoRA, TurboSFTTrainer), and
times full optimizer steps: forward and backward of --gradient_accumulation_steps micro-batches of --batch rows,
then AdamW, data loading included. Unpacked variants train on rows of exactly --seq tokens; packing variants on
examples of a realistic length spread, packed into rows of --seq tokens (padding-free); both data sets are the same
for every variant of their kind, so their losses are comparable.

Reported per variant: real tokens/s per GPU at the median step, over all timed steps (a step with a full Python
collection included) and over them less the collector's time (one full collection every 8-16 steps falls into a
short window or not by chance), MFU (callback.py's FLOP count over the GPU's dense bf16 peak), median step time after
--warmup steps, peak allocated memory, and the loss and token accuracy of the first and last step. A step bound by
the host runs as fast as the host does, which changes between processes of the same code (medians 0.61-0.70 s for
the full-depth LoRA step on one H200): --repeats N runs the variant list N times in turns and adds a table of each
variant's tokens/s per repeat and its ratios to the first variant, the medians of the ratios within each repeat.
A failing variant (an error, an OOM, a timeout) becomes a row with the reason; its log is in OUT/<variant>.log.
The markdown table is printed last (with --repeats, the repeats' table after it); OUT/e2e.json holds the rows (each
with its repeat), OUT/e2e.png a chart if matplotlib is installed.
--profile adds steps after the timed ones (one, or --profile_steps), each under torch.profiler on its own (not timed):
their costliest kernels (GPU time; CPU time on a CPU) and the GPU time by kind of kernel (optimizer, attention,
GEMMs, Turbo-Tune's experts...) go to OUT/<variant>.profile.md, to show where a variant's step goes, and which
part of it a step that is slow only now and then spends longer in. --host_profile profiles the same extra steps
with cProfile instead (OUT/<variant>.host.txt): which Python functions a step bound by the host spends its time in.
From Python 3.12 (the GPU image's) cProfile follows every thread on one call stack, the main thread and autograd's
backward threads alike, so a function's own time there can hold time another thread ran; cumulative times and call
counts are the figures to read. --memory_snapshot records the CUDA allocator over one extra step instead
(OUT/<variant>.memory.md): that step's peak, what is live at it by the code that allocated it, and what came last
before it; each row's peak_step says in which step the run's peak was first reached.
The expert-load metrics (turbo_tune/moe_health.py) are on in every variant, as in a run; the two *_no_moe_health
variants switch them off, so their step time against `defaults` and `compile_fast_moe` is the metrics' overhead.
--hidden small shrinks every dimension so that the whole path runs on a CPU in seconds (a smoke test, not a benchmark).

--max_seq_search asks how long a sequence fits instead: per variant (default: LoRA on transformers' defaults against
LoRA with our kernels, full depth, batch 1, gradient checkpointing on), the longest multiple of --seq_step tokens
that completes --warmup + --steps training steps, found by doubling from --start_seq and then bisection, each probe
in a fresh process (a CUDA OOM, a killed process or a probe past --timeout counts as "does not fit"), all within
--budget_s (with --search_gpus, the variants at once, one GPU and the whole budget each). Every probe trains on rows
of one document of exactly that length, packing variants included, so both variants do the same attention work.
Reported: the longest fitting length with its tokens/s and peak memory, the first failing length, and whether the
budget cut the search short; OUT/max_seq.json, OUT/max_seq.png, table last.
"""

import argparse
import cProfile
import gzip
import io
import json
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere; child processes get it through PYTHONPATH

import turbo_tune.triton_mode  # noqa: E402, F401  (as qwen3_sft.py: before anything imports triton)

# isort: split
from common import (  # noqa: E402
    QWEN3_30B_A3B,
    QWEN3_30B_A3B_LAYERS,
    child_env,
    fmt,
    gpu_gaps,
    is_oom,
    kernel_kinds,
    kernels_by_grid,
    memory_at_peak,
    relative_error,
    run_logged,
    step_profile,
    timeline,
    turbo_tune_kernel_names,
)
from transformers import TrainerCallback  # noqa: E402

from callback import EfficiencyCallback, ModelFlops, device_peak_tflops, token_counts  # noqa: E402
from monkey_patch.attention import varlen_kernel  # noqa: E402
from turbo_tune.arguments import comma_list  # noqa: E402

VARIANTS = {
    "defaults": [],
    "fast_moe": ["use_fast_moe_block"],
    "liger": ["use_liger_kernel"],
    "compile": ["torch_compile"],
    "packing": ["use_packing"],
    "fp8": ["use_fp8"],
    "compile_fast_moe": ["use_fast_moe_block", "torch_compile"],  # all without packing (Liger adds nothing there)
    # the strongest setup without our experts (transformers' grouped_mm, compiled, packed rows): the baseline of `all`
    "compile_packing": ["torch_compile", "use_packing"],
    # the same with bf16 weights: with fp32 master weights (the full-parameter default) transformers' experts compute
    # in fp32, as their grouped_mm casts its input to the weights' dtype outside autocast, so the fastest setup
    # without our code keeps bf16 weights (and loses AdamW's small updates)
    "compile_packing_bf16": ["torch_compile", "use_packing", "model_dtype=bfloat16"],
    "all": ["use_fast_moe_block", "use_liger_kernel", "torch_compile", "use_packing", "fused_grad_clipping"],
    # all with bf16 weights: against compile_packing_bf16, our code alone at the same numerics
    "all_bf16": ["use_fast_moe_block", "use_liger_kernel", "torch_compile", "use_packing", "fused_grad_clipping",
                 "model_dtype=bfloat16"],
    # both with Inductor's C++ wrapper (see all_lora_compile_fp8_cpp_wrapper below): a setting a careful user of the
    # stack alone could turn on too, so the baseline gets it as well
    "compile_packing_bf16_cpp_wrapper": ["TORCHINDUCTOR_CPP_WRAPPER=1", "torch_compile", "use_packing",
                                         "model_dtype=bfloat16"],
    "all_bf16_cpp_wrapper": ["TORCHINDUCTOR_CPP_WRAPPER=1", "use_fast_moe_block", "use_liger_kernel", "torch_compile",
                             "use_packing", "fused_grad_clipping", "model_dtype=bfloat16"],
    "all_fp8": ["use_fast_moe_block", "use_liger_kernel", "torch_compile", "use_packing", "fused_grad_clipping",
                "use_fp8"],
    # all, with AdamW's moments in 8 bits (torchao's AdamW8bit through the Trainer's --optim): most of this model's
    # step memory is weights, gradients and optimizer state, not activations
    "all_adamw8bit": ["use_fast_moe_block", "use_liger_kernel", "torch_compile", "use_packing",
                      "optim=adamw_torch_8bit"],
    # LoRA (attention and experts, qwen3_sft.py's --use_lora defaults): peft's folded experts against ours;
    # no --torch_compile, which would recompile in every probe of --max_seq_search
    "lora": ["use_lora"],
    # and with flash-attn-4 through transformers' own flash_attention_4 (padded rows unpadded inside): the kernels
    # varlen_sdpa picks where flash-attn-4 is installed, without our code
    "lora_fa4": ["use_lora", "attn_implementation=flash_attention_4"],
    # peft at its strongest without our code: compiled layers and packed rows, as compile_packing is for full training
    "lora_compile_packing": ["use_lora", "torch_compile", "use_packing"],
    "all_lora": ["use_fast_moe_block", "use_liger_kernel", "use_packing", "use_lora"],
    "fast_moe_lora": ["use_fast_moe_block", "use_lora"],  # the expert-LoRA path alone, as expert_lora.py times it
    # compiled (Liger's RMSNorm/RoPE then stay off): fuses peft's attention-LoRA casts and the norms, for fixed lengths
    "all_lora_compile": ["use_fast_moe_block", "use_packing", "use_lora", "torch_compile"],
    # and with the frozen experts stored in FP8: issue 8's memory bar (0.65x) with its speed bar (2x) in one run
    "all_lora_compile_fp8": ["use_fast_moe_block", "use_packing", "use_lora", "torch_compile", "fp8_frozen_experts"],
    # and with Inductor's C++ wrapper around each compiled graph (an environment setting, as the upper-case name says):
    # its kernels launch from C++ instead of a Python wrapper, for a step bound by the host (varlen attention then
    # calls aten's flash op directly: monkey_patch/attention.py); the checkpointed body is compiled, the wrapper having
    # no code for a checkpoint compiled into the layer (monkey_patch/torch_compile.py)
    "all_lora_compile_fp8_cpp_wrapper": ["TORCHINDUCTOR_CPP_WRAPPER=1", "use_fast_moe_block", "use_packing", "use_lora",
                                         "torch_compile", "fp8_frozen_experts"],
    # and with the checkpointed body compiled, the checkpoint around it (the default until 2026-12-03, when the whole
    # layer compiled with its checkpoint timed 2.3 % faster: monkey_patch/torch_compile.py)
    "all_lora_compile_fp8_body_checkpoint": ["TURBO_TUNE_COMPILE_CHECKPOINT=body", "use_fast_moe_block",
                                             "use_packing", "use_lora", "torch_compile", "fp8_frozen_experts"],
    # and with varlen_sdpa's kernel pinned: flash-attn-4's (monkey_patch/fa4_attention.py; the default where it is
    # installed, an error where not) or PyTorch's flash kernel (the default without flash-attn-4)
    "all_lora_compile_fp8_fa4": ["TURBO_TUNE_VARLEN_KERNEL=fa4", "use_fast_moe_block", "use_packing", "use_lora",
                                 "torch_compile", "fp8_frozen_experts"],
    "all_lora_compile_fp8_torch_flash": ["TURBO_TUNE_VARLEN_KERNEL=flash", "use_fast_moe_block", "use_packing",
                                         "use_lora", "torch_compile", "fp8_frozen_experts"],
    # and with TRL's activation offloading: the checkpointed hidden states wait in pinned CPU memory for backward
    "lora_offload": ["use_lora", "activation_offloading"],
    "all_lora_offload": ["use_fast_moe_block", "use_liger_kernel", "use_packing", "use_lora", "activation_offloading"],
    # the expert-load metrics (on in every other variant) switched off: their overhead is the step-time difference
    "defaults_no_moe_health": ["moe_health_metrics=false"],
    "compile_fast_moe_no_moe_health": ["use_fast_moe_block", "torch_compile", "moe_health_metrics=false"],
}
# variants with these run only when --variants names them
OPT_IN_FLAGS = ("use_lora", "moe_health_metrics=false", "TORCHINDUCTOR_CPP_WRAPPER=1")
SEARCH_VARIANTS = ("lora", "all_lora")  # the defaults' and ours, in that order (ratios are to the first)

SHAPES = {
    "full": QWEN3_30B_A3B,
    "small": {"hidden_size": 64, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
              "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "vocab_size": 512},
}
TIME_BUDGET_S = 9 * 60
MIN_PROBE_S = 30  # a probe needs at least this long (start, build, two steps); less budget left ends the search
# Defaults that differ between the flag-by-flag comparison and --max_seq_search (full depth, batch 1, short probes)
MODE_DEFAULTS = {"layers": (4, QWEN3_30B_A3B_LAYERS), "batch": (2, 1), "warmup": (3, 1), "steps": (6, 2),
                 "timeout": (330, 300)}  # 330: Liger's fused MoE autotunes for minutes at its first step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, help="decoder layers (default 4; 48 with --max_seq_search)")
    parser.add_argument("--hidden", choices=sorted(SHAPES), default="full", help="model shape (small: CPU smoke test)")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per row")
    parser.add_argument("--batch", type=int, help="rows per step per GPU (default 2; 1 with --max_seq_search)")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1,
                        help="micro-batches of --batch rows per optimizer step, as users set it for their global "
                        "batch: the optimizer's share of a step falls by as much (timed: optimizer steps)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, where compilation happens (default 3; 1)")
    parser.add_argument("--steps", type=int, help="timed steps; the median is reported (default 6; 2)")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="as qwen3_sft.py does by default (always on with --max_seq_search)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="default: all but the LoRA, no_moe_health and cpp_wrapper ones; "
                        f"{' '.join(SEARCH_VARIANTS)} with --max_seq_search")
    parser.add_argument("--timeout", type=int, help="seconds per variant, or per probe with --max_seq_search, "
                        "before it counts as failed (default 330; 300)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the variant list this many times, in turns (A B A B ...), each in a fresh process "
                        "(logs in OUT/repeat<i>/): the host's speed changes between processes, so a ratio is the "
                        "median of the repeats' own ratios")
    parser.add_argument("--profile", action="store_true", help="profile extra steps: OUT/<variant>.profile.md")
    parser.add_argument("--profile_steps", type=int, default=1,
                        help="steps profiled with --profile (each on its own) or --host_profile (together)")
    parser.add_argument("--memory_snapshot", action="store_true",
                        help="record the CUDA allocator over one extra step: OUT/<variant>.memory.md")
    parser.add_argument("--host_profile", action="store_true",
                        help="instead of --profile: cProfile over extra steps, for a step bound by the host "
                        "(OUT/<variant>.host.txt; every thread from Python 3.12, the main thread before)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "e2e_out"))
    search = parser.add_argument_group("--max_seq_search: the longest sequence that trains")
    search.add_argument("--max_seq_search", action="store_true", help="search each variant's longest --seq")
    search.add_argument("--start_seq", type=int, default=4096, help="first length probed (a multiple of --seq_step)")
    search.add_argument("--seq_step", type=int, default=1024, help="lengths probed are multiples of this")
    search.add_argument("--budget_s", type=float, default=420, help="wall-clock seconds for the whole search")
    search.add_argument("--search_gpus", type=comma_list,
                        help="comma-separated GPU ids: search the variants at once, each on its own GPU with the "
                        "whole --budget_s (one id per variant)")
    search.add_argument("--max_tokens_cap", type=int,
                        help="fail any probe above this many tokens per step as if out of memory (tests the search "
                        "on a CPU)")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, defaults in MODE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, defaults[args.max_seq_search])
    args.gradient_checkpointing = args.gradient_checkpointing or args.max_seq_search
    if sum((args.profile, args.host_profile, args.memory_snapshot)) > 1:
        parser.error("--profile, --host_profile and --memory_snapshot profile the same extra steps: give one of them")
    if args.variants is None:
        args.variants = list(SEARCH_VARIANTS) if args.max_seq_search else [
            v for v, flags in VARIANTS.items() if not set(flags) & set(OPT_IN_FLAGS)]
    if args.search_gpus and len(args.search_gpus) < len(args.variants):
        parser.error(f"--search_gpus {','.join(args.search_gpus)} names fewer GPUs than the {len(args.variants)} "
                     "variants searched: give one GPU id per variant, or leave it out to search one at a time")
    if args.gradient_accumulation_steps < 1 or (args.max_seq_search and args.gradient_accumulation_steps != 1):
        parser.error(f"--gradient_accumulation_steps {args.gradient_accumulation_steps}: give a positive count, and "
                     "leave it out with --max_seq_search, whose probes ask what fits in one micro-batch")
    if args.start_seq <= 0 or args.seq_step <= 0 or args.start_seq % args.seq_step:
        parser.error(f"--start_seq {args.start_seq} must be a positive multiple of --seq_step {args.seq_step}")
    return args


def packed_lengths(total_tokens: int, seq: int, seed: int) -> list[int]:
    """Example lengths like an SFT mix: log-normal around ~600 tokens, a long tail, clipped to [32, seq]."""
    import random

    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total_tokens:
        lengths.append(int(min(max(rng.lognormvariate(math.log(600), 0.9), 32), seq)))
    return lengths


def variant_env(name: str) -> dict[str, str]:
    """A variant's environment settings: its ``NAME=value`` items whose name is upper case."""
    return dict(item.split("=", 1) for item in VARIANTS[name] if item.partition("=")[0].isupper())


def variant_settings(name: str) -> dict[str, object]:
    """A variant's TurboTuneConfig settings: a boolean flag turned on, or ``name=value`` (true/false: a boolean)."""
    settings, env = {}, variant_env(name)
    for item in VARIANTS[name]:
        key, _, value = item.partition("=")
        if key not in env:
            settings[key] = {"": True, "true": True, "false": False}.get(value, value)
    return settings


def command_line(name: str) -> str:
    """The qwen3_sft.py command line of a variant, as a user would type it: environment settings, then flags."""
    env = [f"{key}={value}" for key, value in variant_env(name).items()]
    flags = [f"--{key}" if value is True else f"--{key} {str(value).lower() if value is False else value}"
             for key, value in variant_settings(name).items()]
    return " ".join(env + flags) or "(transformers defaults)"


def total_steps(args: argparse.Namespace) -> int:
    return args.warmup + args.steps + (args.profile_steps if args.profile or args.host_profile else
                                       int(args.memory_snapshot))


def make_dataset(args: argparse.Namespace, packing: bool, vocab: int):
    """Random token rows: exactly --seq long, or examples to pack (about 30% more tokens than the steps need, as
    the short packed rows are dropped).
    --max_seq_search probes always get rows of exactly --seq: one document as long as the probe asks for."""
    from datasets import Dataset

    rows = args.batch * args.gradient_accumulation_steps * total_steps(args)
    generator = torch.Generator().manual_seed(0)
    if packing and not args.max_seq_search:
        lengths = packed_lengths(int(rows * args.seq * 1.3), args.seq, seed=0)
    else:
        lengths = [args.seq] * rows
    rows = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    return Dataset.from_dict({"input_ids": rows})


def full_rows(packed, seq: int):
    """The packed rows at least 90% full. Packing leaves a few short bins, and one of them in a timed step (1,640
    tokens of 4,096 on an H200) changes the kernels' shapes: a one-off autotune or recompile, and half the work."""
    return packed.filter(lambda ids: len(ids) >= 0.9 * seq, input_columns="input_ids")


def run_child(args: argparse.Namespace) -> dict:
    """One variant in this process: build, patch, train --warmup + --steps steps, return the measurements."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from monkey_patch import apply_patches, apply_peft_patches, preflight
    from monkey_patch.sft_trainer import TurboSFTTrainer
    from monkey_patch.torch_compile import compile_fell_back
    from turbo_tune.arguments import TurboTuneConfig
    from turbo_tune.modeling import apply_lora, attention_implementation, load_tokenizer, weight_dtype

    flags = variant_settings(args.child)
    work = tempfile.mkdtemp(prefix=f"e2e-{args.child}-")
    config = TurboTuneConfig(
        output_dir=work, report_to="none", save_strategy="no", logging_steps=1, max_steps=total_steps(args),
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_length=args.seq, gradient_checkpointing=args.gradient_checkpointing,
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0, seed=0,
        train_on_all_tokens=True, disable_tqdm=True, eval_split=0, **flags,
    )
    preflight(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_config = Qwen3MoeConfig(
        num_hidden_layers=args.layers, max_position_embeddings=max(args.seq, 4096), norm_topk_prob=True,
        output_router_logits=True, use_cache=False, tie_word_embeddings=False, **SHAPES[args.hidden],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            model_config, dtype=weight_dtype(config), attn_implementation=attention_implementation(config)
        )
    model = apply_patches(model, config)
    if config.use_lora:
        model = apply_peft_patches(apply_lora(model, config), config)  # after the patches, as qwen3_sft.py does

    recorder = StepRecorder(ModelFlops.from_config(model_config), device_peak_tflops())
    tokenizer = load_tokenizer(config)  # only its pad token matters: the data is token ids already
    dataset = make_dataset(args, config.use_packing, model_config.vocab_size)
    trainer = TurboSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                              efficiency=recorder)
    if config.use_packing:
        trainer.train_dataset = full_rows(trainer.train_dataset, args.seq)
    if args.profile:
        trainer.add_callback(StepProfile(args.warmup + args.steps, args.out / f"{args.child}.profile.md",
                                         args.profile_steps))
    if args.host_profile:
        trainer.add_callback(HostProfile(args.warmup + args.steps, args.out / f"{args.child}.host.txt",
                                         args.profile_steps))
    if args.memory_snapshot and torch.cuda.is_available():
        trainer.add_callback(MemorySnapshot(args.warmup + args.steps, args.out / f"{args.child}.memory.md"))
    trainer.train()
    notes = [f"attention {model.config._attn_implementation}"]
    if model.config._attn_implementation == "varlen_sdpa":
        notes.append(f"varlen kernel {varlen_kernel() if torch.cuda.is_available() else 'per-sequence sdpa'}")
        notes.append(f"varlen vs masked SDPA rel err out/grad {varlen_check(model_config, weight_dtype(config))}")
    if config.use_liger_kernel:
        liger = [k for k in ("rms_norm", "rope", "swiglu") if config.liger_kernel_config.get(k) is not False]
        notes.append(f"Liger {'+'.join(liger) or 'none'}")
    if config.torch_compile:
        notes.append("compile FELL BACK to eager (see log)" if compile_fell_back(model) else "compiled per layer")
    return recorder.summary(args.warmup, args.steps, ", ".join(notes))


def varlen_check(model_config, dtype: torch.dtype) -> str:
    """varlen_sdpa against SDPA with the block-diagonal mask, on this device and the model's heads: output and
    query-gradient relative errors (a wrong boundary shows up as an error near 1, bf16 rounding near 1e-2)."""
    from monkey_patch.attention import varlen_sdpa_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lengths = torch.tensor([700, 1300, 64, 2032], device=device)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    position_ids = torch.cat([torch.arange(n, device=device) for n in lengths.tolist()])[None]
    mask = (doc[:, None] == doc[None, :]) & torch.ones(len(doc), len(doc), dtype=torch.bool, device=device).tril()
    heads = (model_config.num_attention_heads, model_config.num_key_value_heads, model_config.num_key_value_heads)
    q, k, v = (torch.randn(1, h, len(doc), model_config.head_dim, device=device, dtype=dtype).requires_grad_()
               for h in heads)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    (expected_grad,) = torch.autograd.grad(expected.float().square().sum(), q)
    actual, _ = varlen_sdpa_attention(torch.nn.Module(), q, k, v, None, position_ids=position_ids)
    (actual_grad,) = torch.autograd.grad(actual.float().square().sum(), q)
    errors = [relative_error(actual.transpose(1, 2), expected), relative_error(actual_grad, expected_grad)]
    return "/".join(f"{e:.1e}" for e in errors)


class StepRecorder(EfficiencyCallback):
    """Per optimizer step: wall time (synchronized), real tokens, attention FLOPs, loss and token accuracy."""

    def __init__(self, model_flops: ModelFlops, peak_tflops: float | None) -> None:
        super().__init__(model_flops, peak_tflops)
        self.steps: list[dict] = []

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def observe_batch(self, inputs: dict) -> None:
        tokens, sum_sq = token_counts(inputs).tolist()
        self.steps[-1]["tokens"] += int(tokens)
        self.steps[-1]["sum_sq"] += sum_sq

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._sync()
        self.steps.append({"start": time.perf_counter(), "gc_start": self.gc_timer.seconds, "tokens": 0,
                           "sum_sq": 0.0})

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self._sync()
        self.steps[-1]["time"] = time.perf_counter() - self.steps[-1]["start"]
        self.steps[-1]["gc"] = self.gc_timer.seconds - self.steps[-1]["gc_start"]
        self.steps[-1]["peak"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs and self.steps:
            self.steps[-1].update(loss=logs["loss"], accuracy=logs.get("mean_token_accuracy"))

    def summary(self, warmup: int, steps: int, notes: str) -> dict:
        timed = self.steps[warmup:warmup + steps] or self.steps
        step_time = statistics.median(s["time"] for s in timed)
        tokens = statistics.median(s["tokens"] for s in timed)
        tflops = statistics.median(self.model_flops.flops(s["tokens"], s["sum_sq"]) for s in timed) / step_time / 1e12
        timed_tokens = sum(s["tokens"] for s in timed)
        return {
            "ok": True, "notes": notes, "step_time_s": step_time, "tokens_per_step": tokens,
            "tokens_per_s": tokens / step_time, "tflops": tflops,
            # every timed step, the slow ones (a full Python collection) included: what a long run averages
            "tokens_per_s_all_steps": timed_tokens / sum(s["time"] for s in timed),
            # and the same with the collector's time taken out: a full collection comes every 8-16 steps, so a short
            # window holds one or none by chance, and two variants compare fairly only without it
            "tokens_per_s_outside_gc": timed_tokens / sum(s["time"] - s["gc"] for s in timed),
            "step_time_range_s": (min(s["time"] for s in timed), max(s["time"] for s in timed)),
            "gc_s_per_step": statistics.mean(s["gc"] for s in timed),
            "timed_steps": [{"s": s["time"], "gc_s": s["gc"], "tokens": s["tokens"], "sum_sq": s["sum_sq"]}
                            for s in timed],
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            # the first step (counted from 0, warm-up included) after which the peak stood at its final value
            "peak_step": next(i for i, s in enumerate(self.steps) if s["peak"] == self.steps[-1]["peak"]),
            "first_loss": self.steps[0].get("loss"), "last_loss": self.steps[-1].get("loss"),
            "first_accuracy": self.steps[0].get("accuracy"), "last_accuracy": self.steps[-1].get("accuracy"),
        }


class StepProfile(TrainerCallback):
    """Profiles ``count`` optimizer steps, one at a time, from the one that starts after ``step`` completed ones;
    writes each one's GPU time by kind of kernel, its costliest kernels, the GPU's busy time against the step's span
    and the host threads' (``<variant>.profile.md``, steps one after another: a step that is slow only now and then
    shows beside a fast one), and the last one's chrome trace (``<variant>.trace.json.gz``, for Perfetto)."""

    def __init__(self, step: int, path: Path, count: int = 1, rows: int = 25) -> None:
        self.step, self.path, self.count, self.rows, self.profiler = step, path, count, rows, None
        self.reports: list[str] = []

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if self.step <= state.global_step < self.step + self.count:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self.profiler is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        trace = self.path.with_name(self.path.name.replace(".profile.md", ".trace.json.gz"))
        self.profiler.export_chrome_trace(str(trace))
        with gzip.open(trace, "rt") as file:
            events = json.load(file)["traceEvents"]
        report = step_profile(self.profiler.key_averages(), torch.cuda.is_available(), self.rows)
        kinds = ""
        if torch.cuda.is_available():
            ours = turbo_tune_kernel_names()
            kinds = f"{kernel_kinds(events, ours)}\n{gpu_gaps(events)}\n{kernels_by_grid(events, ours)}\n"
        self.reports.append(f"## Step {state.global_step}\n\n{timeline(events)}\n{kinds}{report}")
        self.path.write_text("\n\n".join(self.reports))
        self.profiler = None


class MemorySnapshot(TrainerCallback):
    """Records the CUDA allocator, with Python stacks, over the optimizer step that starts after ``step`` completed
    ones, and writes where that step's peak comes from (common.memory_at_peak) to ``path``."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path, self.baseline = step, path, None

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.step:
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(max_entries=2_000_000, context="alloc", stacks="python")

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self.baseline is None:
            return
        torch.cuda.synchronize()
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
        torch.cuda.memory._record_memory_history(enabled=None)
        self.path.write_text(f"## Step {state.global_step}\n\n{memory_at_peak(trace, self.baseline)}")
        self.baseline = None


class HostProfile(TrainerCallback):
    """cProfile over ``count`` optimizer steps from the one that starts after ``step`` completed ones: which Python
    functions a host-bound step (the GPU idle between launches) spends its time in. Writes the functions with the
    most own time, then the most cumulative time, to ``path``, under a first line that says which threads were
    profiled (see the module doc)."""

    def __init__(self, step: int, path: Path, count: int = 1, rows: int = 60) -> None:
        self.step, self.path, self.count, self.rows = step, path, count, rows
        self.profiler = cProfile.Profile()

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if self.step <= state.global_step < self.step + self.count:
            self.profiler.enable()

    def on_step_end(self, args, state, control, **kwargs) -> None:  # global_step counts this step now
        if self.step < state.global_step <= self.step + self.count:
            self.profiler.disable()
        if state.global_step == self.step + self.count:
            text = io.StringIO()
            stats = pstats.Stats(self.profiler, stream=text)
            threads = "every thread" if sys.version_info >= (3, 12) else "the main thread"
            text.write(f"cProfile of {threads} over {self.count} step(s) from step {self.step + 1}\n")
            stats.sort_stats("tottime").print_stats(self.rows)
            stats.sort_stats("cumulative").print_stats(self.rows)
            self.path.write_text(text.getvalue())


def child_argv(args: argparse.Namespace, name: str) -> list[str]:
    argv = ["--layers", args.layers, "--hidden", args.hidden, "--seq", args.seq, "--batch", args.batch,
            "--gradient_accumulation_steps", args.gradient_accumulation_steps, "--warmup", args.warmup,
            "--steps", args.steps, "--profile_steps", args.profile_steps, "--out", args.out,
            "--child", name]
    if args.max_tokens_cap is not None:
        argv += ["--max_tokens_cap", args.max_tokens_cap]
    flags = [flag for flag in ("gradient_checkpointing", "max_seq_search", "profile", "host_profile", "memory_snapshot")
             if getattr(args, flag)]
    return [str(a) for a in argv] + [f"--{flag}" for flag in flags]


def run_variant(name: str, args: argparse.Namespace, timeout: float, gpu: str | None = None) -> dict:
    """The variant in a fresh process (on GPU ``gpu`` alone when given), so an OOM or a crash costs one row; its log
    goes to OUT/<name>.log. A failed row says why in "failure": oom, killed (by a signal, e.g. the kernel's OOM
    killer), timeout or error."""
    result_file = args.out / f"{name}.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), *child_argv(args, name)]
    env = {**child_env(), **variant_env(name), **({} if gpu is None else {"CUDA_VISIBLE_DEVICES": gpu})}
    start = time.perf_counter()
    returncode = run_logged(command, args.out / f"{name}.log", timeout, env=env)
    row = {"variant": name, "flags": command_line(name), "wall_s": time.perf_counter() - start}
    if returncode == 0 and result_file.is_file():
        return {**row, **json.loads(result_file.read_text())}
    if returncode is None:
        return {**row, "ok": False, "failure": "timeout", "error": f"timed out after {timeout:.0f} s"}
    if returncode < 0:
        failure = "killed"
    else:
        failure = "oom" if is_oom((args.out / f"{name}.log").read_text(errors="replace")[-20000:]) else "error"
    return {**row, "ok": False, "failure": failure, "error": f"exit {returncode}: {last_error(name, args)}"}


def last_error(name: str, args: argparse.Namespace) -> str:
    lines = [line.strip() for line in (args.out / f"{name}.log").read_text(errors="replace").splitlines()]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return (errors[-1] if errors else (lines[-1] if lines else "no output"))[:200]


def table(rows: list[dict]) -> str:
    out = ["| variant | flags | notes | tokens/s/GPU | all steps' tokens/s | MFU | step s (min–max) | Python GC s/step "
           "| peak GiB | loss first → last | token acc first → last |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["ok"]:
            out.append(f"| {r['variant']} | `{r['flags']}` | **failed**: {r['error']} | | | | | | | | |")
            continue
        fastest, slowest = r["step_time_range_s"]
        out.append(
            f"| {r['variant']} | `{r['flags']}` | {r['notes']} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s_all_steps']:,.0f} | "
            f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%')} | {r['step_time_s']:.3f} ({fastest:.3f}–"
            f"{slowest:.3f}) | {r['gc_s_per_step']:.3f} | "
            f"{fmt(r['peak_gib'], '.1f')} | {fmt(r['first_loss'], '.4f')} → {fmt(r['last_loss'], '.4f')} | "
            f"{fmt(r['first_accuracy'], '.4f')} → {fmt(r['last_accuracy'], '.4f')} |"
        )
    return "\n".join(out)


def repeats_table(rows: list[dict], variants: list[str]) -> str:
    """Per variant, tokens/s of each repeat and their median, and its ratio to the first variant: the median of the
    ratios within each repeat (both processes ran back to back, on the host as it was then), at the median step,
    over all timed steps, and over all timed steps less the time the Python collector took in them."""
    first = variants[0]
    by_repeat = {(r["variant"], r["repeat"]): r for r in rows if r["ok"]}
    repeats = sorted({r["repeat"] for r in rows})
    measures = ("tokens_per_s", "tokens_per_s_all_steps", "tokens_per_s_outside_gc")
    out = [f"| variant | tokens/s per repeat | median | all steps' tokens/s, median | the same less GC time, median | "
           f"vs {first}: per repeat | vs {first}: median (all steps; less GC time) |", "|---|---|---|---|---|---|---|"]
    for name in variants:
        own = [by_repeat[name, i] for i in repeats if (name, i) in by_repeat]
        if not own:
            out.append(f"| {name} | failed in every repeat | | | | | |")
            continue
        ratios = {key: [by_repeat[name, i][key] / by_repeat[first, i][key]
                        for i in repeats if (name, i) in by_repeat and (first, i) in by_repeat] for key in measures}
        step, all_steps, less_gc = (f"{statistics.median(ratios[key]):.2f}×" if ratios[key] else "-"
                                    for key in measures)
        speeds = [r["tokens_per_s"] for r in own]
        out.append(
            f"| {name} | {', '.join(f'{x:,.0f}' for x in speeds)} | "
            + " | ".join(f"{statistics.median(r[key] for r in own):,.0f}" for key in measures)
            + f" | {', '.join(f'{x:.2f}×' for x in ratios['tokens_per_s'])} | {step} ({all_steps}; {less_gc}) |"
        )
    return "\n".join(out)


def chart(path: Path, labels: list[str], panels: dict[str, list[float]]) -> None:
    """Horizontal bars, one panel per quantity, when matplotlib is installed (an optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no chart {path}", flush=True)
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 1.5 + 0.5 * len(labels)), squeeze=False)
    for ax, (xlabel, values) in zip(axes[0], panels.items(), strict=True):
        ax.barh(labels, values)
        ax.set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def search_max_seq(probe: Callable[[int, float], dict], start: int, step: int, budget_s: float, timeout: float,
                   clock: Callable[[], float] = time.monotonic, min_probe_s: float = MIN_PROBE_S) -> dict:
    """The longest multiple of `step` that fits: double from `start` until a probe fails, then bisect between the
    longest fit and the shortest failure down to `step`. probe(seq, timeout) returns a run_variant row; an OOM, a
    killed process or a timeout means "does not fit". An error (a bug is not a memory limit) or the end of
    `budget_s` stops the search, and "stopped" says so; "longest" is then a lower bound."""
    deadline = clock() + budget_s
    fit, fail, probes, stopped = 0, None, [], None  # fit 0: nothing has fit yet
    while fail is None or fail - fit > step:
        seq = (fit * 2 if fit else start) if fail is None else (fit + fail) // 2 // step * step
        left = deadline - clock()
        if left < min_probe_s:
            stopped = f"time budget ({budget_s:.0f} s) spent"
            break
        row = probe(seq, min(timeout, left))
        probes.append({"seq": seq, **row})
        if row["ok"]:
            fit = seq
        elif row["failure"] == "timeout" and left < timeout:
            stopped = f"time budget ({budget_s:.0f} s) spent during the probe at {seq:,}"
            break
        elif row["failure"] in ("oom", "killed", "timeout"):
            fail = seq
        else:
            stopped = f"error at {seq:,}: {row['error']}"
            break
    first_fail = next((p for p in probes if p["seq"] == fail), None)
    return {"longest": fit, "at_longest": next((p for p in probes if p["seq"] == fit), None),
            "first_fail": fail, "fail_reason": first_fail and first_fail["failure"], "stopped": stopped,
            "probes": probes}


def run_search(args: argparse.Namespace) -> list[dict]:
    """search_max_seq for each variant, each probe a fresh process under OUT/probes/<variant>-<seq>/. One at a time,
    the variants share --budget_s evenly, a variant's unused time going to the next; with --search_gpus they run at
    once, each on its own GPU with the whole budget."""

    def search(name: str, budget_s: float, gpu: str | None) -> dict:
        def probe(seq: int, timeout: float) -> dict:
            probe_args = argparse.Namespace(**{**vars(args), "seq": seq, "out": args.out / "probes" / f"{name}-{seq}"})
            probe_args.out.mkdir(parents=True, exist_ok=True)
            row = run_variant(name, probe_args, timeout, gpu)
            done = f"fits, {row['tokens_per_s']:,.0f} tokens/s" if row["ok"] else f"{row['failure']}: {row['error']}"
            print(f"{name} seq {seq:,}: {done} ({row['wall_s']:.0f} s)", flush=True)
            return row

        result = search_max_seq(probe, args.start_seq, args.seq_step, budget_s, args.timeout)
        return {"variant": name, "flags": command_line(name), "gpu": gpu, **result}

    if args.search_gpus:
        with ThreadPoolExecutor(len(args.variants)) as pool:
            return list(pool.map(search, args.variants, [args.budget_s] * len(args.variants), args.search_gpus))
    deadline = time.monotonic() + args.budget_s
    return [search(name, (deadline - time.monotonic()) / (len(args.variants) - index), None)
            for index, name in enumerate(args.variants)]


def search_summary(results: list[dict], args: argparse.Namespace) -> str:
    """The setting, and ours / the defaults: longest trainable length, and tokens/s at a length both trained."""
    lines = [f"Longest --seq (multiples of {args.seq_step}, batch {args.batch}) that trains {args.warmup + args.steps} "
             f"steps: --layers {args.layers} --hidden {args.hidden}, gradient checkpointing, LoRA; tokens/s is the "
             f"median of {args.steps} steps after {args.warmup}."]
    base = next((r for r in results if r["variant"] == SEARCH_VARIANTS[0] and r["longest"]), None)
    for ours in (r for r in results if base is not None and r is not base and r["longest"]):
        bound = " (a lower bound: no failure seen)" if ours["first_fail"] is None else ""
        bound += " (the defaults' is a lower bound, so this overstates)" if base["first_fail"] is None else ""
        lines.append(f"{ours['variant']} / {base['variant']} longest trainable sequence: "
                     f"{ours['longest']:,} / {base['longest']:,} = {ours['longest'] / base['longest']:.2f}×{bound} "
                     "(target ≥ 2×).")
        ours_at_base = next((p for p in ours["probes"] if p["seq"] == base["longest"] and p["ok"]), None)
        if ours_at_base:
            lines.append(f"At {base['longest']:,} tokens (the defaults' longest): {ours['variant']} "
                         f"{ours_at_base['tokens_per_s']:,.0f} tokens/s against "
                         f"{base['at_longest']['tokens_per_s']:,.0f} = "
                         f"{ours_at_base['tokens_per_s'] / base['at_longest']['tokens_per_s']:.2f}×.")
    return "\n".join(lines)


def search_table(results: list[dict]) -> str:
    out = ["| variant | flags | longest seq that trains | tokens/s at it | step s | peak GiB | first failing seq | "
           "probes (seq: outcome) | search |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fit = r["at_longest"]
        longest = f"{'≥ ' if r['first_fail'] is None and fit else ''}{r['longest']:,}" if fit else "none"
        measured = (f"{fit['tokens_per_s']:,.0f} | {fit['step_time_s']:.2f} | {fmt(fit['peak_gib'], '.1f')}"
                    if fit else "| |")
        first_fail = "-" if r["first_fail"] is None else f"{r['first_fail']:,} ({r['fail_reason']})"
        probes = ", ".join(f"{p['seq']:,}: {'fit' if p['ok'] else p['failure']}" for p in r["probes"])
        out.append(f"| {r['variant']} | `{r['flags']}` | {longest} | {measured} | {first_fail} | {probes} | "
                   f"{'stopped: ' + r['stopped'] if r['stopped'] else 'done'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        if args.max_tokens_cap is not None and args.batch * args.seq > args.max_tokens_cap:
            raise torch.OutOfMemoryError(f"{args.batch * args.seq} tokens > --max_tokens_cap {args.max_tokens_cap}")
        result = run_child(args)
        (args.out / f"{args.child}.json").write_text(json.dumps(result))
        return 0
    if args.max_seq_search:
        results = run_search(args)
        (args.out / "max_seq.json").write_text(json.dumps(results, indent=1))
        chart(args.out / "max_seq.png", [r["variant"] for r in results],
              {"longest sequence that trains (tokens)": [r["longest"] for r in results],
               "tokens/s at it": [r["at_longest"]["tokens_per_s"] if r["at_longest"] else 0 for r in results]})
        print(search_summary(results, args))
        print(search_table(results))
        return 0 if all(r["longest"] and not (r["stopped"] or "").startswith("error") for r in results) else 1
    start = time.perf_counter()
    rows = []
    for repeat in range(args.repeats):
        run_args = args
        if args.repeats > 1:
            run_args = argparse.Namespace(**{**vars(args), "out": args.out / f"repeat{repeat}"})
            run_args.out.mkdir(exist_ok=True)
        for name in args.variants:
            left = TIME_BUDGET_S - (time.perf_counter() - start)
            if left < 30:
                rows.append({"variant": name, "flags": "", "ok": False, "error": "not run: time budget spent"})
            else:
                rows.append(run_variant(name, run_args, min(args.timeout, left)))
            rows[-1]["repeat"] = repeat
            print(f"{name}: {'ok' if rows[-1]['ok'] else rows[-1]['error']}", flush=True)
    (args.out / "e2e.json").write_text(json.dumps(rows, indent=1))
    ok = [r for r in rows if r["ok"]]
    chart(args.out / "e2e.png", [r["variant"] + (f" #{r['repeat']}" if args.repeats > 1 else "") for r in ok],
          {"tokens/s per GPU": [r["tokens_per_s"] for r in ok], "MFU (%)": [100 * (r["mfu"] or 0) for r in ok],
           "peak memory (GiB)": [r["peak_gib"] or 0 for r in ok]})
    print(table(rows))
    if args.repeats > 1:
        print(repeats_table(rows, args.variants))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
