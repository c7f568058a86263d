"""`--use_fp8` on one GPU (H100/H200): correctness, speed and memory, and a short training run, in one command.

(a) correctness: a Qwen3-30B-A3B-shaped model (4 layers, random init) and one batch: loss and gradients of each
    FP8 variant against bf16, before any optimizer step.
(b) speed: forward + backward + AdamW step on that model (hidden 2048, 128 experts, top-8, moe_intermediate 768,
    vocab 151936, 2 × 4096 tokens); median of CUDA-event timings after warm-up, tokens/s and peak memory
    (weights, gradients and AdamW states included). Variants are applied to and reverted from one model.
(c) training: qwen3_sft.py on the embedded task for --sft_steps steps, bf16 against FP8, losses compared.

    python benchmarks/fp8.py [--out DIR] [--compile] [--sft_steps 200] [--skip_sft | --sft_only]

Logs and results go to --out (default: $OUT when set, else ./fp8_bench). Markdown tables are printed last.
"""

import argparse
import json
import logging
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from common import QWEN3_30B_A3B, fmt, relative_error, run_qwen3_sft
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from monkey_patch.fast_moe import apply_fast_moe_block, revert_fast_moe_block
from monkey_patch.fp8 import apply_fp8, revert_fp8

GIB = 1024**3
logger = logging.getLogger("fp8_bench")

# name → (--fp8_recipe, or None for no FP8; --fp8_modules; --fp8_experts; --use_fast_moe_block)
VARIANTS = {
    "bf16": (None, "", False, False),
    "fp8_brief": ("tensorwise", "brief", False, False),
    "fp8_brief_rowwise": ("rowwise", "brief", False, False),
    "fp8_all_linear": ("tensorwise", "all_linear", False, False),
    "fp8_brief_experts": ("tensorwise", "brief", True, False),
    "scattermoe": (None, "", False, True),
    "scattermoe_fp8_brief": ("tensorwise", "brief", False, True),
}
SFT_VARIANTS = {
    "bf16": [],
    "fp8_brief": ["--use_fp8"],
    "fp8_all_linear_experts": ["--use_fp8", "--fp8_modules", "all_linear", "--fp8_experts"],
}
GRADIENTS = ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.gate.weight",
             "model.layers.2.mlp.experts.down_proj", "model.embed_tokens.weight")


def model_config(layers: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        **QWEN3_30B_A3B, num_hidden_layers=layers, norm_topk_prob=True, output_router_logits=True,
        router_aux_loss_coef=0.001, max_position_embeddings=8192,
    )


def apply_variant(model: torch.nn.Module, name: str) -> None:
    recipe, modules, experts, fast_moe = VARIANTS[name]
    if fast_moe:
        apply_fast_moe_block(model)
    if recipe is not None:
        apply_fp8(model, recipe, modules, experts=experts)


def revert_variant(model: torch.nn.Module) -> None:
    revert_fp8(model)
    revert_fast_moe_block(model)  # back to transformers' grouped_mm


def loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    output = model(**batch)
    output.loss.backward()  # transformers has added router_aux_loss_coef × aux_loss to it
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if name in GRADIENTS}
    model.zero_grad(set_to_none=True)
    return output.loss.item(), grads


def correctness(model: torch.nn.Module, batch: dict, names: list[str]) -> list[dict]:
    """Same weights, same batch: each variant's loss and a few gradients against bf16's."""
    reference_loss, reference_grads = loss_and_grads(model, batch)
    rows = [{"variant": "bf16", "loss": reference_loss, "loss_rel": 0.0, "grad_rel": 0.0}]
    for name in names:
        if name == "bf16":
            continue
        try:
            apply_variant(model, name)
            loss, grads = loss_and_grads(model, batch)
            rows.append({"variant": name, "loss": loss, "loss_rel": abs(loss - reference_loss) / reference_loss,
                         "grad_rel": max(relative_error(grads[k], reference_grads[k]) for k in reference_grads)})
        except Exception as error:  # keep going: one broken variant must not hide the others
            logger.error("correctness %s failed:\n%s", name, traceback.format_exc())
            rows.append({"variant": name, "error": f"{type(error).__name__}: {error}"[:200]})
        finally:
            revert_variant(model)
    return rows


