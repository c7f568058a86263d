"""Every engine on one machine's GPUs through qwen3_sft.py: loss agreement, tokens/s per GPU, peak memory, resume,
nodes; and the flagship run of issue 7 (full-depth, full-parameter Qwen3-30B-A3B under ZeRO-3 and FSDP).

    python3 benchmarks/distributed.py --out DIR [--gpus N] [--phases stages resume multinode compat flagship]

For each model (the embedded tiny Qwen3-MoE, and a Qwen3-30B-A3B-shaped model cut to --a3b_layers layers, both saved
once with random weights so that every engine starts from the same ones) it trains --steps steps on one GPU and
under ZeRO-1, ZeRO-2, ZeRO-3 and FSDP2 on N (--gpus, default: every visible GPU), with the same global batch and the
same numerics (fp32 master weights, bf16 compute). Then it resumes the tiny ZeRO-3 and FSDP runs from their mid-way
checkpoints and compares the losses that follow, and runs qwen3_sft_multinode.sh as two "nodes" of N/2 GPUs on
127.0.0.1. `--phases compat` (not in the default) trains the tiny model a few steps with each of Turbo-Tune's patches
under ZeRO-2, ZeRO-3 and FSDP2 (those of them in --engines, so that it can be split over several calls).

`--phases flagship` (not in the default) is the run a real user makes: full-parameter SFT of the Qwen3-30B-A3B shape
at --a3b_layers (default 48, the real depth) on N GPUs under ZeRO-3 and FSDP, packed rows of --max_length tokens,
--flagship_steps steps, with FEATURES ("ours") and with transformers + TRL defaults; and the scaling reference, the
same job at --scaling_layers on 2 and on N GPUs, the N-GPU one saving a sharded checkpoint mid-way that a last run
resumes (--flagship_resume_steps steps, compared with the uninterrupted ones). --flagship_runs picks among ours,
defaults and scaling, so that a job longer than one sitting can be split: with the same --out, distributed.json
gathers the results of every invocation and the tables show them all.

Logs, trainer states and distributed.json go to DIR; the markdown tables are printed last. Runs that would start past
--budget_s are skipped (and say so).
"""

import argparse
import ast
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import QWEN3_30B_A3B, QWEN3_30B_A3B_LAYERS, fmt  # noqa: E402

ENGINES = {
    "single": [],
    "zero1": ["--deepspeed_config", "config/zero1.json"],
    "zero2": ["--deepspeed_config", "config/zero2.json"],
    "zero3": ["--deepspeed_config", "config/zero3.json"],
    "fsdp": ["--fsdp"],
}
RESUMED = ("zero3", "fsdp")
# --phases compat: each of Turbo-Tune's patches under the sharded engines (tiny model, a few steps).
PATCHES = {
    "fast_moe": ["--use_fast_moe_block"],
    "liger": ["--use_liger_kernel"],
    "packing": ["--use_packing"],
    "lora_merge": ["--use_lora", "--merge_lora"],
    "fast_moe_lora": ["--use_fast_moe_block", "--use_lora", "--merge_lora"],
    "compile": ["--torch_compile"],
    "fp8": ["--use_fp8"],
}
COMPAT_ENGINES = ("zero2", "zero3", "fsdp")
# The compat runs check that training works, not its speed: Liger's fused MoE skips its autotuning (about 200 Triton
# configs, which took 2.5 minutes of a 5-step tiny run under ZeRO-2 on an H200) and uses its one default config.
COMPAT_ENV = {"LIGER_FUSED_MOE_AUTOTUNE": "0"}
# Qwen3-30B-A3B's shape (config.json of the release); only the depth is cut.
A3B = dict(QWEN3_30B_A3B, norm_topk_prob=True, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960,
           tie_word_embeddings=False, router_aux_loss_coef=0.001, decoder_sparse_step=1, mlp_only_layers=[])
