"""benchmarks/fp32_first_call.py on the CPU: both tile lists run the experts and time each new shape."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fp32_first_call  # noqa: E402

from monkey_patch.scattermoe import kernels  # noqa: E402


@pytest.mark.parametrize("tiles", ["fp32", "bf16"])
def test_first_calls_are_timed_with_either_tile_list(tiles, monkeypatch):
    monkeypatch.setattr(kernels, "_FP32_TWINS", dict(kernels._FP32_TWINS))  # --tiles bf16 replaces the twins
    seconds = fp32_first_call.main(["--tiles", tiles, "--shapes", "1"])
    assert len(seconds) == 1 and seconds[0] > 0
    twins_in_use = all(twin is not kernel for kernel, twin in kernels._FP32_TWINS.items())
    assert twins_in_use == (tiles == "fp32")
