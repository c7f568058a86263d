"""Every engine on a 2-GPU machine through qwen3_sft.py: loss agreement, tokens/s per GPU, peak memory, resume, nodes.

    python3 benchmarks/distributed.py --out DIR [--phases stages resume multinode compat] [--models tiny a3b]

For each model (the embedded tiny Qwen3-MoE, and a Qwen3-30B-A3B-shaped model cut to --a3b_layers layers, both saved
once with random weights so that every engine starts from the same ones) it trains --steps steps on one GPU and
under ZeRO-1, ZeRO-2, ZeRO-3 and FSDP2 on two, with the same global batch and the same numerics (fp32 master
weights, bf16 compute). Then it resumes the tiny ZeRO-3 and FSDP runs from their mid-way checkpoints and compares the
losses that follow, and runs qwen3_sft_multinode.sh as two one-GPU "nodes" on 127.0.0.1. `--phases compat` (not in
the default) trains the tiny model a few steps with each of Turbo-Tune's patches under ZeRO-2, ZeRO-3 and FSDP2.
Logs, trainer states and distributed.json go to DIR; the markdown tables are printed last. Runs that would start past
--budget_s are skipped (and say so).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
# Qwen3-30B-A3B's shape (config.json of the release); only the depth is cut.
A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
           num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128, norm_topk_prob=True,
           rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=False,
           router_aux_loss_coef=0.001, decoder_sparse_step=1, mlp_only_layers=[])
LEARNING_RATE = {"tiny": "2e-3", "a3b": "1e-4"}
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_models(out: Path, names: list[str], a3b_layers: int) -> dict[str, Path]:
    """Random-weight checkpoints with the embedded tokenizer, written once so every engine loads the same weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from turbo_tune.modeling import EMBEDDED_MODEL_DIR

    paths = {}
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    for name in names:
        config = AutoConfig.from_pretrained(EMBEDDED_MODEL_DIR)
        if name == "a3b":
            config.update({**A3B, "num_hidden_layers": a3b_layers})
        path = paths[name] = out / "models" / name
        if not (path / "config.json").is_file():
            torch.manual_seed(0)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            print(f"{name}: {model.num_parameters() / 1e9:.3f}B parameters -> {path}", flush=True)
            del model
            torch.cuda.empty_cache()  # the GPUs are the runs' from here on
    return paths


def launch_command(gpus: int) -> list[str]:
    if gpus == 1:
        return [sys.executable, "qwen3_sft.py"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
            "qwen3_sft.py"]


def history(output_dir: Path) -> list[dict]:
    state = output_dir / "trainer_state.json"
    return [e for e in json.loads(state.read_text())["log_history"] if "loss" in e] if state.is_file() else []


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.out, self.deadline = args.out, time.monotonic() + args.budget_s
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
            try:
                code = subprocess.run(command, cwd=ROOT, env={**self.env, **(env or {})}, stdout=handle,
                                      stderr=subprocess.STDOUT, timeout=self.left()).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        print(f"[{'ok' if code == 0 else 'FAILED ' + str(code)}] {name} ({time.monotonic() - start:.0f} s)", flush=True)
        return code == 0


