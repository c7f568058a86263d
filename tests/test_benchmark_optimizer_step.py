import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import grad_clipping  # noqa: E402
import optimizer_step  # noqa: E402


def test_eight_bit_adamw_keeps_half_the_state_of_bf16_adamw():
    """Two bf16 moments are 4 bytes per parameter; torchao's two 8-bit states 2 plus their block scales."""
    rows = {row["optimizer"]: row for row in optimizer_step.main(["--shape", "4,256,512", "--repeats", "2"])}
    assert rows["AdamW (fused on a GPU)"]["state_bytes_per_param"] == 4
    assert 2.0 < rows["torchao AdamW8bit"]["state_bytes_per_param"] < 2.1
    assert all(row["step_ms"] > 0 for row in rows.values())


def test_grad_clipping_benchmark_times_both_fused_ways_to_the_same_update():
    row = grad_clipping.main(["--hidden", "small", "--layers", "2", "--dtype", "float32", "--repeats", "2",
                              "--ways", "clip_then_step", "clip_in_step"])
    assert row["parameters"] == sum(torch.Size(s).numel() for s in grad_clipping.model_shapes(grad_clipping.SMALL, 2))
    assert row["clip_then_step_ms"] > 0 and row["clip_in_step_ms"] > 0 and row["clip_in_step_speedup"] > 0
    assert 0 < row["clip_in_step_update_rel_diff"] < 1e-6  # fp32: the multiply and the division round apart, by little
    assert "compiled_ms" not in row


def test_grad_clipping_benchmark_compiles_clip_and_step_into_the_same_update():
    row = grad_clipping.main(["--hidden", "small", "--layers", "1", "--dtype", "float32", "--repeats", "2",
                              "--ways", "compiled"])
    assert row["compiled_ms"] > 0 and row["compiled_first_s"] > 0
    assert 0 < row["compiled_update_rel_diff"] < 1e-4  # foreach AdamW, fused by Inductor: another order of operations
