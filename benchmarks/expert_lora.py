"""LoRA on attention and experts at the Qwen3-30B-A3B shape: peft's target_parameters path against scattermoe's.

Builds Qwen3-30B-A3B from its config (random bf16 init, nothing downloaded), puts LoRA rank 16 on q/k/v/o and
on the experts' gate_up_proj and down_proj, and times AdamW training steps (forward, backward, step) on one
sequence of 4096 tokens:

- ``peft``: transformers' default experts (grouped_mm) and SDPA; peft folds W + s·B·A into every expert's
  weight on each forward (and again in the recompute), and backward forms the full expert-stack gradient.
- ``scattermoe``: the same model and adapters with ``--use_fast_moe_block``: LoRA as x·Aᵀ·Bᵀ over routed rows.
- ``scattermoe_fp8``: ``scattermoe`` with ``--fp8_frozen_experts`` (frozen expert weights stored in FP8).

Each (path, gradient checkpointing) pair runs in its own subprocess, so an out-of-memory is a table row.
Reports the median step time, tokens/s, peak allocated memory, and the peak above the frozen weights; the
first and last losses show both paths train the same model; --profile adds each run's costliest GPU kernels and
host-side ops of one more step. Logs go to --out (default: $OUT, else ./expert_lora_bench); the markdown table is
printed last. One H200, under 8 minutes:

    python benchmarks/expert_lora.py            # --layers 8 for a quicker look
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import QWEN3_30B_A3B, ROOT, child_env, is_oom, step_profile

GIB = 1024**3
RESULT = "RESULT "
PATHS = ("peft", "scattermoe", "scattermoe_fp8")


def qwen3_30b_a3b(layers: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **QWEN3_30B_A3B, num_hidden_layers=layers, norm_topk_prob=True, output_router_logits=True,
        router_aux_loss_coef=0.001, max_position_embeddings=40960, rope_parameters={"rope_type": "default",
        "rope_theta": 1e6}, rms_norm_eps=1e-6, tie_word_embeddings=False, use_cache=False,
    )


def worker(args: argparse.Namespace) -> dict:
    """One path, one process: build, wrap, train, measure."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from monkey_patch.fast_moe import apply_fast_moe_block, hand_expert_lora_to_scattermoe
    from monkey_patch.frozen_experts import apply_fp8_frozen_experts

    torch.manual_seed(0)
    device = torch.device("cuda")
    config = qwen3_30b_a3b(args.layers)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    if args.path != "peft":
        apply_fast_moe_block(model)
    experts_implementation = model.config._experts_implementation
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if args.path != "peft":
        hand_expert_lora_to_scattermoe(model)  # as qwen3_sft's apply_peft_patches: peft wrapped after the patch
    if args.path == "scattermoe_fp8":
        apply_fp8_frozen_experts(model)
        torch.cuda.empty_cache()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator(device=device).manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (1, args.seq), device=device, generator=generator)
    torch.cuda.synchronize()
    weights_gib = torch.cuda.memory_allocated() / GIB

    def step() -> float:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step() for _ in range(args.warmup)]  # the first step also autotunes the Triton kernels
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step())  # .item() synchronizes
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    if args.profile_to:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as profiler:
            start = time.perf_counter()
            step()
            wall_s = time.perf_counter() - start
        args.profile_to.write_text(step_profile(profiler.key_averages(), on_gpu=True, rows=25, wall_s=wall_s))
    return {
        "experts": experts_implementation, "step_s": step_s, "tokens_per_s": args.seq / step_s,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB, "weights_gib": weights_gib,
        "first_loss": losses[0], "last_loss": losses[-1], "trainable": sum(p.numel() for p in params),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
    }