def time_variant(model: torch.nn.Module, batch: dict, name: str, warmup: int, repeats: int, compile_: bool) -> dict:
    """Median step time of forward + backward + AdamW on the variant; peak memory over the whole loop."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    apply_variant(model, name)
    step_model = torch.compile(model) if compile_ else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    times = []
    try:
        for step in range(warmup + repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            output = step_model(**batch)
            output.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end.record()
            torch.cuda.synchronize()
            if step >= warmup:
                times.append(start.elapsed_time(end) / 1000)
        seconds = statistics.median(times)
        tokens = batch["input_ids"].numel()
        return {"variant": name, "step_s": seconds, "tokens_per_s": tokens / seconds,
                "peak_gib": torch.cuda.max_memory_allocated() / GIB, "loss": output.loss.item()}
    finally:
        del optimizer
        model.zero_grad(set_to_none=True)
        revert_variant(model)
        torch._dynamo.reset()


def run_sft(name: str, flags: list[str], out: Path, steps: int, timeout_s: float) -> dict:
    ok, wall_s, history = run_qwen3_sft(
        out / "sft" / name, out / f"sft_{name}.log",
        ["--max_steps", str(steps), "--logging_steps", "10", "--bundled_examples", "4000", *flags], timeout_s,
    )
    row = {"variant": name, "flags": " ".join(flags) or "(none)", "ok": ok, "wall_s": wall_s}
    if history:
        row.update(losses=[e["loss"] for e in history], last_loss=statistics.mean(e["loss"] for e in history[-3:]),
                   last_acc=history[-1].get("mean_token_accuracy"), tokens_per_s=history[-1].get("tokens_per_s"))
    return row


def print_tables(device: str, correct: list[dict], timed: list[dict], sft: list[dict]) -> str:
    lines = [f"Device: {device}; torch {torch.__version__}", "",
             "| variant | loss (1 batch) | loss rel. diff vs bf16 | worst grad rel. err vs bf16 |", "|---|---|---|---|"]
    for r in correct:
        if "error" in r:
            lines.append(f"| {r['variant']} | **FAILED**: {r['error']} | | |")
        else:
            lines.append(f"| {r['variant']} | {r['loss']:.4f} | {r['loss_rel']:.2e} | {r['grad_rel']:.2e} |")
    baseline = next((r["tokens_per_s"] for r in timed if r["variant"] == "bf16" and "tokens_per_s" in r), None)
    lines += ["", "| variant | step s (median) | tokens/s | speedup vs bf16 | peak alloc GiB |",
              "|---|---|---|---|---|"]
    for r in timed:
        if "error" in r:
            lines.append(f"| {r['variant']} | **FAILED**: {r['error']} | | | |")
            continue
        speedup = r["tokens_per_s"] / baseline if baseline else None
        lines.append(f"| {r['variant']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {fmt(speedup, '.2f')}× | "
                     f"{r['peak_gib']:.1f} |")
    if sft:
        reference = next((r.get("last_loss") for r in sft if r["variant"] == "bf16"), None)
        lines += ["", "| qwen3_sft.py run | flags | ok | loss first → mean of last 3 logs | rel. diff vs bf16 | "
                  "token acc (last) | tokens/s (last window) | wall s |", "|---|---|---|---|---|---|---|---|"]
        for r in sft:
            rel = abs(r["last_loss"] - reference) / reference if reference and r.get("last_loss") else None
            first = r["losses"][0] if r.get("losses") else None
            lines.append(f"| {r['variant']} | `{r['flags']}` | {'yes' if r['ok'] else '**FAILED**'} | "
                         f"{fmt(first, '.3f')} → {fmt(r.get('last_loss'), '.3f')} | {fmt(rel, '.1%')} | "
                         f"{fmt(r.get('last_acc'), '.3f')} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
                         f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def correctness_and_timing(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(a) and (b) on one model, each variant applied and reverted in turn."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(model_config(args.layers), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    model.train()
    logger.info("%d-layer Qwen3-30B-A3B-shaped model: %.2fB parameters", args.layers, model.num_parameters() / 1e9)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")
    batch = {"input_ids": input_ids, "labels": input_ids}

    correct = correctness(model, batch, args.variants)
    timed = []
    for name in args.variants:
        try:
            timed.append(time_variant(model, batch, name, args.warmup, args.repeats, args.compile))
        except Exception as error:
            logger.error("timing %s failed:\n%s", name, traceback.format_exc())
            timed.append({"variant": name, "error": f"{type(error).__name__}: {error}"[:200]})
        logger.info("timed %s: %s", name, timed[-1])
    return correct, timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "fp8_bench")))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in (b) (slow to warm up)")
    parser.add_argument("--sft_steps", type=int, default=200)
    parser.add_argument("--skip_sft", action="store_true", help="(a) and (b) only")
    parser.add_argument("--sft_only", action="store_true", help="(c) only")
    parser.add_argument("--time_budget_s", type=float, default=240, help="skip (c) when (a)+(b) took longer")
    parser.add_argument("--sft_timeout_s", type=float, default=120, help="stop one qwen3_sft.py run after this")
    args = parser.parse_args()
    if args.skip_sft and args.sft_only:
        parser.error("--skip_sft and --sft_only leave nothing to run: pass one of them")
    if not torch.cuda.is_available():
        print("benchmarks/fp8.py needs a CUDA GPU with FP8 (H100/H200); this machine has none.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(args.out / "fp8_bench.log")])
    started = time.perf_counter()
    device = f"{torch.cuda.get_device_name()} (capability {'.'.join(map(str, torch.cuda.get_device_capability()))})"

    correct, timed = ([], []) if args.sft_only else correctness_and_timing(args)
    sft = []
    elapsed = time.perf_counter() - started
    if args.skip_sft:
        logger.info("(c) skipped (--skip_sft)")
    elif elapsed > args.time_budget_s:
        logger.warning("(c) skipped: (a)+(b) took %.0f s, over --time_budget_s %.0f", elapsed, args.time_budget_s)
    else:
        sft = [run_sft(name, flags, args.out, args.sft_steps, args.sft_timeout_s)
               for name, flags in SFT_VARIANTS.items()]
    results = {"device": device, "correctness": correct, "timing": timed, "sft": sft}
    (args.out / "fp8_bench.json").write_text(json.dumps(results, indent=1))
    table = print_tables(device, correct, timed, sft)
    (args.out / "fp8_bench.md").write_text(table + "\n")
    print(f"\nTotal wall time {time.perf_counter() - started:.0f} s; logs in {args.out}\n")
    print(table)
    failed = any("error" in r for r in correct + timed) or any(not r["ok"] for r in sft)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
