"""One optimizer step on one stacked expert tensor: fused AdamW against torchao's AdamW8bit (the Trainer's
``--optim adamw_torch_8bit``), for the state each keeps and the memory its step needs on top.

e2e.py's ``all_adamw8bit`` saved 2.9 GiB of peak where 8-bit moments should save ~5.8 (docs/history.md); a
step whose temporaries scale with the largest parameter (a layer's stacked ``gate_up_proj``, 403M elements at
Qwen3-30B-A3B) would explain it. Prints the optimizer state in bytes per parameter, the extra peak of a step
(GPU only) and its median time.

    python benchmarks/optimizer_step.py [--shape 128,1536,2048]
"""

import argparse
import sys
from pathlib import Path

import torch
from torchao.optim import AdamW8bit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import median_ms  # noqa: E402

GIB = 1024**3
OPTIMIZERS = {
    "AdamW (fused on a GPU)": lambda params: torch.optim.AdamW(params, fused=torch.cuda.is_available()),
    "torchao AdamW8bit": AdamW8bit,
}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the state tensors but the step counters (0-d), counting the plain tensors inside tensor subclasses
    (torchao's 8-bit states)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if not isinstance(value, torch.Tensor) or value.ndim == 0:
                continue
            inner = [getattr(value, name) for name in value.__tensor_flatten__()[0]] \
                if hasattr(value, "__tensor_flatten__") else [value]
            total += sum(t.numel() * t.element_size() for t in inner)
    return total


def measure(name: str, shape: tuple[int, ...], device: str, repeats: int) -> dict:
    param = torch.nn.Parameter(torch.randn(shape, device=device, dtype=torch.bfloat16))
    param.grad = torch.randn_like(param)
    optimizer = OPTIMIZERS[name]([param])
    optimizer.step()  # creates the state (and builds torchao's compiled step)
    row = {"optimizer": name, "state_bytes_per_param": state_bytes(optimizer) / param.numel(), "extra_peak_gib": None}
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        optimizer.step()
        torch.cuda.synchronize()
        row["extra_peak_gib"] = (torch.cuda.max_memory_allocated() - before) / GIB
    row["step_ms"] = median_ms(optimizer.step, warmup=1, repeats=repeats)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="128,1536,2048", help="the parameter's shape (default: 30B-A3B gate_up)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split(","))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [measure(name, shape, device, args.repeats) for name in OPTIMIZERS]
    print(f"\n{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, bf16 parameter {shape}\n")
    print("| optimizer | state bytes / parameter | extra peak of a step GiB | step ms |\n|---|---|---|---|")
    for row in rows:
        peak = "-" if row["extra_peak_gib"] is None else f"{row['extra_peak_gib']:.2f}"
        print(f"| {row['optimizer']} | {row['state_bytes_per_param']:.2f} | {peak} | {row['step_ms']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
