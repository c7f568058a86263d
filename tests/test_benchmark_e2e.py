"""benchmarks/e2e.py: the CLI, and one tiny variant end to end on the CPU (each variant is its own process)."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "e2e.py"


def test_help_names_every_variant():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    for variant in ("defaults", "fast_moe", "liger", "compile", "packing", "fp8", "all"):
        assert variant in result.stdout


def test_tiny_variants_run_and_a_failure_is_a_row(tmp_path):
    """`packing` runs and profiles its two extra steps, each on its own; `liger` is refused on a CPU, and that
    refusal must come back as a row, not a crash."""
    command = [sys.executable, str(SCRIPT), "--hidden", "small", "--layers", "1", "--seq", "128", "--warmup", "1",
               "--steps", "2", "--variants", "packing", "liger", "--profile", "--profile_steps", "2",
               "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    rows = {row["variant"]: row for row in json.loads((tmp_path / "e2e.json").read_text())}
    assert rows["packing"]["ok"], (tmp_path / "packing.log").read_text()[-2000:]
    assert rows["packing"]["tokens_per_s"] > 0 and rows["packing"]["first_loss"] > 0
    fastest, slowest = rows["packing"]["step_time_range_s"]
    assert fastest <= rows["packing"]["step_time_s"] <= slowest and rows["packing"]["gc_s_per_step"] >= 0
    timed = rows["packing"]["timed_steps"]  # each timed step, so a slow one shows which it was
    assert len(timed) == 2 and min(step["s"] for step in timed) == fastest
    assert all(step["tokens"] > 0 and step["sum_sq"] >= step["tokens"] for step in timed)  # Σ length² per step
    all_steps = sum(step["tokens"] for step in timed) / sum(step["s"] for step in timed)
    assert rows["packing"]["tokens_per_s_all_steps"] == pytest.approx(all_steps)
    outside_gc = sum(step["tokens"] for step in timed) / sum(step["s"] - step["gc_s"] for step in timed)
    assert rows["packing"]["tokens_per_s_outside_gc"] == pytest.approx(outside_gc)
    assert "varlen_sdpa" in rows["packing"]["notes"]
    errors = rows["packing"]["notes"].split("rel err out/grad ")[1].split(",")[0].split("/")
    assert all(float(e) < 1e-5 for e in errors)  # fp32 on the CPU
    profile = (tmp_path / "packing.profile.md").read_text()
    steps = profile.split("## Step ")[1:]
    assert [step.split("\n")[0] for step in steps] == ["4", "5"]  # after 1 warm-up and 2 timed steps
    for step in steps:
        assert "\nTrace span " in step and "GPU busy 0.0 ms (0%)" in step
        assert "CPU time of one step:" in step and "| `aten::mm` |" in step
        assert "kind of kernel" not in step  # GPU time by kind: no GPU kernels here
    assert (tmp_path / "packing.trace.json.gz").read_bytes().startswith(b"\x1f\x8b")  # gzip
    assert not rows["liger"]["ok"] and "--use_liger_kernel needs a CUDA GPU" in rows["liger"]["error"]
    assert result.returncode == 1
    assert result.stdout.rstrip().splitlines()[-1].startswith("| liger |")  # the table comes last
    assert (tmp_path / "e2e.png").read_bytes().startswith(b"\x89PNG")  # matplotlib comes with mlflow


def test_host_profile_writes_the_python_functions_of_its_steps_alone(tmp_path):
    args = e2e.parse_args(["--warmup", "1", "--steps", "1", "--host_profile", "--profile_steps", "2",
                           "--out", str(tmp_path)])
    assert "--host_profile" in e2e.child_argv(args, "packing") and e2e.total_steps(args) == 4
    profile = e2e.HostProfile(step=2, path=tmp_path / "packing.host.txt", count=2)

    def before_the_profiled_steps():
        return sum(range(100))

    def in_a_profiled_step():
        return sum(range(100))

    for step, work in enumerate([before_the_profiled_steps] * 2 + [in_a_profiled_step] * 2):
        profile.on_step_begin(None, SimpleNamespace(global_step=step), None)
        work()
        profile.on_step_end(None, SimpleNamespace(global_step=step + 1), None)
    report = (tmp_path / "packing.host.txt").read_text()
    threads = "every thread" if sys.version_info >= (3, 12) else "the main thread"  # cProfile on sys.monitoring
    assert report.startswith(f"cProfile of {threads} over 2 step(s) from step 3\n")
    assert "Ordered by: internal time" in report and "Ordered by: cumulative time" in report
    assert "(in_a_profiled_step)" in report and "(before_the_profiled_steps)" not in report


@pytest.mark.parametrize("pair", [("--profile", "--host_profile"), ("--memory_snapshot", "--profile")])
def test_two_ways_of_profiling_the_same_extra_steps_are_refused_together(capsys, pair):
    with pytest.raises(SystemExit):
        e2e.parse_args(list(pair))
    assert "--profile, --host_profile and --memory_snapshot profile the same extra steps" in capsys.readouterr().err


sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
import e2e  # noqa: E402


def fake_probe(cap: int, clock: list[float] | None = None, seconds: float = 0, errors_at: int | None = None):
    """A probe that fits up to `cap` tokens and takes `seconds` of a fake clock (a timeout when it is given less)."""
    def probe(seq: int, timeout: float) -> dict:
        if clock is not None:
            clock[0] += min(seconds, timeout)
        if seconds > timeout:
            return {"ok": False, "failure": "timeout", "error": "timed out"}
        if seq == errors_at:
            return {"ok": False, "failure": "error", "error": "exit 1: ValueError: a bug"}
        if seq > cap:
            return {"ok": False, "failure": "oom", "error": "exit 1: torch.OutOfMemoryError"}
        return {"ok": True, "tokens_per_s": 1e6 / seq, "step_time_s": seq / 1e6, "peak_gib": seq / 1024}
    return probe


def search(probe, budget_s: float = 1e9, clock=None) -> dict:
    kwargs = {"clock": lambda: clock[0]} if clock else {}
    return e2e.search_max_seq(probe, start=4096, step=1024, budget_s=budget_s, timeout=300, **kwargs)


def test_search_doubles_then_bisects_to_the_boundary():
    result = search(fake_probe(cap=37_000))
    assert [p["seq"] for p in result["probes"]] == [4096, 8192, 16384, 32768, 65536, 49152, 40960, 36864, 38912,
                                                   37888]
    assert (result["longest"], result["first_fail"], result["fail_reason"]) == (36864, 37888, "oom")
    assert result["at_longest"]["tokens_per_s"] == 1e6 / 36864 and result["stopped"] is None
    low = search(fake_probe(cap=2500))  # the first probe fails: bisect below --start_seq
    assert [p["seq"] for p in low["probes"]] == [4096, 2048, 3072] and low["longest"] == 2048
    assert search(fake_probe(cap=1000))["longest"] == 0  # nothing fits: 4096, 2048, 1024 fail


def test_budget_or_an_error_stops_the_search_and_says_so():
    clock = [0.0]  # each probe takes 100 s: at 300 s, 50 s are left, which the probe at 32768 runs out of
    cut = search(fake_probe(cap=10**9, clock=clock, seconds=100), budget_s=350, clock=clock)
    assert [p["seq"] for p in cut["probes"]] == [4096, 8192, 16384, 32768]
    assert cut["stopped"] == "time budget (350 s) spent during the probe at 32,768"
    assert (cut["longest"], cut["first_fail"]) == (16384, None)  # a timeout cut short by the budget is no failure
    clock = [0.0]  # 10 s left after three probes: too little to start a fourth
    short = search(fake_probe(cap=10**9, clock=clock, seconds=100), budget_s=310, clock=clock)
    assert len(short["probes"]) == 3 and short["stopped"] == "time budget (310 s) spent"
    clock = [0.0]  # a full timeout (not cut by the budget) counts as "does not fit"
    slow = search(fake_probe(cap=10**9, clock=clock, seconds=400), clock=clock)
    assert (slow["longest"], slow["first_fail"], slow["fail_reason"]) == (0, 1024, "timeout")
    error = search(fake_probe(cap=10**9, errors_at=8192))
    assert error["stopped"].startswith("error at 8,192: exit 1: ValueError") and error["first_fail"] is None

    results = [{"variant": "lora", "flags": "--use_lora", **search(fake_probe(cap=37_000))},
               {"variant": "all_lora", "flags": "--use_fast_moe_block", **short},
               {"variant": "all_lora_offload", "flags": "--activation_offloading", **search(fake_probe(cap=80_000))}]
    summary = e2e.search_summary(results, e2e.parse_args(["--max_seq_search"]))
    assert "all_lora / lora longest trainable sequence: 16,384 / 36,864 = 0.44× (a lower bound" in summary
    assert "all_lora_offload / lora longest trainable sequence: 79,872 / 36,864 = 2.17× (target ≥ 2×)" in summary
    results.pop()
    table = e2e.search_table(results).splitlines()
    assert table[2].startswith("| lora | `--use_lora` | 36,864 | 27 | 0.04 | 36.0 | 37,888 (oom) |")
    assert table[3].startswith("| all_lora | `--use_fast_moe_block` | ≥ 16,384 |")
    assert table[3].endswith("| stopped: time budget (310 s) spent |")


def test_search_gpus_search_each_variant_on_its_own_gpu_with_the_whole_budget(monkeypatch, tmp_path):
    calls = []

    def fake_run_variant(name, args, timeout, gpu=None):
        calls.append((name, args.seq, gpu, timeout))
        fits = args.seq <= {"lora": 8192, "all_lora": 16384}[name]
        return {"ok": fits, "failure": None if fits else "oom", "error": None if fits else "CUDA out of memory",
                "tokens_per_s": 1.0, "wall_s": 0.0}

    monkeypatch.setattr(e2e, "run_variant", fake_run_variant)
    args = e2e.parse_args(["--max_seq_search", "--search_gpus", "3,5", "--budget_s", "400", "--out", str(tmp_path)])
    results = e2e.run_search(args)
    assert [(r["variant"], r["gpu"], r["longest"]) for r in results] == [("lora", "3", 8192), ("all_lora", "5", 16384)]
    assert {gpu for name, _, gpu, _ in calls if name == "lora"} == {"3"}
    assert min(timeout for *_, timeout in calls) == 300  # the whole --timeout: neither search shared the 400 s
    with pytest.raises(SystemExit):
        e2e.parse_args(["--max_seq_search", "--search_gpus", "0"])  # two variants, one GPU


def test_max_seq_search_runs_tiny_probes_on_the_cpu(tmp_path):
    """One real probe fits; --max_tokens_cap fails the next as an OOM would, which ends the search."""
    command = [sys.executable, str(SCRIPT), "--max_seq_search", "--hidden", "small", "--layers", "1", "--variants",
               "lora", "--start_seq", "128", "--seq_step", "128", "--max_tokens_cap", "200", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    (row,) = json.loads((tmp_path / "max_seq.json").read_text())
    assert [(p["seq"], p["ok"], p.get("failure")) for p in row["probes"]] == [(128, True, None), (256, False, "oom")], (
        tmp_path / "probes" / "lora-128" / "lora.log").read_text()[-2000:]
    assert row["longest"] == 128 and row["at_longest"]["tokens_per_s"] > 0 and row["stopped"] is None
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.rstrip().splitlines()[-1].startswith("| lora | `--use_lora` | 128 |")  # the table comes last


def test_flag_by_flag_comparison_leaves_the_lora_variants_to_the_sequence_search():
    assert e2e.parse_args([]).variants == ["defaults", "fast_moe", "liger", "compile", "packing", "fp8",
                                           "compile_fast_moe", "compile_packing", "compile_packing_bf16", "all",
                                           "all_bf16", "all_fp8", "all_adamw8bit"]
    assert e2e.parse_args(["--max_seq_search"]).variants == ["lora", "all_lora"]


def test_variants_carry_boolean_and_valued_flags_as_a_user_types_them():
    assert e2e.variant_settings("fp8") == {"use_fp8": True}
    assert e2e.variant_settings("all_adamw8bit")["optim"] == "adamw_torch_8bit"
    assert e2e.command_line("all_adamw8bit").endswith("--use_packing --optim adamw_torch_8bit")
    assert e2e.command_line("defaults") == "(transformers defaults)"
    assert e2e.variant_env("all_lora_compile_fp8_cpp_wrapper") == {"TORCHINDUCTOR_CPP_WRAPPER": "1"}
    assert "TORCHINDUCTOR_CPP_WRAPPER" not in e2e.variant_settings("all_lora_compile_fp8_cpp_wrapper")
    assert e2e.command_line("all_lora_compile_fp8_cpp_wrapper").startswith(
        "TORCHINDUCTOR_CPP_WRAPPER=1 --use_fast_moe_block --use_packing")
    assert e2e.variant_settings("defaults_no_moe_health") == {"moe_health_metrics": False}
    assert e2e.command_line("compile_fast_moe_no_moe_health").endswith("--moe_health_metrics false")
    assert e2e.command_line("compile_packing_bf16") == "--torch_compile --use_packing --model_dtype bfloat16"


def test_gpu_profile_table_counts_each_kernel_once():
    """A CPU op's self device time is the time of the kernels it launched, which are events of their own."""

    def event(key, device_type, us):
        return SimpleNamespace(key=key, count=1, device_type=device_type, self_device_time_total=us)

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [event("aten::mm", cpu, 300), event("nvjet_gemm", cuda, 300), event("triton_fused", cuda, 100)]
    table = common.kernel_table(events, on_gpu=True, rows=10)
    assert table.startswith("GPU time of one step: 0.4 ms")
    assert "nvjet_gemm" in table and "aten::mm" not in table