def run_one(args: argparse.Namespace, path: str, checkpointing: bool, timeout: float) -> dict:
    """The worker in a subprocess; its failure (OOM, crash, timeout) becomes the row's status."""
    name = f"{path}-{'ckpt' if checkpointing else 'no-ckpt'}"
    command = [sys.executable, __file__, "--worker", path, "--layers", str(args.layers), "--seq", str(args.seq),
               "--rank", str(args.rank), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if checkpointing:
        command.append("--checkpointing")
    if args.profile:
        command += ["--profile_to", str(args.out / f"{name}.profile.md")]
    row = {"path": path, "checkpointing": checkpointing}
    log_path = args.out / f"{name}.log"
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(command)} (log {log_path})", flush=True)
    env = child_env()
    try:
        with open(log_path, "w") as log:
            completed = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                       timeout=timeout)
        log_text = completed.stdout
    except subprocess.TimeoutExpired:
        return {**row, "status": f"timeout after {timeout:.0f} s"}
    with open(log_path, "a") as log:
        log.write(log_text)
    results = [line[len(RESULT):] for line in log_text.splitlines() if line.startswith(RESULT)]
    if completed.returncode == 0 and results:
        return {**row, "status": "ok", **json.loads(results[-1])}
    tail = log_path.read_text()[-4000:]
    return {**row, "status": "OOM" if is_oom(tail) else f"failed (exit {completed.returncode})"}


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    device = next((f"{r['device']}, torch {r['torch']}" for r in rows if r["status"] == "ok"), "no successful run")
    lines = [
        f"Qwen3-30B-A3B shape, {args.layers} layers, LoRA r={args.rank} on q/k/v/o and experts (gate_up, down), "
        f"seq {args.seq} batch 1, AdamW; median of {args.steps} steps after {args.warmup}. {device}.",
        "",
        "| expert LoRA path | experts | grad. ckpt | status | step s | tokens/s | peak GiB | peak − weights GiB "
        "| loss first → last |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ckpt = "on" if r["checkpointing"] else "off"
        if r["status"] != "ok":
            lines.append(f"| {r['path']} | | {ckpt} | {r['status']} | | | | | |")
            continue
        lines.append(
            f"| {r['path']} | {r['experts']} | {ckpt} | ok | {r['step_s']:.2f} | {r['tokens_per_s']:,.0f} "
            f"| {r['peak_gib']:.1f} | {r['peak_gib'] - r['weights_gib']:.1f} "
            f"| {r['first_loss']:.4f} → {r['last_loss']:.4f} |"
        )
    for ckpt in (True, False):
        done = {r["path"]: r for r in rows if r["checkpointing"] == ckpt and r["status"] == "ok"}
        peft = done.get("peft")
        for path, ours in done.items():
            if peft is None or path == "peft":
                continue
            extra_ours, extra_peft = (r["peak_gib"] - r["weights_gib"] for r in (ours, peft))
            lines.append(
                f"\nGradient checkpointing {'on' if ckpt else 'off'}: {path}/peft tokens/s "
                f"{ours['tokens_per_s'] / peft['tokens_per_s']:.2f}×, peak memory "
                f"{ours['peak_gib'] / peft['peak_gib']:.2f}×, peak above weights {extra_ours / extra_peft:.2f}×."
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="(worker) gradient checkpointing on")
    parser.add_argument("--modes", default="ckpt,no-ckpt", help="gradient checkpointing modes to run")
    parser.add_argument("--paths", default=",".join(("scattermoe", "scattermoe_fp8", "peft")),
                        help=f"comma-separated among {', '.join(PATHS)}")
    parser.add_argument("--budget_s", type=float, default=450, help="wall-clock budget for all runs")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "expert_lora_bench")))
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step per run: its costliest GPU kernels in OUT/<run>.profile.md")
    parser.add_argument("--profile_to", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.path = args.worker
        print(RESULT + json.dumps(worker(args)), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(path, mode == "ckpt") for mode in args.modes.split(",") for path in args.paths.split(",")]
    deadline = time.monotonic() + args.budget_s
    rows = []
    for index, (path, checkpointing) in enumerate(runs):
        # a run may take what is left but 45 s for each later one (the first also compiles and autotunes)
        timeout = deadline - time.monotonic() - 45 * (len(runs) - index - 1)
        if timeout < 30:
            rows.append({"path": path, "checkpointing": checkpointing, "status": "skipped (time budget)"})
            continue
        rows.append(run_one(args, path, checkpointing, timeout=timeout))
        print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows, args)
    (args.out / "expert_lora.md").write_text(table + "\n")
    (args.out / "expert_lora.json").write_text(json.dumps(rows, indent=1))
    print("\n" + table)


if __name__ == "__main__":
    main()
