"""benchmarks/e2e.py: the CLI, and one tiny variant end to end on the CPU (each variant is its own process)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "e2e.py"


def test_help_names_every_variant():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    for variant in ("defaults", "fast_moe", "liger", "compile", "packing", "fp8", "all"):
        assert variant in result.stdout


def test_tiny_variants_run_and_a_failure_is_a_row(tmp_path):
    """`packing` runs; `liger` is refused on a CPU, and that refusal must come back as a row, not a crash."""
    command = [sys.executable, str(SCRIPT), "--hidden", "small", "--layers", "1", "--seq", "128", "--warmup", "1",
               "--steps", "2", "--variants", "packing", "liger", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    rows = {row["variant"]: row for row in json.loads((tmp_path / "e2e.json").read_text())}
    assert rows["packing"]["ok"], (tmp_path / "packing.log").read_text()[-2000:]
    assert rows["packing"]["tokens_per_s"] > 0 and rows["packing"]["first_loss"] > 0
    assert "varlen_sdpa" in rows["packing"]["notes"]
    errors = rows["packing"]["notes"].split("rel err out/grad ")[1].split(",")[0].split("/")
    assert all(float(e) < 1e-5 for e in errors)  # fp32 on the CPU
    assert not rows["liger"]["ok"] and "--use_liger_kernel needs a CUDA GPU" in rows["liger"]["error"]
    assert result.returncode == 1
    assert result.stdout.rstrip().splitlines()[-1].startswith("| liger |")  # the table comes last
