"""Gradient clipping then a fused AdamW step, against the clip inside the step (``--fused_grad_clipping``), on the
parameters of a Qwen3-30B-A3B-shaped model of --layers decoder layers (e2e.py's 8-layer model by default, 5.6 billion
parameters), in --dtype, with gradients whose norm is above --max_grad_norm so that every step clips.

    python benchmarks/grad_clipping.py [--layers 8] [--dtype bfloat16] [--repeats 10] [--hidden full|small]

Prints the median time of clip + step each way, their ratio, and how far apart the parameters are after the same
steps (the Trainer's clip multiplies the gradients in their dtype, the fused step divides in fp32). --hidden small
shrinks the model so that the script runs on a CPU in seconds (a smoke test, not a benchmark).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import QWEN3_30B_A3B, median_ms  # noqa: E402

from turbo_tune.grad_clipping import clip_in_step  # noqa: E402

SMALL = {**QWEN3_30B_A3B, "hidden_size": 64, "num_experts": 8, "moe_intermediate_size": 32,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000}


def model_shapes(shape: dict, layers: int) -> list[tuple[int, ...]]:
    """Every trainable tensor's shape: per layer the stacked experts, the router, the attention projections and
    the q/k norms, the two layer norms; then the embedding, the final norm and the LM head."""
    h, e, i = shape["hidden_size"], shape["num_experts"], shape["moe_intermediate_size"]
    q, kv, d = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"], \
        shape["head_dim"]
    layer = [(e, 2 * i, h), (e, h, i), (e, h), (q, h), (kv, h), (kv, h), (h, q), (d,), (d,), (h,), (h,)]
    return layer * layers + [(shape["vocab_size"], h), (h,), (shape["vocab_size"], h)]


def make(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: str, fused_clip: bool):
    generator = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator, device=device, dtype=dtype) * 0.02)
              for s in shapes]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator, device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)

    def step() -> None:
        if fused_clip:
            clip_in_step(optimizer, params, max_norm=1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        optimizer.step()

    return params, step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--hidden", choices=["full", "small"], default="full")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    shapes = model_shapes(QWEN3_30B_A3B if args.hidden == "full" else SMALL, args.layers)
    row = {"layers": args.layers, "dtype": args.dtype, "parameters": sum(torch.Size(s).numel() for s in shapes)}
    after = {}
    for name, fused_clip in (("clip_then_step", False), ("clip_in_step", True)):
        params, step = make(shapes, dtype, device, fused_clip)
        step()  # AdamW's state, and one step to compare
        after[name] = [p.detach().float().cpu() for p in params[:3]]  # the experts and the router of layer 0
        row[f"{name}_ms"] = median_ms(step, warmup=1, repeats=args.repeats)
        del params, step
        if device == "cuda":
            torch.cuda.empty_cache()
    row["speedup"] = row["clip_then_step_ms"] / row["clip_in_step_ms"]
    row["param_rel_diff"] = max(((a - b).norm() / b.norm()).item()
                                for a, b in zip(after["clip_in_step"], after["clip_then_step"], strict=True))
    print(f"\n{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, {row['parameters'] / 1e9:.2f} billion "
          f"{args.dtype} parameters ({args.layers} layers), AdamW fused, every step clipped\n")
    print("| clip, then step ms | clip in the step ms | speed-up | parameters after one step, relative difference |")
    print("|---|---|---|---|")
    print(f"| {row['clip_then_step_ms']:.2f} | {row['clip_in_step_ms']:.2f} | {row['speedup']:.3f}× | "
          f"{row['param_rel_diff']:.1e} |")
    return row


if __name__ == "__main__":
    main()