def test_gpu_step_profile_adds_wall_time_and_the_host_ops():
    def event(key, device_type, device_us, cpu_us):
        return SimpleNamespace(key=key, count=2, device_type=device_type, self_device_time_total=device_us,
                               self_cpu_time_total=cpu_us)

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [event("aten::mm", cpu, 300, 50), event("nvjet_gemm", cuda, 300, 0), event("Triton launch", cpu, 0, 950)]
    report = common.step_profile(events, on_gpu=True, rows=10, wall_s=1.5)
    gpu, host = report.split("Host side:")
    assert gpu.startswith("GPU time of one step: 0.3 ms")
    assert "Wall time of the profiled step (profiler on): 1500.0 ms" in gpu
    assert host.strip().startswith("CPU time of one step: 1.0 ms")
    assert host.index("Triton launch") < host.index("aten::mm")
    assert common.step_profile(events, on_gpu=False, rows=10) == common.kernel_table(events, on_gpu=False, rows=10)
    assert common.kernel_table(events, on_gpu=False, rows=10, steps=2).startswith("CPU time of one step: 0.5 ms")


def test_timeline_unions_overlapping_gpu_work_and_counts_each_threads_outermost_ops():
    def span(cat, ts, dur, tid=1):
        return {"ph": "X", "cat": cat, "ts": ts, "dur": dur, "tid": tid, "name": cat}

    events = [
        span("cpu_op", 0, 100), span("cpu_op", 10, 50), span("cpu_op", 150, 20),  # thread 1: 100 + 20 outermost
        span("cpu_op", 40, 30, tid=2),
        span("kernel", 20, 30), span("kernel", 40, 30), span("gpu_memcpy", 90, 10), span("kernel", 95, 3),
        {"ph": "i", "ts": 500, "name": "instant"},  # no duration: not part of the span
    ]
    report = common.timeline(events)
    assert report.startswith("Trace span 0.2 ms; GPU busy 0.1 ms (35%).")  # 170 us span, 20-70 and 90-100 busy
    assert "| 1 | 0.1 |" in report and "| 2 | 0.0 |" in report
    assert report.index("| 1 |") < report.index("| 2 |")
    assert common.timeline([]) == "No timed events in the trace.\n"



