import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import launch_overhead  # noqa: E402


def test_launch_benchmark_checks_both_alignments_and_times_both_paths():
    result = launch_overhead.main(["--shape", "small", "--tokens", "5", "--timing_tokens", "2", "--trials", "1",
                                   "--repeats", "1"])
    assert [(r["tokens"], r["misaligned"]) for r in result["checks"]] == [(5, False), (5, True)]
    assert all(r["miss_exact"] and r["hit_exact"] for r in result["checks"])
    for times in (result["host_ms"], result["launch_ms"]):
        assert set(times) == {"Triton's launch path", "launch cache"} and all(ms > 0 for ms in times.values())
