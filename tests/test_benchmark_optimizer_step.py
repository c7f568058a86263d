import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import optimizer_step  # noqa: E402


def test_eight_bit_adamw_keeps_half_the_state_of_bf16_adamw():
    """Two bf16 moments are 4 bytes per parameter; torchao's two 8-bit states 2 plus their block scales."""
    rows = {row["optimizer"]: row for row in optimizer_step.main(["--shape", "4,256,512", "--repeats", "2"])}
    assert rows["AdamW (fused on a GPU)"]["state_bytes_per_param"] == 4
    assert 2.0 < rows["torchao AdamW8bit"]["state_bytes_per_param"] < 2.1
    assert all(row["step_ms"] > 0 for row in rows.values())