def test_gpu_gaps_sorts_the_idle_time_between_kernels_by_length_and_names_the_longest():
    def kernel(name, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}

    events = [kernel("a", 0, 10), kernel("b", 12, 10), kernel("c", 15, 3),  # c overlaps b: no gap
              kernel("d", 72, 8), kernel("e", 2080, 20), {"ph": "X", "cat": "cpu_op", "name": "x", "ts": 30, "dur": 1}]
    report = common.gpu_gaps(events, rows=2)
    assert "| 0–10 µs | 1 | 0.00 |" in report  # a -> b, 2 us
    assert "| 10–100 µs | 1 | 0.05 |" in report  # b -> d, 50 us
    assert "| 100–1000 µs | 0 | 0.00 |" in report and "| ≥ 1000 µs | 1 | 2.00 |" in report
    longest = report.split("| longest gaps, µs | after | before |")[1].splitlines()[2:]
    assert longest == ["| 2000 | `d` | `e` |", "| 50 | `b` | `d` |"]
    assert common.gpu_gaps([kernel("a", 0, 10)]) == "No gaps between the GPU's work.\n"


def test_kernels_by_grid_splits_one_kernels_time_by_its_launch_grid():
    def kernel(name, grid, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": 0, "dur": dur, "args": {"grid": grid}}

    events = [kernel("_scatter_matmul_kernel", [512, 1, 1], 300), kernel("_scatter_matmul_kernel", [64, 1, 1], 40),
              kernel("_scatter_matmul_kernel", [512, 1, 1], 500), kernel("nvjet_gemm", [9, 1, 1], 9000)]
    rows = common.kernels_by_grid(events, {"_scatter_matmul_kernel"}).splitlines()[2:]
    assert rows == ["| `_scatter_matmul_kernel` | (512, 1, 1) | 2 | 0.80 | 400.0 |",
                    "| `_scatter_matmul_kernel` | (64, 1, 1) | 1 | 0.04 | 40.0 |"]


def test_memory_at_peak_lists_what_is_live_at_the_traces_peak_by_where_it_was_allocated():
    mib = 2**20

    def frames(*names):
        return [{"filename": f"/site-packages/torch/{n}.py" if n.startswith("torch") else f"/repo/{n}.py",
                 "line": 1, "name": n} for n in names]

    def alloc(addr, size, *names):
        return {"action": "alloc", "addr": addr, "size": size * mib, "frames": frames(*names)}

    def free(addr, size):
        return {"action": "free_completed", "addr": addr, "size": size * mib}

    trace = [alloc(1, 100, "torch_mm", "ops", "layer"), alloc(2, 50, "ops", "layer"), free(2, 50),
             {"action": "segment_alloc", "addr": 9, "size": 999 * mib},  # the allocator's own: not counted
             alloc(3, 40, "loss"), alloc(4, 20, "ops", "layer"), free(1, 100), alloc(5, 10, "loss")]
    report = common.memory_at_peak(trace, baseline_bytes=1024 * mib)
    # 1024 + 100 + 50 - 50 + 40 + 20 = 1184 MiB after the fourth allocation (1174 after the second), then down
    assert report.startswith("Peak 1.16 GiB: 1.00 GiB allocated before the recording")
    sites = [line.split(" | ")[0].strip("| `") for line in report.split("| live at the peak")[1].splitlines()[2:5]]
    assert sites == ["ops.py:1 ops ← layer.py:1 layer", "loss.py:1 loss", ""]  # torch's own frames skipped
    assert "| `ops.py:1 ops ← layer.py:1 layer` | 2 | 0.117 |" in report  # 100 + 20 MiB
    assert report.rstrip().endswith("| `ops.py:1 ops ← layer.py:1 layer` | 20.0 |")
    assert "(no Python frame" in common.memory_at_peak([{"action": "alloc", "addr": 1, "size": 1}], 0)


def test_short_packed_rows_are_left_out_of_the_timed_steps():
    from datasets import Dataset

    packed = Dataset.from_dict({"input_ids": [[5] * 128, [5] * 40, [5] * 116, [5] * 115]})
    assert [len(row) for row in e2e.full_rows(packed, 128)["input_ids"]] == [128, 116]


def test_repeats_run_the_variants_in_turns_and_take_the_median_of_each_repeats_own_ratio(monkeypatch, tmp_path,
                                                                                      capsys):
    speeds = {("lora", 0): 100.0, ("all_lora", 0): 250.0, ("lora", 1): 50.0, ("all_lora", 1): 100.0,
              ("lora", 2): 100.0, ("all_lora", 2): 180.0}  # repeat 1 ran on a host at half speed
    calls = []

    def fake_run_variant(name, args, timeout, gpu=None):
        repeat = int(args.out.name.removeprefix("repeat"))
        calls.append((name, repeat))
        speed = speeds[name, repeat]
        return {"variant": name, "flags": e2e.command_line(name), "ok": True, "notes": "", "tokens_per_s": speed,
                "tokens_per_s_all_steps": speed * 0.9, "tokens_per_s_outside_gc": speed * (1.2 if repeat else 1.0),
                "mfu": None, "step_time_s": 1.0,
                "step_time_range_s": (1.0, 1.0), "gc_s_per_step": 0.0, "peak_gib": None, "first_loss": None,
                "last_loss": None, "first_accuracy": None, "last_accuracy": None}

    monkeypatch.setattr(e2e, "run_variant", fake_run_variant)
    assert e2e.main(["--variants", "lora", "all_lora", "--repeats", "3", "--out", str(tmp_path)]) == 0
    assert calls == [("lora", 0), ("all_lora", 0), ("lora", 1), ("all_lora", 1), ("lora", 2), ("all_lora", 2)]
    assert all((tmp_path / f"repeat{i}").is_dir() for i in range(3))
    rows = json.loads((tmp_path / "e2e.json").read_text())
    assert [(r["variant"], r["repeat"]) for r in rows] == calls
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    # ratios 2.50, 2.00, 1.80: their median, not the ratio of the medians (180 / 100 = 1.80); the same for the
    # two all-steps measures (less GC time: 250 / 100, 120 / 60, 216 / 120)
    assert last == "| all_lora | 250, 100, 180 | 180 | 162 | 216 | 2.50×, 2.00×, 1.80× | 2.00× (2.00×; 2.00×) |"


def test_a_variants_environment_settings_reach_its_process_and_no_other(monkeypatch, tmp_path):
    seen = {}

    def fake_run_logged(command, log, timeout, env):
        seen[command[command.index("--child") + 1]] = env
        log.write_text("ValueError: stopped here\n")
        return 1

    monkeypatch.setattr(e2e, "run_logged", fake_run_logged)
    monkeypatch.delenv("TORCHINDUCTOR_CPP_WRAPPER", raising=False)
    args = e2e.parse_args(["--out", str(tmp_path)])
    for name in ("all_lora_compile_fp8_cpp_wrapper", "all_lora_compile_fp8"):
        assert not e2e.run_variant(name, args, timeout=10)["ok"]
    assert seen["all_lora_compile_fp8_cpp_wrapper"]["TORCHINDUCTOR_CPP_WRAPPER"] == "1"
    assert "TORCHINDUCTOR_CPP_WRAPPER" not in seen["all_lora_compile_fp8"]


def test_kernel_kinds_sorts_a_steps_gpu_time_into_what_the_kernels_do():
    def kernel(name, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": 0, "dur": dur}

    adam = "void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>, FusedAdamMathFunctor<bf16>>"
    events = [
        kernel(adam, 3000), kernel(adam, 1000),
        kernel("void at::native::multi_tensor_apply_kernel<TensorListMetadata<1>, LpNormFunctor<float>>", 500),
        kernel("void at::native::multi_tensor_apply_kernel<TensorListMetadata<1>, BinaryOpScalarTensorFunctor>", 700),
        kernel("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>", 1500),
        kernel("_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9x", 1200),
        kernel("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT", 2000),
        kernel("triton_poi_fused_cat_mul_silu_0", 400),
        kernel("_scatter_matmul_kernel", 2500),
        kernel("void at::native::sbtopk::gatherTopK<float>", 200),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 9999},  # host time is not GPU time
    ]
    table = common.kernel_kinds(events, ours={"_scatter_matmul_kernel"})
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert [(row[0].strip("| "), row[1]) for row in rows] == [
        ("optimizer: AdamW", "4.00"), ("Turbo-Tune expert kernels", "2.50"), ("dense GEMM (cuBLAS)", "2.00"),
        ("attention (flash)", "1.50"), ("grouped GEMM (torch._grouped_mm, CUTLASS)", "1.20"),
        ("optimizer: gradient clipping (multiply by a scalar tensor)", "0.70"), ("optimizer: gradient norm", "0.50"),
        ("Inductor-generated", "0.40"), ("other", "0.20")]
    assert rows[0][2] == "30.8% |"  # 4.0 of 13.0 ms


def test_turbo_tune_kernel_names_are_the_triton_kernels_a_profile_shows():
    names = common.turbo_tune_kernel_names()
    assert {"_gather_gate_up_swiglu_kernel", "_scatter_matmul_kernel", "_grouped_weight_grad_kernel",
            "_swiglu_backward_kernel", "_sum_top_k_kernel", "_gather_token_rows_kernel"} <= names
    assert not any(name.startswith("triton_") for name in names)


def test_gradient_accumulation_times_optimizer_steps_of_several_micro_batches(tmp_path):
    """Each timed step is one optimizer step: with two micro-batches of one packed row (each at least 90 % full),
    it holds more tokens than one row of --seq can."""
    command = [sys.executable, str(SCRIPT), "--hidden", "small", "--layers", "1", "--seq", "128", "--batch", "1",
               "--gradient_accumulation_steps", "2", "--warmup", "1", "--steps", "2", "--variants", "packing",
               "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    row = json.loads((tmp_path / "e2e.json").read_text())[0]
    assert result.returncode == 0 and row["ok"], (tmp_path / "packing.log").read_text()[-2000:]
    assert all(2 * 0.9 * 128 <= step["tokens"] <= 2 * 128 for step in row["timed_steps"])


def test_gradient_accumulation_is_refused_where_it_means_nothing(capsys):
    for argv in (["--gradient_accumulation_steps", "0"], ["--max_seq_search", "--gradient_accumulation_steps", "2"]):
        with pytest.raises(SystemExit):
            e2e.parse_args(argv)
        assert "--gradient_accumulation_steps" in capsys.readouterr().err
