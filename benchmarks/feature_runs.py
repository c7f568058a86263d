"""Train the embedded tiny Qwen3-MoE once per feature set through qwen3_sft.py and tabulate loss, accuracy and speed.

    python benchmarks/feature_runs.py --out DIR [--steps 300] [--variants default fast_moe ...] [-- extra flags]

A smoke test of every flag on real hardware: each run is a full qwen3_sft.py process, so a flag that breaks training,
saving or merging shows up as a failed row (its log is kept in DIR/<variant>.log).
"""

import argparse
import json
import sys
from pathlib import Path

from common import fmt, run_qwen3_sft

VARIANTS = {
    "default": [],
    "fast_moe": ["--use_fast_moe_block"],
    "liger": ["--use_liger_kernel"],
    "packing": ["--use_packing"],
    "lora_merge": ["--use_lora", "--merge_lora"],
    "compile_fast_moe": ["--torch_compile", "--use_fast_moe_block"],
    "all": ["--use_fast_moe_block", "--use_liger_kernel", "--use_packing"],
}


def run_variant(name: str, flags: list[str], out: Path, steps: int, extra: list[str]) -> dict:
    ok, wall_s, history = run_qwen3_sft(
        out / name, out / f"{name}.log", ["--max_steps", str(steps), "--logging_steps", str(max(steps // 10, 1)),
                                          *flags, *extra],
    )
    row = {"variant": name, "flags": " ".join(flags) or "(none)", "ok": ok, "wall_s": wall_s}
    if history:
        row.update(first_loss=history[0]["loss"], last_loss=history[-1]["loss"],
                   first_acc=history[0].get("mean_token_accuracy"), last_acc=history[-1].get("mean_token_accuracy"),
                   tokens_per_s=history[-1].get("tokens_per_s"), peak_gib=history[-1].get("peak_memory_allocated_gib"))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args, extra = parser.parse_known_args()
    extra = [flag for flag in extra if flag != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_variant(name, VARIANTS[name], args.out, args.steps, extra) for name in args.variants]
    (args.out / "feature_runs.json").write_text(json.dumps(rows, indent=1))
    print("| variant | flags | ok | loss first → last | token acc first → last | tokens/s (last window) | "
          "peak alloc GiB | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | `{r['flags']}` | {'yes' if r['ok'] else '**FAILED**'} | "
              f"{fmt(r.get('first_loss'), '.3f')} → {fmt(r.get('last_loss'), '.3f')} | "
              f"{fmt(r.get('first_acc'), '.3f')} → {fmt(r.get('last_acc'), '.3f')} | "
              f"{fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('peak_gib'), '.2f')} | {r['wall_s']:.0f} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
