"""What the benchmark scripts share: Qwen3-30B-A3B's shape, the environment of their child processes (each run is
its own process so that an out-of-memory costs one row), and telling an out-of-memory from other failures."""

import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Collection
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Qwen3-30B-A3B's dimensions (its config.json); the depth is the caller's (48 layers in the checkpoint).
QWEN3_30B_A3B = {
    "hidden_size": 2048, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
    "intermediate_size": 6144, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "vocab_size": 151936,
}
QWEN3_30B_A3B_LAYERS = 48

OOM_MARKERS = ("OutOfMemoryError", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def child_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH, so a child imports this checkout's packages."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def is_oom(log_text: str) -> bool:
    """Whether a child's log ends in a device out-of-memory (PyTorch's, or cuBLAS failing to allocate)."""
    return any(marker in log_text for marker in OOM_MARKERS)


def fmt(value, spec: str) -> str:
    """A table cell: ``value`` formatted, or "-" where there is none."""
    return "-" if value is None else format(value, spec)


def relative_error(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ of two tensors, in fp32."""
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def run_logged(command: list[str], log_path: Path, timeout_s: float | None,
               env: dict[str, str] | None = None) -> int | None:
    """Run ``command`` from the repository root, the command line and all its output in ``log_path``; its exit
    status, or None when it ran past ``timeout_s`` (and was stopped)."""
    with open(log_path, "w") as log:
        log.write("+ " + " ".join(command) + "\n")
        log.flush()
        try:
            return subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n[stopped after {timeout_s:.0f} s]\n")
            return None


def median_ms(fn, warmup: int, repeats: int) -> float:
    """Median CUDA-event time of ``fn()`` in milliseconds, after ``warmup`` untimed calls (wall-clock time on a
    machine without a GPU, where the benchmarks only smoke-test)."""
    import torch  # here, so that the scripts' parent processes need not import it

    for _ in range(warmup):
        fn()
    times = []
    if not torch.cuda.is_available():
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def queued_ms(fn, warmup: int, repeats: int) -> float:
    """Mean time of ``fn()`` in milliseconds over ``repeats`` calls issued back to back between two CUDA events, so
    the GPU's queue stays full and the host's dispatch of each call hides behind the previous call's GPU work, as a
    layer's does inside a model. ``median_ms`` synchronizes before each call instead, so every call pays its host
    dispatch in full. Wall-clock time without a GPU."""
    import torch

    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) * 1e3 / repeats
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def run_qwen3_sft(output_dir: Path, log_path: Path, flags: list[str], timeout_s: float | None = None
                  ) -> tuple[bool, float, list[dict]]:
    """One ``qwen3_sft.py`` run in its own process (no checkpoints, no MLflow, efficiency metrics on), its output in
    ``log_path``: whether it finished, its wall time, and its logged training entries (those with a loss)."""
    command = [sys.executable, str(ROOT / "qwen3_sft.py"), "--output_dir", str(output_dir), "--save_strategy", "no",
               "--report_to", "none", "--use_liger_efficiency_callback", *flags]
    start = time.perf_counter()
    returncode = run_logged(command, log_path, timeout_s)
    wall_s = time.perf_counter() - start
    state = output_dir / "trainer_state.json"
    if returncode != 0 or not state.is_file():
        return False, wall_s, []
    return True, wall_s, [e for e in json.loads(state.read_text())["log_history"] if "loss" in e]


def kernel_table(events, on_gpu: bool, rows: int, steps: int = 1) -> str:
    """Markdown: the ``rows`` GPU kernels with the most time or, on a CPU, the ops with the most self time on the
    host, per step of the ``steps`` profiled. On a GPU only kernel events count: a CPU op's self device time is its
    kernels' again."""
    import torch  # here, so that the scripts' parent processes need not import it

    attribute = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    kernels = (e for e in events if not on_gpu or e.device_type != torch.autograd.DeviceType.CPU)
    timed = sorted((e for e in kernels if getattr(e, attribute) > 0), key=lambda e: -getattr(e, attribute))
    total_us = sum(getattr(e, attribute) for e in timed) / steps
    lines = [f"{'GPU' if on_gpu else 'CPU'} time of one step: {total_us / 1e3:.1f} ms", "",
             "| kernel | calls | ms | share |", "|---|---|---|---|"]
    for event in timed[:rows]:
        us = getattr(event, attribute) / steps
        lines.append(f"| `{event.key[:100]}` | {event.count // steps} | {us / 1e3:.2f} | {us / total_us:.1%} |")
    return "\n".join(lines) + "\n"


def step_profile(events, on_gpu: bool, rows: int, wall_s: float | None = None) -> str:
    """kernel_table, then on a GPU the host's side too: the profiled step's wall time against its GPU busy time,
    and the ops with the most self CPU time, which is where a launch-bound step's gaps come from."""
    report = kernel_table(events, on_gpu, rows)
    if not on_gpu:
        return report
    wall = "" if wall_s is None else f"Wall time of the profiled step (profiler on): {wall_s * 1e3:.1f} ms\n\n"
    return f"{report}\n{wall}Host side:\n\n{kernel_table(events, on_gpu=False, rows=rows)}"


# What a training step's GPU kernels do, told by their names (first match wins; Turbo-Tune's own Triton kernels are
# matched before these, by name): where a step's time goes at a glance, and what a change can win at most.
KERNEL_KINDS = (
    ("optimizer: AdamW", lambda name: "multi_tensor_apply" in name and "Adam" in name),
    ("optimizer: gradient norm", lambda name: "multi_tensor_apply" in name and "LpNorm" in name),
    ("optimizer: gradient clipping (multiply by a scalar tensor)",
     lambda name: "multi_tensor_apply" in name and "BinaryOpScalarTensor" in name),
    ("attention (flash)", lambda name: "flash" in name),
    ("grouped GEMM (torch._grouped_mm, CUTLASS)", lambda name: "cutlass" in name),
    ("dense GEMM (cuBLAS)", lambda name: name.startswith("nvjet") or "gemm" in name.lower() or "xmma" in name),
    ("Inductor-generated", lambda name: name.startswith("triton_")),
)


@functools.cache
def turbo_tune_kernel_names() -> frozenset[str]:
    """The names Turbo-Tune's Triton kernels (monkey_patch.scattermoe.kernels) run under in a profiler's trace, read
    once: every profiled step asks."""
    from monkey_patch.scattermoe import kernels

    names = set()
    for value in vars(kernels).values():
        if type(value).__module__.startswith("triton.") and hasattr(value, "fn"):  # jit, autotune, interpreter
            while hasattr(value, "fn"):
                value = value.fn
            names.add(value.__name__)
    return frozenset(names)


def kernel_kinds(trace_events: list[dict], ours: Collection[str]) -> str:
    """Markdown: the GPU time of a profiler's chrome-trace kernels by KERNEL_KINDS, Turbo-Tune's kernels (``ours``,
    by name) first, largest first."""
    totals: dict[str, float] = {}
    for event in trace_events:
        if event.get("cat") != "kernel" or "dur" not in event:
            continue
        name = event["name"]
        kind = "Turbo-Tune expert kernels" if name in ours else next(
            (kind for kind, matches in KERNEL_KINDS if matches(name)), "other")
        totals[kind] = totals.get(kind, 0.0) + event["dur"]
    total_us = sum(totals.values()) or 1.0
    lines = ["| kind of kernel | ms | share |", "|---|---|---|"]
    for kind, us in sorted(totals.items(), key=lambda item: -item[1]):
        lines.append(f"| {kind} | {us / 1e3:.2f} | {us / total_us:.1%} |")
    return "\n".join(lines) + "\n"


def timeline(trace_events: list[dict]) -> str:
    """Markdown from a profiler's chrome-trace events: the span of the trace against the time the GPU was busy (the
    union of kernels, copies and memsets) and, per host thread, the time inside its outermost ops. A step whose GPU
    is busy for a fraction of its span while a host thread is busy for most of it is bound by the host."""
    spans = [e for e in trace_events if e.get("ph") == "X" and "dur" in e]
    if not spans:
        return "No timed events in the trace.\n"
    start = min(e["ts"] for e in spans)
    span_us = max(e["ts"] + e["dur"] for e in spans) - start
    busy_us = sum(end - begin for begin, end, _, _ in _gpu_busy(spans))
    outermost: dict = {}
    for e in sorted((e for e in spans if e.get("cat") == "cpu_op"), key=lambda e: (e["ts"], -e["dur"])):
        total, until = outermost.get(e["tid"], (0.0, None))
        if until is None or e["ts"] >= until:
            outermost[e["tid"]] = (total + e["dur"], e["ts"] + e["dur"])
    lines = [f"Trace span {span_us / 1e3:.1f} ms; GPU busy {busy_us / 1e3:.1f} ms ({busy_us / span_us:.0%}).", "",
             "| host thread | ms in its outermost ops |", "|---|---|"]
    for tid, (total, _) in sorted(outermost.items(), key=lambda item: -item[1][0]):
        lines.append(f"| {tid} | {total / 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def _gpu_work(trace_events: list[dict]) -> list[dict]:
    """The kernels, copies and memsets of a profiler's chrome trace, by start time."""
    work = (e for e in trace_events if e.get("ph") == "X" and "dur" in e
            and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    return sorted(work, key=lambda e: e["ts"])


def _gpu_busy(trace_events: list[dict]) -> list[list]:
    """The GPU's busy intervals, its work merged where it overlaps or touches: [begin, end, the name of the piece
    that opens the interval, the name of the one that ends it], in order."""
    busy: list[list] = []
    for event in _gpu_work(trace_events):
        end = event["ts"] + event["dur"]
        if busy and event["ts"] <= busy[-1][1]:
            if end > busy[-1][1]:
                busy[-1][1], busy[-1][3] = end, event["name"]
        else:
            busy.append([event["ts"], end, event["name"], event["name"]])
    return busy


GAP_BUCKETS_US = (10.0, 100.0, 1000.0)  # upper ends: a launch's own gap, a slow launch, a wait on the host


def gpu_gaps(trace_events: list[dict], rows: int = 10) -> str:
    """Markdown: the GPU's idle time between its first and last piece of work, by length of gap, and the longest
    gaps with the kernels either side of them. Thousands of gaps of a few microseconds are the kernels' own
    boundaries; a few long ones are the GPU waiting for the host (a sync, a slow launch), and name where."""
    busy = _gpu_busy(trace_events)
    gaps = [(after[0] - before[1], before[3], after[2]) for before, after in zip(busy, busy[1:], strict=False)]
    if not gaps:
        return "No gaps between the GPU's work.\n"
    lines = ["| GPU idle gaps | count | ms |", "|---|---|---|"]
    lower = 0.0
    for upper in (*GAP_BUCKETS_US, float("inf")):
        inside = [gap for gap, _, _ in gaps if lower <= gap < upper]
        label = f"≥ {lower:g} µs" if upper == float("inf") else f"{lower:g}–{upper:g} µs"
        lines.append(f"| {label} | {len(inside)} | {sum(inside) / 1e3:.2f} |")
        lower = upper
    lines += ["", "| longest gaps, µs | after | before |", "|---|---|---|"]
    for gap, before, after in sorted(gaps, key=lambda item: -item[0])[:rows]:
        lines.append(f"| {gap:.0f} | `{before[:70]}` | `{after[:70]}` |")
    return "\n".join(lines) + "\n"


def kernels_by_grid(trace_events: list[dict], names: Collection[str]) -> str:
    """Markdown: the kernels named in ``names`` (Turbo-Tune's), per launch grid: which calls of one kernel (its
    LoRA-rank products against its full-width ones, say) take the time, where the kernel table sums them all."""
    calls: dict[tuple, list[float]] = {}
    for event in _gpu_work(trace_events):
        if event["name"] in names:
            grid = tuple(event.get("args", {}).get("grid", ()))
            calls.setdefault((event["name"], grid), []).append(event["dur"])
    if not calls:
        return "None of these kernels ran.\n"
    lines = ["| kernel | grid | calls | ms | µs a call |", "|---|---|---|---|---|"]
    for (name, grid), durations in sorted(calls.items(), key=lambda item: -sum(item[1])):
        total = sum(durations)
        lines.append(f"| `{name}` | {grid} | {len(durations)} | {total / 1e3:.2f} | {total / len(durations):.1f} |")
    return "\n".join(lines) + "\n"


TORCH_DIR = f"{os.sep}torch{os.sep}"


def _allocation_site(frames: list[dict]) -> str:
    """Where an allocation came from, in two frames outside torch's own Python (an Inductor graph's generated code
    counts: it names the graph): the innermost such frame and the next one in another file."""
    site = []
    for frame in frames:
        filename = frame.get("filename", "")
        if TORCH_DIR in filename and "torchinductor" not in filename:
            continue
        if site and site[-1][0] == filename:
            continue
        site.append((filename, f"{Path(filename).name}:{frame.get('line')} {frame.get('name')}"))
        if len(site) == 2:
            break
    return " ← ".join(label for _, label in site) or "(no Python frame: torch's C++, e.g. autograd)"


def memory_at_peak(trace: list[dict], baseline_bytes: int, rows: int = 25) -> str:
    """Markdown from a CUDA allocator trace (``torch.cuda.memory._snapshot()["device_traces"][i]``, recorded with
    Python stacks from a moment when ``baseline_bytes`` were allocated): the allocated bytes' peak within the trace,
    the allocations made since the baseline and still live at that peak, by where they were made, and the last
    allocations before it (what pushed it up)."""
    allocated, peak, peak_at = baseline_bytes, baseline_bytes, -1
    for index, entry in enumerate(trace):
        if entry["action"] == "alloc":
            allocated += entry["size"]
            if allocated > peak:
                peak, peak_at = allocated, index
        elif entry["action"] == "free_completed":
            allocated -= entry["size"]
    live: dict[int, dict] = {}
    last_allocations: deque[dict] = deque(maxlen=8)
    for entry in trace[:peak_at + 1]:
        if entry["action"] == "alloc":
            live[entry["addr"]] = entry
            last_allocations.append(entry)
        elif entry["action"] == "free_completed":
            live.pop(entry["addr"], None)
    by_site: dict[str, list[int]] = {}
    for entry in live.values():
        by_site.setdefault(_allocation_site(entry.get("frames", [])), []).append(entry["size"])
    gib = 2**30
    lines = [f"Peak {peak / gib:.2f} GiB: {baseline_bytes / gib:.2f} GiB allocated before the recording (weights, "
             f"optimizer state, ...) and {(peak - baseline_bytes) / gib:.2f} GiB net since, of which "
             f"{sum(sum(sizes) for sizes in by_site.values()) / gib:.2f} GiB made since and live at the peak.", "",
             "| live at the peak, made at | blocks | GiB |", "|---|---|---|"]
    for site, sizes in sorted(by_site.items(), key=lambda item: -sum(item[1]))[:rows]:
        lines.append(f"| `{site}` | {len(sizes)} | {sum(sizes) / gib:.3f} |")
    lines += ["", "| the last allocations up to the peak | MiB |", "|---|---|"]
    for entry in last_allocations:
        lines.append(f"| `{_allocation_site(entry.get('frames', []))}` | {entry['size'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"