LEARNING_RATE = {"tiny": "2e-3", "a3b": "1e-4"}
# --phases flagship. "ours": every speed feature; add "--torch_compile" once `--phases compat` shows that it trains
# under ZeRO-3 and FSDP.
FEATURES = ("--use_fast_moe_block", "--use_liger_kernel", "--use_packing")
# transformers + TRL defaults: none of our flags, but TRL's own packing, so that they train on the same rows of
# --max_length tokens (without it every row is one ~40-token example of the bundled task: another job).
DEFAULTS = ("--packing",)
FLAGSHIP_ENGINES = ("zero3", "fsdp")
FLAGSHIP_RUNS = {"ours": ("ours",), "defaults": ("defaults",), "scaling": ("reduced-2", "reduced-N", "resumed")}
FLAGSHIP_LABELS = {"ours": "ours: " + " ".join(f.removeprefix("--") for f in FEATURES),
                   "defaults": "transformers + TRL defaults", "reduced-2": "scaling reference",
                   "reduced-N": "scaling reference, saves", "resumed": "resumed from the mid-way checkpoint"}
EXAMPLE_TOKENS = 32  # the bundled examples average 40 tokens; budgeting 32 a row leaves packing a margin
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_dir(out: Path, name: str, layers: int) -> Path:
    """Where a model lives: the A3B shape's folder names its depth, so that no run loads another depth's weights."""
    return out / "models" / (name if name == "tiny" else f"a3b-{layers}L")


def build_model(out: Path, name: str, layers: int) -> Path:
    """A random-weight bf16 checkpoint with the embedded tokenizer, written once so every engine loads the same
    weights (full depth: 61 GB, built on one GPU in seconds; loading it is transformers' tested path under ZeRO-3 and
    FSDP, where random init of 30B parameters on rank 0's CPU would take minutes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from turbo_tune.modeling import EMBEDDED_MODEL_DIR

    path = model_dir(out, name, layers)
    if (path / "config.json").is_file():
        return path
    config = AutoConfig.from_pretrained(EMBEDDED_MODEL_DIR)
    if name == "a3b":
        config.update({**A3B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR).save_pretrained(path)
    print(f"{path.name}: {model.num_parameters() / 1e9:.3f}B parameters -> {path}", flush=True)
    del model
    torch.cuda.empty_cache()  # the GPUs are the runs' from here on
    return path


def launch_command(gpus: int) -> list[str]:
    if gpus == 1:
        return [sys.executable, "qwen3_sft.py"]
    return [sys.executable, "-m", "turbo_tune.torchrun", "--standalone", "--nproc_per_node", str(gpus),
            "qwen3_sft.py"]


def visible_devices(start: int, count: int) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for a run on `count` of the GPUs this process sees, from the start-th: a plain process
    must see one GPU (or the Trainer spreads it over all with nn.DataParallel), a 2-GPU reference two."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(start + count)]
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids[start:start + count])}


def log_history(output_dir: Path, log: Path | None = None) -> list[dict]:
    """The trainer's log history; when a run was cut off before writing trainer_state.json (a full-depth run's final
    save can outlast the time budget), the log dicts rank 0 printed (4 significant digits, steps counted from 1)."""
    state = output_dir / "trainer_state.json"
    if state.is_file():
        return json.loads(state.read_text())["log_history"]
    entries = []
    for line in log.read_text(errors="replace").splitlines() if log is not None and log.is_file() else []:
        try:
            printed = ast.literal_eval(line.strip()) if line.startswith("{'") else None
        except (ValueError, SyntaxError):
            continue
        if isinstance(printed, dict):
            entries.append({key: number(value) for key, value in printed.items()})
    for step, entry in enumerate((e for e in entries if "loss" in e), start=1):
        entry["step"] = step
    return entries


def number(value):
    """A printed log value as a float when it is one (the trainer prints floats as strings)."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def history(output_dir: Path, log: Path | None = None) -> list[dict]:
    return [e for e in log_history(output_dir, log) if "loss" in e]


