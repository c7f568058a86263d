"""Gradient clipping then a fused AdamW step (the Trainer's way), against the clip inside the step
(``--fused_grad_clipping``) and against both under ``torch.compile`` (PyTorch's compiled-optimizer recipe: foreach
AdamW, a tensor learning rate, capturable), on the parameters of a Qwen3-30B-A3B-shaped model of --layers decoder
layers (e2e.py's 8-layer model by default, 5.6 billion parameters), in --dtype, with gradients whose norm is above
max_norm so that every step clips.

    python benchmarks/grad_clipping.py [--layers 8] [--dtype bfloat16] [--repeats 10] [--hidden full|small]
        [--ways clip_then_step clip_in_step compiled]

Prints each way's median time of clip + step, its speed-up over the Trainer's way, its first call (the compile,
for the compiled way; it grows with the number of tensors, not their size) and how far its update over a clipped
step and an unclipped one is from the Trainer's way's.
--hidden small shrinks the model so that the script runs on a CPU in seconds (a smoke test, not a benchmark).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import QWEN3_30B_A3B, median_ms  # noqa: E402

from turbo_tune.grad_clipping import clip_in_step  # noqa: E402

WAYS = {
    "clip_then_step": "clip_grad_norm_, then fused AdamW (the Trainer's way)",
    "clip_in_step": "the clip inside fused AdamW's step (--fused_grad_clipping)",
    "compiled": "clip_grad_norm_ and foreach AdamW under one torch.compile",
}
LR = 1e-3  # large enough that one step moves bf16 weights of 0.02, so the updates can be compared
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


def make(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: str, way: str):
    generator = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator, device=device, dtype=dtype) * 0.02)
              for s in shapes]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator, device=device, dtype=dtype)
    if way == "compiled":
        capturable = device == "cuda"
        optimizer = torch.optim.AdamW(params, lr=torch.tensor(LR) if capturable else LR, foreach=True,
                                      capturable=capturable)

        @torch.compile
        def step() -> None:
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0, foreach=True)
            optimizer.step()

        return params, step
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True)

    def step() -> None:
        if way == "clip_in_step":
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
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    shapes = model_shapes(QWEN3_30B_A3B if args.hidden == "full" else SMALL, args.layers)
    row = {"layers": args.layers, "dtype": args.dtype, "parameters": sum(torch.Size(s).numel() for s in shapes),
           "tensors": len(shapes)}
    updates = {}
    for way in ["clip_then_step", *(w for w in args.ways if w != "clip_then_step")]:
        params, step = make(shapes, dtype, device, way)
        before = [p.detach().to("cpu", torch.float32, copy=True) for p in params[:3]]  # layer 0's experts and router
        start = time.perf_counter()
        step()  # AdamW's state (and the compile), a clipped step
        if device == "cuda":
            torch.cuda.synchronize()
        row[f"{way}_first_s"] = time.perf_counter() - start
        grads = [p.grad for p in params]
        shrink = 0.5 / torch.nn.utils.get_total_norm(grads)
        torch._foreach_mul_(grads, shrink)
        step()  # an unclipped step: Adam's update is blind to a scale common to all steps, not to the clip's ratio
        torch._foreach_div_(grads, shrink)
        updates[way] = [p.detach().float().cpu() - b for p, b in zip(params[:3], before, strict=True)]
        row[f"{way}_ms"] = median_ms(step, warmup=1, repeats=args.repeats)
        row[f"{way}_speedup"] = row["clip_then_step_ms"] / row[f"{way}_ms"]
        row[f"{way}_update_rel_diff"] = max(((a - b).norm() / b.norm()).item()
                                            for a, b in zip(updates[way], updates["clip_then_step"], strict=True))
        del params, step
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, {row['parameters'] / 1e9:.2f} billion "
          f"{args.dtype} parameters in {len(shapes)} tensors ({args.layers} layers), AdamW, every step clipped\n")
    print("| way | clip + step ms | speed-up | first call s | update vs clip, then step: relative difference |")
    print("|---|---|---|---|---|")
    for way in updates:
        print(f"| {WAYS[way]} | {row[f'{way}_ms']:.2f} | {row[f'{way}_speedup']:.3f}× | {row[f'{way}_first_s']:.1f} | "
              f"{row[f'{way}_update_rel_diff']:.1e} |")
    return row


if __name__ == "__main__":
    main()
