"""benchmarks/moe_block.py on the CPU (Triton interpreter, fp32): every implementation that runs without a GPU goes
through run_case, so a broken benchmark shows here and not after a GPU machine has started."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import moe_block  # noqa: E402
import torch  # noqa: E402

TINY = moe_block.Case("tiny", hidden=64, inter=32, experts=8, top_k=2, tokens=40, routing="skewed", with_eager=True)


@pytest.fixture(autouse=True)
def registered():
    moe_block.register_scattermoe()


def test_every_cpu_implementation_agrees_with_grouped_mm_in_fp32():
    implementations = ["eager", "grouped_mm", "scattermoe", moe_block.SCATTERMOE_WGRAD_TRITON,
                       moe_block.SCATTERMOE_WGRAD_GROUPED_MM]
    rows = moe_block.run_case(TINY, implementations, repeats=1, dtype=torch.float32)
    assert [row["impl"] for row in rows] == implementations
    for row in rows:
        assert row["err_out"] <= 1e-4 and row["err_grads"] <= 1e-4, row
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
    assert "| tiny | 40 | skewed" in moe_block.markdown_table(rows)


def test_a_failing_implementation_is_logged_and_skipped(caplog):
    rows = moe_block.run_case(TINY, ["grouped_mm", "no_such_implementation", "scattermoe"], 1, torch.float32)
    assert [row["impl"] for row in rows] == ["grouped_mm", "scattermoe"]
    assert "no_such_implementation failed at tiny" in caplog.text