def drop_weights(output_dir: Path) -> None:
    """A3B runs write GiBs of weights: keep the numbers, not the files."""
    for file in output_dir.glob("*.safetensors"):
        file.unlink()


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.out, self.deadline = args.out, time.monotonic() + args.budget_s
        self.wall_s: dict[str, float] = {}
        self.env = {**os.environ, **NO_MULTICAST, "TOKENIZERS_PARALLELISM": "false"}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, command: list[str], env: dict[str, str] | None = None) -> bool:
        """One logged subprocess; False when it failed, or did not start because the time budget is spent."""
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        if self.left() < 30:
            log.write_text("skipped: time budget spent\n")
            print(f"[skip] {name}: time budget spent", flush=True)
            return False
        start = time.monotonic()
        with open(log, "w") as handle:
            handle.write("+ " + " ".join(command) + "\n")
            handle.flush()
            proc = subprocess.Popen(command, cwd=ROOT, env={**self.env, **(env or {})}, stdout=handle,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=self.left())
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too, or they would keep holding the GPUs
                proc.wait()
                code = "timeout"
        self.wall_s[name] = time.monotonic() - start
        print(f"[{'ok' if code == 0 else 'FAILED ' + str(code)}] {name} ({self.wall_s[name]:.0f} s)", flush=True)
        return code == 0


def micro_batch(args: argparse.Namespace) -> int:
    """Sequences per GPU per forward pass: fixed by --gpus and --accumulation, so that a run on fewer GPUs keeps
    the global batch (and each GPU's work) by accumulating more."""
    return args.global_batch // (args.gpus * args.accumulation)


def batch_problem(global_batch: int, accumulation: int, gpus: int, gpu_counts: set[int]) -> str | None:
    """Why the global batch cannot stay the same on every GPU count the phases use; None when it can."""
    if global_batch % (gpus * accumulation):
        return f"--global_batch {global_batch} must be a multiple of --gpus {gpus} × --accumulation {accumulation}"
    micro = global_batch // (gpus * accumulation)
    for count in sorted(gpu_counts):
        if global_batch % (micro * count):
            return (f"--global_batch {global_batch} must be a multiple of micro batch {micro} × {count} GPUs, so "
                    f"that the {count}-GPU runs keep the same global batch")
    return None


def base_flags(model_path: Path, steps: int, examples: int, learning_rate: str, args: argparse.Namespace) -> list[str]:
    """What every run shares: data, seed, global batch, logging."""
    return ["--model_path", str(model_path), "--report_to", "none",
            "--use_liger_efficiency_callback", "--logging_steps", "1", "--max_steps", str(steps), "--seed", "0",
            "--bundled_examples", str(examples), "--global_batch_size", str(args.global_batch),
            "--micro_batch_size", str(micro_batch(args)), "--learning_rate", learning_rate]