def train_flags(model_path: Path, model: str, args: argparse.Namespace) -> list[str]:
    """The same flags for every engine (but --output_dir): same data, seed, global batch and precision."""
    saves = ["--save_steps", str(args.steps // 2)] if model == "tiny" else ["--save_strategy", "no"]
    return ["--model_path", str(model_path), "--report_to", "none",
            "--use_liger_efficiency_callback", "--logging_steps", "1", "--max_steps", str(args.steps), "--seed", "0",
            "--bundled_examples", str(args.global_batch * args.steps * 2), "--global_batch_size",
            str(args.global_batch), "--micro_batch_size", str(args.global_batch // (2 * args.accumulation)),
            "--model_dtype", "float32", "--learning_rate", LEARNING_RATE[model], *saves]


def summarize(entries: list[dict], reference: list[dict]) -> dict:
    steady = entries[len(entries) // 4:] or entries  # leave out warm-up steps
    row = {"steps": len(entries), "first_loss": entries[0]["loss"], "last_loss": entries[-1]["loss"],
           "tokens_per_s_per_gpu": statistics.median(e.get("tokens_per_s_per_device", 0) for e in steady),
           "peak_alloc_gib": max(e.get("peak_memory_allocated_gib", 0) for e in entries)}
    if reference:
        pairs = [(e["loss"], r["loss"]) for e, r in zip(entries, reference, strict=False)]
        row["max_rel_dloss"] = max(abs(a - b) / abs(b) for a, b in pairs)
    return row


def stages(runner: Runner, models: dict[str, Path], args: argparse.Namespace) -> dict:
    results = {}
    for model, path in models.items():
        for engine in args.engines:
            flags = ENGINES[engine]
            gpus = 1 if engine == "single" else 2
            output_dir = args.out / "runs" / f"{model}-{engine}"
            command = [*launch_command(gpus), "--output_dir", str(output_dir), *train_flags(path, model, args), *flags]
            # One visible GPU, or the Trainer would spread a plain process over both with nn.DataParallel.
            ok = runner.run(f"{model}-{engine}", command, {"CUDA_VISIBLE_DEVICES": "0"} if gpus == 1 else None)
            entries = history(output_dir)
            row = {"model": model, "engine": engine, "gpus": gpus, "ok": ok and len(entries) == args.steps}
            if entries:
                row.update(summarize(entries, history(args.out / "runs" / f"{model}-single")))
                (args.out / "losses").mkdir(exist_ok=True)
                (args.out / "losses" / f"{model}-{engine}.json").write_text(json.dumps(entries))
            results[f"{model}-{engine}"] = row
            if model != "tiny":  # a few GiB of weights per run: keep the numbers, not the files
                for file in output_dir.glob("*.safetensors"):
                    file.unlink()
    return results


def resume(runner: Runner, models: dict[str, Path], args: argparse.Namespace) -> dict:
    results = {}
    for engine in RESUMED:
        first = args.out / "runs" / f"tiny-{engine}"
        checkpoint = first / f"checkpoint-{args.steps // 2}"
        output_dir = args.out / "runs" / f"tiny-{engine}-resumed"
        command = [*launch_command(2), "--output_dir", str(output_dir), *train_flags(models["tiny"], "tiny", args),
                   *ENGINES[engine], "--resume_from_checkpoint", str(checkpoint)]
        ok = checkpoint.is_dir() and runner.run(f"tiny-{engine}-resumed", command)
        expected = {e["step"]: e["loss"] for e in history(first)}
        resumed = {e["step"]: e["loss"] for e in history(output_dir)}
        steps = range(args.steps // 2 + 1, args.steps + 1)
        complete = ok and all(s in resumed and s in expected for s in steps)
        results[engine] = {"ok": complete, "steps": f"{steps.start}-{steps.stop - 1}",
                           "max_abs_dloss": max(abs(resumed[s] - expected[s]) for s in steps) if complete else None}
    return results


def multinode(runner: Runner, models: dict[str, Path], args: argparse.Namespace) -> dict:
    """qwen3_sft_multinode.sh as two one-GPU nodes on this machine, against the one-node two-GPU ZeRO-3 run."""
    port, prefix = str(free_port()), args.out / "runs"
    flags = train_flags(models["tiny"], "tiny", args)  # the script adds --output_dir CKPT_PREFIX/RUN_NAME
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NNODES": "2", "GPUS_PER_NODE": "1",
            "RUN_NAME": "tiny-multinode", "CKPT_PREFIX": str(prefix), "TURBO_TUNE_NO_VENV": "1",
            "DS_CONFIG_PATH": "config/zero3.json"}
    logs = [args.out / "logs" / f"tiny-multinode-node{rank}.log" for rank in (0, 1)]
    if runner.left() < 60:
        return {"ok": False, "note": "skipped: time budget spent"}
    procs = []
    for rank, log in enumerate(logs):
        env = {**runner.env, **base, "NODE_RANK": str(rank), "CUDA_VISIBLE_DEVICES": str(rank)}
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
    for engine in COMPAT_ENGINES:
        for patch, flags in PATCHES.items():
            name = f"compat-{engine}-{patch}"
            output_dir = args.out / "runs" / name
            command = [*launch_command(2), "--output_dir", str(output_dir), *train_flags(models["tiny"], "tiny", args),
                       *ENGINES[engine], *flags, "--max_steps", "5", "--save_strategy", "no"]
            ok = runner.run(name, command)
            log = (args.out / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
            errors = [line for line in log if "error" in line.lower() and "qwen3_sft.py" in line]
            results[name] = {"engine": engine, "patch": patch, "ok": ok, "error": (errors or log[-1:] or [""])[-1]}
    return results


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


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
        print(f"\nqwen3_sft_multinode.sh, 2 nodes × 1 GPU (ZeRO-3, tiny): ok={row['ok']}, max |Δloss|/loss vs "
              f"one node × 2 GPUs = {fmt(row.get('max_rel_dloss'), '.2e')}, tokens/s per GPU "
              f"{fmt(row.get('tokens_per_s_per_gpu'), ',.0f')}\n`{row.get('command', row.get('note', ''))}`")


def print_compat(results: dict) -> None:
    print("\n| patch | " + " | ".join(COMPAT_ENGINES) + " |\n|---|" + "---|" * len(COMPAT_ENGINES))
    for patch in PATCHES:
        cells = []
        for engine in COMPAT_ENGINES:
            row = results.get(f"compat-{engine}-{patch}")
            cells.append("-" if row is None else "ok" if row["ok"] else f"**fails**: {row['error'][-90:]}")
        print(f"| {patch} | " + " | ".join(cells) + " |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phases", nargs="+", choices=["stages", "resume", "multinode", "compat"],
                        default=["stages", "resume", "multinode"])
    parser.add_argument("--models", nargs="+", choices=["tiny", "a3b"], default=["tiny", "a3b"])
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES),
                        help="engines of the stages phase (resume needs zero3 and fsdp, multinode zero3)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global_batch", type=int, default=16, help="sequences per optimizer step, every engine")
    parser.add_argument("--accumulation", type=int, default=2, help="gradient accumulation steps on two GPUs")
    parser.add_argument("--a3b_layers", type=int, default=2, help="decoder layers of the Qwen3-30B-A3B shape")
    parser.add_argument("--budget_s", type=float, default=520, help="start no run after this many seconds")
    args = parser.parse_args(argv)
    if args.global_batch % (2 * args.accumulation):
        parser.error("--global_batch must be a multiple of 2 × --accumulation")
    if {"resume", "multinode", "compat"} & set(args.phases) and "tiny" not in args.models:
        parser.error("the resume, multinode and compat phases use the tiny model: add it to --models")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args)
    models = build_models(args.out, args.models, args.a3b_layers)
    results = {}
    if "stages" in args.phases:
        results["stages"] = stages(runner, models, args)
    if "resume" in args.phases:
        results["resume"] = resume(runner, models, args)
    if "multinode" in args.phases:
        results["multinode"] = multinode(runner, models, args)
    if "compat" in args.phases:
        results["compat"] = compat(runner, models, args)
    (args.out / "distributed.json").write_text(json.dumps(results, indent=1))
    print_tables(results, args)
    if "compat" in results:
        print_compat(results["compat"])
    rows = [*results.get("stages", {}).values(), *results.get("resume", {}).values(),
            *results.get("compat", {}).values()]
    return 0 if all(row["ok"] for row in rows) and results.get("multinode", {"ok": True})["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