def train_flags(model_path: Path, model: str, args: argparse.Namespace) -> list[str]:
    """The same flags for every engine (but --output_dir): same data, seed, global batch and precision."""
    saves = ["--save_steps", str(args.steps // 2)] if model == "tiny" else ["--save_strategy", "no"]
    return [*base_flags(model_path, args.steps, args.global_batch * args.steps * 2, LEARNING_RATE[model], args),
            "--model_dtype", "float32", *saves]


def summarize(entries: list[dict], reference: list[dict]) -> dict:
    steady = entries[len(entries) // 4:] or entries  # leave out warm-up steps
    row = {"steps": len(entries), "first_loss": entries[0]["loss"], "last_loss": entries[-1]["loss"],
           "tokens_per_s_per_gpu": statistics.median(e.get("tokens_per_s_per_device", 0) for e in steady),
           "peak_alloc_gib": max(e.get("peak_memory_allocated_gib", 0) for e in entries)}
    if all("mfu" in e for e in steady):  # the callback logs it where it knows the GPU's peak
        row["mfu"] = statistics.median(e["mfu"] for e in steady)
    if reference:
        pairs = [(e["loss"], r["loss"]) for e, r in zip(entries, reference, strict=False)]
        row["max_rel_dloss"] = max(abs(a - b) / abs(b) for a, b in pairs)
    return row


def resumed_dloss(uninterrupted: list[dict], resumed: list[dict], steps: range) -> float | None:
    """Largest |Δloss| between a resumed run and the uninterrupted one over steps; None when a step is missing."""
    expected = {e["step"]: e["loss"] for e in uninterrupted}
    got = {e["step"]: e["loss"] for e in resumed}
    if not all(s in expected and s in got for s in steps):
        return None
    return max(abs(got[s] - expected[s]) for s in steps)


def stages(runner: Runner, models: dict[str, Path], args: argparse.Namespace) -> dict:
    results = {}
    for model, path in models.items():
        for engine in args.engines:
            flags = ENGINES[engine]
            gpus = 1 if engine == "single" else args.gpus
            output_dir = args.out / "runs" / f"{model}-{engine}"
            command = [*launch_command(gpus), "--output_dir", str(output_dir), *train_flags(path, model, args), *flags]
            ok = runner.run(f"{model}-{engine}", command, visible_devices(0, 1) if gpus == 1 else None)
            entries = history(output_dir)
            row = {"model": model, "engine": engine, "gpus": gpus, "ok": ok and len(entries) == args.steps}
            if entries:
                row.update(summarize(entries, history(args.out / "runs" / f"{model}-single")))
                (args.out / "losses").mkdir(exist_ok=True)
                (args.out / "losses" / f"{model}-{engine}.json").write_text(json.dumps(entries))
            results[f"{model}-{engine}"] = row
            if model != "tiny":
                drop_weights(output_dir)
    return results


def resume(runner: Runner, models: dict[str, Path], args: argparse.Namespace) -> dict:
    results = {}
    for engine in RESUMED:
        first = args.out / "runs" / f"tiny-{engine}"
        checkpoint = first / f"checkpoint-{args.steps // 2}"
        output_dir = args.out / "runs" / f"tiny-{engine}-resumed"
        command = [*launch_command(args.gpus), "--output_dir", str(output_dir),
                   *train_flags(models["tiny"], "tiny", args), *ENGINES[engine], "--resume_from_checkpoint",
                   str(checkpoint)]
        ok = checkpoint.is_dir() and runner.run(f"tiny-{engine}-resumed", command)
        steps = range(args.steps // 2 + 1, args.steps + 1)
        dloss = resumed_dloss(history(first), history(output_dir), steps) if ok else None
        results[engine] = {"ok": dloss is not None, "steps": f"{steps.start}-{steps.stop - 1}", "max_abs_dloss": dloss}
    return results


def multinode(runner: Runner, models: dict[str, Path], args: argparse.Namespace) -> dict:
    """qwen3_sft_multinode.sh as two nodes of N/2 GPUs on this machine, against the one-node N-GPU ZeRO-3 run."""
    port, prefix, per_node = str(free_port()), args.out / "runs", args.gpus // 2
    flags = train_flags(models["tiny"], "tiny", args)  # the script adds --output_dir CKPT_PREFIX/RUN_NAME
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NNODES": "2", "GPUS_PER_NODE": str(per_node),
            "RUN_NAME": "tiny-multinode", "CKPT_PREFIX": str(prefix), "TURBO_TUNE_NO_VENV": "1",
            "DS_CONFIG_PATH": "config/zero3.json"}
    logs = [args.out / "logs" / f"tiny-multinode-node{rank}.log" for rank in (0, 1)]
    if runner.left() < 60:
        return {"ok": False, "note": "skipped: time budget spent"}
    procs = []
    for rank, log in enumerate(logs):
        env = {**runner.env, **base, "NODE_RANK": str(rank), **visible_devices(rank * per_node, per_node)}
        procs.append(subprocess.Popen(["bash", "qwen3_sft_multinode.sh", *flags], cwd=ROOT, env=env,
                                      stdout=open(log, "w"), stderr=subprocess.STDOUT))
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(runner.left(), 1)))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append("timeout")
    command = next((line for line in logs[0].read_text().splitlines() if line.startswith("+ ")), "")
    entries = history(prefix / "tiny-multinode")
    row = {"ok": codes == [0, 0] and len(entries) == args.steps, "exit_codes": codes, "command": command}
    if entries:
        row.update(summarize(entries, history(prefix / "tiny-zero3")))
    print(f"[{'ok' if row['ok'] else 'FAILED'}] tiny-multinode {codes}", flush=True)
    return row


def compat(runner: Runner, models: dict[str, Path], args: argparse.Namespace) -> dict:
    results = {}
    for engine in (engine for engine in COMPAT_ENGINES if engine in args.engines):
        for patch, flags in ((p, f) for p, f in PATCHES.items() if p in args.patches):
            name = f"compat-{engine}-{patch}"
            output_dir = args.out / "runs" / name
            command = [*launch_command(args.gpus), "--output_dir", str(output_dir),
                       *train_flags(models["tiny"], "tiny", args), *ENGINES[engine], *flags, "--max_steps", "5",
                       "--save_strategy", "no"]
            ok = runner.run(name, command, env=COMPAT_ENV)
            log = (args.out / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
            errors = [line for line in log if "error" in line.lower() and "qwen3_sft.py" in line]
            results[name] = {"engine": engine, "patch": patch, "ok": ok, "error": (errors or log[-1:] or [""])[-1]}
    return results


@dataclass(frozen=True)
class Run:
    """One flagship run: what it launches, on how many GPUs, and where it writes."""

    name: str
    engine: str
    kind: str
    gpus: int
    layers: int
    max_steps: int
    output_dir: Path
    command: list[str]
    env: dict[str, str]


def flagship_engines(args: argparse.Namespace) -> list[str]:
    return [engine for engine in FLAGSHIP_ENGINES if engine in args.engines]


def flagship_plan(args: argparse.Namespace) -> list[Run]:
    """Every flagship run in launch order, built before anything runs (so the tests can read the commands).

    All runs train the same packed rows with a constant learning rate after warm-up, so that a resume cut short
    (--flagship_resume_steps) replays exactly the learning rates of the uninterrupted run.
    """
    half = args.flagship_steps // 2
    examples = args.global_batch * args.flagship_steps * args.max_length // EXAMPLE_TOKENS
    runs = []
    for engine in flagship_engines(args):
        for kind in (kind for group in args.flagship_runs for kind in FLAGSHIP_RUNS[group]):
            if kind == "reduced-2" and args.gpus == 2:
                continue  # the N-GPU reference is this one
            gpus = 2 if kind == "reduced-2" else args.gpus
            layers = args.a3b_layers if kind in ("ours", "defaults") else args.scaling_layers
            steps, saves = args.flagship_steps, ["--save_strategy", "no"]
            if kind == "reduced-N":
                saves = ["--save_steps", str(half)]
            if kind == "resumed":
                checkpoint = args.out / "runs" / f"flagship-{engine}-reduced-N" / f"checkpoint-{half}"
                steps, saves = half + args.flagship_resume_steps, [*saves, "--resume_from_checkpoint", str(checkpoint)]
            output_dir = args.out / "runs" / f"flagship-{engine}-{kind}"
            flags = [*base_flags(model_dir(args.out, "a3b", layers), steps, examples, LEARNING_RATE["a3b"], args),
                     "--max_length", str(args.max_length), "--lr_scheduler_type", "constant_with_warmup",
                     "--warmup_steps", "3", *saves, *ENGINES[engine], *(DEFAULTS if kind == "defaults" else FEATURES)]
            runs.append(Run(f"flagship-{engine}-{kind}", engine, kind, gpus, layers, steps, output_dir,
                            [*launch_command(gpus), "--output_dir", str(output_dir), *flags],
                            visible_devices(0, gpus) if gpus < args.gpus else {}))
    return runs


def flagship(runner: Runner, args: argparse.Namespace) -> dict:
    """Each planned run's row. Final weights and the mid-way checkpoint go once measured: at full depth a model is
    61 GB (bf16) to 122 GB (FSDP's fp32), and a sharded checkpoint with Adam's state 12 bytes a parameter."""
    plan = flagship_plan(args)
    for layers in sorted({run.layers for run in plan}):
        build_model(args.out, "a3b", layers)
    results = {}
    for run in plan:
        shutil.rmtree(run.output_dir, ignore_errors=True)  # a run of an earlier invocation (qwen3_sft.py refuses it)
        ok = runner.run(run.name, run.command, run.env)
        log = args.out / "logs" / f"{run.name}.log"
        entries = history(run.output_dir, log)
        runtime = [e["train_runtime"] for e in log_history(run.output_dir, log) if "train_runtime" in e]
        row = {"engine": run.engine, "kind": run.kind, "gpus": run.gpus, "layers": run.layers,
               "ok": ok and bool(entries) and entries[-1]["step"] == run.max_steps,
               "wall_s": runner.wall_s.get(run.name), "train_runtime_s": runtime[-1] if runtime else None}
        if run.kind == "resumed":
            half = args.flagship_steps // 2
            steps = range(half + 1, run.max_steps + 1)
            uninterrupted = args.out / "runs" / f"flagship-{run.engine}-reduced-N"
            row["compared_steps"] = f"{steps.start}-{steps.stop - 1}"
            row["max_abs_dloss"] = resumed_dloss(history(uninterrupted), entries, steps)
            row["ok"] = row["ok"] and row["max_abs_dloss"] is not None
            entries = [e for e in entries if e["step"] > half]
            for checkpoint in uninterrupted.glob("checkpoint-*"):  # sharded, with optimizer state: tens of GB
                shutil.rmtree(checkpoint)
        if entries:
            row.update(summarize(entries, []))
        results[run.name] = row
        drop_weights(run.output_dir)
    return results


def throughput_ratio(row: dict | None, reference: dict | None) -> float | None:
    """One run's tokens/s per GPU over another's: ours over the defaults' is the speed-up; N GPUs over 2 at the same
    depth and global batch is the scaling efficiency (1.0: linear). None when either run has no throughput."""
    if not (row or {}).get("tokens_per_s_per_gpu") or not (reference or {}).get("tokens_per_s_per_gpu"):
        return None
    return row["tokens_per_s_per_gpu"] / reference["tokens_per_s_per_gpu"]


def print_tables(results: dict, args: argparse.Namespace) -> None:
    print(f"\nSame global batch {args.global_batch} on every engine, {args.steps} steps, fp32 master weights + bf16 "
          "compute; max |Δloss|/loss is against the one-GPU run, step by step.\n")
    print("| model | engine | GPUs | ok | loss first → last | max \\|Δloss\\|/loss vs 1 GPU | tokens/s per GPU "
          "(median) | peak alloc GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results.get("stages", {}).values():
        print(f"| {row['model']} | {row['engine']} | {row['gpus']} | {'yes' if row['ok'] else '**no**'} | "
              f"{fmt(row.get('first_loss'), '.4f')} → {fmt(row.get('last_loss'), '.4f')} | "
              f"{fmt(row.get('max_rel_dloss'), '.2e')} | {fmt(row.get('tokens_per_s_per_gpu'), ',.0f')} | "
              f"{fmt(row.get('peak_alloc_gib'), '.2f')} |")
    if "resume" in results:
        print("\n| resumed mid-way (tiny) | ok | steps compared | max \\|Δloss\\| vs the uninterrupted run |")
        print("|---|---|---|---|")
        for engine, row in results["resume"].items():
            print(f"| {engine} | {'yes' if row['ok'] else '**no**'} | {row['steps']} | "
                  f"{fmt(row['max_abs_dloss'], '.2e')} |")
    if "multinode" in results:
        row = results["multinode"]
        print(f"\nqwen3_sft_multinode.sh, 2 nodes × {args.gpus // 2} GPU(s) (ZeRO-3, tiny): ok={row['ok']}, max "
              f"|Δloss|/loss vs one node × {args.gpus} GPUs = {fmt(row.get('max_rel_dloss'), '.2e')}, tokens/s per GPU "
              f"{fmt(row.get('tokens_per_s_per_gpu'), ',.0f')}\n`{row.get('command', row.get('note', ''))}`")


def print_compat(results: dict) -> None:
    print("\n| patch | " + " | ".join(COMPAT_ENGINES) + " |\n|---|" + "---|" * len(COMPAT_ENGINES))
    for patch in PATCHES:
        cells = []
        for engine in COMPAT_ENGINES:
            row = results.get(f"compat-{engine}-{patch}")
            cells.append("-" if row is None else "ok" if row["ok"] else f"**fails**: {row['error'][-90:]}")
        print(f"| {patch} | " + " | ".join(cells) + " |")


def print_flagship(rows: dict, args: argparse.Namespace) -> None:
    print(f"\nFull-parameter SFT of Qwen3-30B-A3B's shape (random weights), {args.global_batch} packed rows of "
          f"{args.max_length} tokens per step on every GPU count, {args.flagship_steps} steps; tokens/s per GPU and "
          "MFU are medians after the first quarter of the steps, peak memory is rank 0's.\n")
    print("| engine | run | GPUs | layers | ok | tokens/s per GPU | MFU | peak alloc GiB | train s | process s "
          "| loss first → last |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows.values():
        print(f"| {row['engine']} | {FLAGSHIP_LABELS[row['kind']]} | {row['gpus']} | {row['layers']} | "
              f"{'yes' if row['ok'] else '**no**'} | {fmt(row.get('tokens_per_s_per_gpu'), ',.0f')} | "
              f"{fmt(row.get('mfu'), '.1%')} | {fmt(row.get('peak_alloc_gib'), '.1f')} | "
              f"{fmt(row.get('train_runtime_s'), '.0f')} | {fmt(row.get('wall_s'), '.0f')} | "
              f"{fmt(row.get('first_loss'), '.4f')} → {fmt(row.get('last_loss'), '.4f')} |")
    for engine in FLAGSHIP_ENGINES:
        run = {row["kind"]: row for row in rows.values() if row["engine"] == engine}
        if not run:
            continue
        at_n = run.get("reduced-N")
        at_2 = run.get("reduced-2", at_n if at_n and at_n["gpus"] == 2 else None)
        resumed = run.get("resumed", {})
        print(f"\n{engine}: ours / defaults tokens/s per GPU = "
              f"{fmt(throughput_ratio(run.get('ours'), run.get('defaults')), '.2f')}×; scaling efficiency 2 → "
              f"{(at_n or {}).get('gpus', args.gpus)} GPUs at {(at_n or {}).get('layers', args.scaling_layers)} "
              f"layers = {fmt(throughput_ratio(at_n, at_2), '.2f')}; resumed steps "
              f"{resumed.get('compared_steps', '-')}: max |Δloss| vs the uninterrupted run = "
              f"{fmt(resumed.get('max_abs_dloss'), '.2e')}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus", type=int, help="GPUs of the multi-GPU runs (default: every visible GPU)")
    parser.add_argument("--phases", nargs="+", choices=["stages", "resume", "multinode", "compat", "flagship"],
                        default=["stages", "resume", "multinode"])
    parser.add_argument("--models", nargs="+", choices=["tiny", "a3b"], default=["tiny", "a3b"])
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES),
                        help="engines of the stages phase (resume needs zero3 and fsdp, multinode zero3)")
    parser.add_argument("--patches", nargs="+", choices=list(PATCHES), default=list(PATCHES),
                        help="the patches --phases compat runs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global_batch", type=int, default=16, help="sequences per optimizer step, every engine")
    parser.add_argument("--accumulation", type=int, default=2,
                        help="gradient accumulation steps on --gpus GPUs (fewer GPUs accumulate more)")
    parser.add_argument("--a3b_layers", type=int,
                        help=f"decoder layers of the Qwen3-30B-A3B shape (default: {QWEN3_30B_A3B_LAYERS} with "
                             "--phases flagship, else 2)")
    parser.add_argument("--flagship_runs", nargs="+", choices=list(FLAGSHIP_RUNS), default=list(FLAGSHIP_RUNS),
                        help="which flagship runs (per engine of --engines among zero3, fsdp)")
    parser.add_argument("--flagship_steps", type=int, default=50)
    parser.add_argument("--flagship_resume_steps", type=int,
                        help="steps the resumed run trains past its mid-way checkpoint (default: to the end)")
    parser.add_argument("--scaling_layers", type=int, default=8, help="depth of the 2-GPU vs N-GPU reference")
    parser.add_argument("--max_length", type=int, default=4096, help="tokens per packed row (flagship)")
    parser.add_argument("--budget_s", type=float, default=520, help="start no run after this many seconds")
    args = parser.parse_args(argv)
    if args.gpus is None:
        import torch

        args.gpus = torch.cuda.device_count()
    if args.a3b_layers is None:
        args.a3b_layers = QWEN3_30B_A3B_LAYERS if "flagship" in args.phases else 2
    half = args.flagship_steps // 2
    if args.flagship_resume_steps is None:
        args.flagship_resume_steps = args.flagship_steps - half
    single_only = args.phases == ["stages"] and args.engines == ["single"]
    if args.gpus < (1 if single_only else 2):
        parser.error(f"--gpus {args.gpus}: the multi-GPU engines need at least 2 GPUs, the single one 1")
    counts = {args.gpus} | ({1} if "stages" in args.phases and "single" in args.engines else set())
    if "flagship" in args.phases:
        counts |= {2} if "scaling" in args.flagship_runs else set()
        if not flagship_engines(args):
            parser.error("--phases flagship runs under zero3 and fsdp: add one of them to --engines")
        if half < 1 or not 1 <= args.flagship_resume_steps <= args.flagship_steps - half:
            parser.error(f"--flagship_resume_steps must be 1..{args.flagship_steps - half} (steps after the "
                         f"checkpoint at step {half} of --flagship_steps {args.flagship_steps})")
    problem = batch_problem(args.global_batch, args.accumulation, args.gpus, counts)
    if problem:
        parser.error(problem)
    if "multinode" in args.phases and args.gpus % 2:
        parser.error(f"--phases multinode splits the GPUs into two nodes: --gpus {args.gpus} must be even")
    if {"resume", "multinode", "compat"} & set(args.phases) and "tiny" not in args.models:
        parser.error("the resume, multinode and compat phases use the tiny model: add it to --models")
    return args


def merge(previous: dict, new: dict) -> dict:
    """Earlier invocations' results with this one's on top (a long benchmark can be split over several)."""
    merged = dict(previous)
    for phase, rows in new.items():
        merged[phase] = rows if phase == "multinode" else {**previous.get(phase, {}), **rows}
    return merged


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args)
    needs_models = {"stages", "resume", "multinode", "compat"} & set(args.phases)
    models = {name: build_model(args.out, name, args.a3b_layers) for name in args.models} if needs_models else {}
    results = {}
    if "stages" in args.phases:
        results["stages"] = stages(runner, models, args)
    if "resume" in args.phases:
        results["resume"] = resume(runner, models, args)
    if "multinode" in args.phases:
        results["multinode"] = multinode(runner, models, args)
    if "compat" in args.phases:
        results["compat"] = compat(runner, models, args)
    if "flagship" in args.phases:
        results["flagship"] = flagship(runner, args)
    saved = args.out / "distributed.json"
    results = merge(json.loads(saved.read_text()) if saved.is_file() else {}, results)
    saved.write_text(json.dumps(results, indent=1))
    if {"stages", "resume", "multinode"} & set(results):
        print_tables(results, args)
    if "compat" in results:
        print_compat(results["compat"])
    if "flagship" in results:
        print_flagship(results["flagship"], args)
    rows = [*results.get("stages", {}).values(), *results.get("resume", {}).values(),
            *results.get("compat", {}).values(), *results.get("flagship", {}).values()]
    return 0 if all(row["ok"] for row in rows) and results.get("multinode", {"ok": True})["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
