"""benchmarks/distributed.py on the CPU: its arguments, the models it builds, the commands it would launch and the
tables it prints (the runs need GPUs)."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import distributed  # noqa: E402

from turbo_tune.modeling import EMBEDDED_MODEL_DIR  # noqa: E402


def parse(tmp_path: Path, *flags: str):
    return distributed.parse_args(["--out", str(tmp_path), *flags])


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_defaults_run_every_phase_on_both_models(tmp_path):
    args = parse(tmp_path, "--gpus", "2")
    assert args.phases == ["stages", "resume", "multinode"] and args.models == ["tiny", "a3b"]
    assert list(distributed.ENGINES) == ["single", "zero1", "zero2", "zero3", "fsdp"] and args.a3b_layers == 2
    flags = distributed.train_flags(tmp_path / "m", "tiny", args)
    micro = int(flag(flags, "--micro_batch_size"))
    assert int(flag(flags, "--global_batch_size")) == args.global_batch == 2 * micro * args.accumulation


def test_gpu_count_defaults_to_the_visible_gpus_and_needs_two(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert parse(tmp_path).gpus == 4
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit):
        parse(tmp_path)
    assert parse(tmp_path, "--phases", "stages", "--engines", "single").gpus == 1


def test_the_global_batch_stays_the_same_on_every_gpu_count(tmp_path):
    args = parse(tmp_path, "--gpus", "8")  # 16 sequences: 1 × 8 GPUs × 2, 1 × 1 GPU × 16
    assert distributed.micro_batch(args) == 1
    assert distributed.batch_problem(16, 2, 8, {1, 2, 8}) is None
    assert "--gpus 8 × --accumulation 4" in distributed.batch_problem(16, 4, 8, {8})
    assert "2-GPU runs" in distributed.batch_problem(24, 1, 3, {1, 2, 3})  # micro 8: 24 is no multiple of 16
    for bad in (["--gpus", "8", "--accumulation", "4"], ["--gpus", "3", "--global_batch", "24", "--accumulation", "1",
                                                          "--phases", "flagship"]):
        with pytest.raises(SystemExit):
            parse(tmp_path, *bad)
    with pytest.raises(SystemExit):  # two nodes of 3/2 GPUs
        parse(tmp_path, "--gpus", "3", "--global_batch", "12", "--accumulation", "1", "--models", "tiny")


def test_resume_without_the_tiny_model_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        parse(tmp_path, "--gpus", "2", "--models", "a3b")


def test_the_a3b_shape_is_qwen3_30b_a3b_cut_in_depth():
    config = AutoConfig.from_pretrained(EMBEDDED_MODEL_DIR)
    config.update({**distributed.A3B, "num_hidden_layers": 2})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (128, 2 * 768, 2048) and experts.down_proj.shape == (128, 2048, 768)
    per_layer = 128 * 3 * 768 * 2048 + 128 * 2048 + 2 * 2048 * 4096 + 2 * 2048 * 512  # experts, router, attention
    assert model.num_parameters() == pytest.approx(2 * 151936 * 2048 + 2 * per_layer, rel=1e-3)


def test_every_phase_launches_on_the_gpu_count_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert distributed.launch_command(8)[-3:] == ["--nproc_per_node", "8", "qwen3_sft.py"]
    assert distributed.visible_devices(4, 4) == {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}  # node 1 of 2 × 4 GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    assert distributed.visible_devices(0, 2) == {"CUDA_VISIBLE_DEVICES": "3,5"}


@pytest.mark.parametrize("gpus", [8, 2])
def test_flagship_commands(tmp_path, monkeypatch, gpus):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    args = parse(tmp_path, "--gpus", str(gpus), "--phases", "flagship", "--flagship_resume_steps", "5")
    assert (args.a3b_layers, args.flagship_steps, args.max_length) == (48, 50, 4096)
    runs = {run.name: run for run in distributed.flagship_plan(args)}
    kinds = ["ours", "defaults", "reduced-N", "resumed"] + (["reduced-2"] if gpus > 2 else [])
    assert sorted(runs) == sorted(f"flagship-{e}-{k}" for e in ("zero3", "fsdp") for k in kinds)
    ours, defaults = runs["flagship-zero3-ours"], runs["flagship-fsdp-defaults"]
    assert ours.command[:6] == [sys.executable, "-m", "turbo_tune.torchrun", "--standalone", "--nproc_per_node",
                                str(gpus)] and ours.env == {}
    assert flag(ours.command, "--model_path") == str(tmp_path / "models" / "a3b-48L")
    assert flag(ours.command, "--deepspeed_config") == "config/zero3.json" and "--fsdp" in defaults.command
    assert set(distributed.FEATURES) <= set(ours.command) and "--use_lora" not in ours.command
    assert not set(distributed.FEATURES) & set(defaults.command) and "--packing" in defaults.command
    for run in runs.values():  # same data, rows and global batch everywhere; 1 row per GPU per pass on 8 GPUs
        assert (flag(run.command, "--max_length"), flag(run.command, "--global_batch_size")) == ("4096", "16")
        assert flag(run.command, "--micro_batch_size") == str(16 // (2 * gpus))
        assert flag(run.command, "--bundled_examples") == str(16 * 50 * 4096 // 32)
    reduced, resumed = runs["flagship-fsdp-reduced-N"], runs["flagship-fsdp-resumed"]
    assert flag(reduced.command, "--model_path").endswith("a3b-8L") and flag(reduced.command, "--save_steps") == "25"
    assert flag(resumed.command, "--resume_from_checkpoint") == str(reduced.output_dir / "checkpoint-25")
    assert flag(resumed.command, "--max_steps") == "30" and resumed.max_steps == 30
    if gpus > 2:
        reference = runs["flagship-zero3-reduced-2"]
        assert reference.gpus == 2 and reference.env == {"CUDA_VISIBLE_DEVICES": "0,1"}
        assert flag(reference.command, "--nproc_per_node") == "2"
        assert flag(reference.command, "--micro_batch_size") == "1"  # the same per-GPU work, 8 accumulation steps


def test_flagship_arguments_are_checked(tmp_path):
    for bad in (["--flagship_resume_steps", "26"], ["--engines", "zero1"]):
        with pytest.raises(SystemExit):
            parse(tmp_path, "--gpus", "8", "--phases", "flagship", *bad)
    args = parse(tmp_path, "--gpus", "8", "--phases", "flagship", "--engines", "fsdp", "--flagship_runs", "ours")
    assert [run.name for run in distributed.flagship_plan(args)] == ["flagship-fsdp-ours"]


def test_a_cut_off_run_is_read_from_its_log(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("+ python3 qwen3_sft.py\n{'loss': '5.25', 'tokens_per_s_per_device': '1.2e+04', 'epoch': '0.1'}\n"
                   "noise {'loss': 1}\n{'loss': '4.5', 'mfu': '0.25'}\n{'train_runtime': '95.5'}\n")
    entries = distributed.log_history(tmp_path / "missing", log)
    assert entries[0] == {"loss": 5.25, "tokens_per_s_per_device": 12000.0, "epoch": 0.1, "step": 1}
    assert [e.get("step") for e in entries] == [1, 2, None] and entries[2]["train_runtime"] == 95.5


def test_flagship_table_speedup_scaling_and_resume(tmp_path, capsys):
    def row(kind, gpus, layers, tokens, **extra):
        return {"engine": "zero3", "kind": kind, "gpus": gpus, "layers": layers, "ok": True, "first_loss": 12.0,
                "last_loss": 7.5, "tokens_per_s_per_gpu": tokens, "mfu": 0.2, "peak_alloc_gib": 70.25,
                "train_runtime_s": 200.0, "wall_s": 400.0, **extra}

    rows = {"flagship-zero3-ours": row("ours", 8, 48, 3000.0),
            "flagship-zero3-defaults": row("defaults", 8, 48, 1200.0),
            "flagship-zero3-reduced-2": row("reduced-2", 2, 8, 5000.0),
            "flagship-zero3-reduced-N": row("reduced-N", 8, 8, 4500.0),
            "flagship-zero3-resumed": row("resumed", 8, 8, 4400.0, compared_steps="26-50", max_abs_dloss=0.0)}
    assert distributed.throughput_ratio(rows["flagship-zero3-reduced-N"], rows["flagship-zero3-reduced-2"]) == 0.9
    assert distributed.throughput_ratio(rows["flagship-zero3-ours"], {"tokens_per_s_per_gpu": None}) is None
    distributed.print_flagship(rows, parse(tmp_path, "--gpus", "8", "--phases", "flagship"))
    printed = capsys.readouterr().out
    assert ("| zero3 | ours: use_fast_moe_block use_liger_kernel use_packing | 8 | 48 | yes | 3,000 | 20.0% | 70.2 "
            "| 200 | 400 | 12.0000 → 7.5000 |") in printed
    assert "| zero3 | transformers + TRL defaults | 8 | 48 | yes | 1,200 |" in printed
    assert ("zero3: ours / defaults tokens/s per GPU = 2.50×; scaling efficiency 2 → 8 GPUs at 8 layers = 0.90; "
            "resumed steps 26-50: max |Δloss| vs the uninterrupted run = 0.00e+00") in printed
    merged = distributed.merge({"flagship": {"a": 1}, "multinode": {"ok": False, "x": 1}},
                               {"flagship": {"b": 2}, "multinode": {"ok": True}})
    assert merged == {"flagship": {"a": 1, "b": 2}, "multinode": {"ok": True}}


def test_tables_report_loss_agreement_speed_memory_resume_and_nodes(tmp_path, capsys):
    entries = [{"step": s, "loss": 5.0 - 0.1 * s, "tokens_per_s_per_device": 1000.0 + s,
                "peak_memory_allocated_gib": 1.5} for s in range(1, 21)]
    shifted = [{**e, "loss": e["loss"] * 1.01} for e in entries]
    row = distributed.summarize(shifted, entries)
    assert row["max_rel_dloss"] == pytest.approx(0.01) and row["peak_alloc_gib"] == 1.5 and "mfu" not in row
    assert distributed.resumed_dloss(entries, shifted, range(11, 21)) == pytest.approx(0.039)
    assert distributed.resumed_dloss(entries, shifted[:15], range(11, 21)) is None
    results = {"stages": {"tiny-zero3": {"model": "tiny", "engine": "zero3", "gpus": 2, "ok": True, **row}},
               "resume": {"zero3": {"ok": True, "steps": "11-20", "max_abs_dloss": 0.0}},
               "multinode": {"ok": True, "command": "+ python3 -m turbo_tune.torchrun --nnodes 2", **row}}
    distributed.print_tables(results, parse(tmp_path, "--gpus", "2"))
    printed = capsys.readouterr().out
    assert "| tiny | zero3 | 2 | yes | 4.9490 → 3.0300 | 1.00e-02 | 1,013 | 1.50 |" in printed
    assert "| zero3 | yes | 11-20 | 0.00e+00 |" in printed
    assert "2 nodes × 1 GPU(s)" in printed and "`+ python3 -m turbo_tune.torchrun --nnodes 2`" in printed


class RecordingRunner:
    """Stands in for Runner: records each command and environment, writes a log as a finished run would."""

    def __init__(self, out: Path) -> None:
        self.out, self.calls = out, []

    def run(self, name: str, command: list[str], env: dict[str, str] | None = None) -> bool:
        self.calls.append((name, command, env))
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        (self.out / "logs" / f"{name}.log").write_text("done\n")
        return True


def test_compat_runs_every_patch_under_the_engines_asked_with_liger_autotuning_off(tmp_path):
    args = parse(tmp_path, "--gpus", "2", "--phases", "compat", "--models", "tiny", "--engines", "zero3", "fsdp")
    runner = RecordingRunner(tmp_path)
    results = distributed.compat(runner, {"tiny": tmp_path / "tiny"}, args)
    assert list(results) == [f"compat-{e}-{p}" for e in ("zero3", "fsdp") for p in distributed.PATCHES]
    assert all(row["ok"] for row in results.values())
    for name, command, env in runner.calls:
        assert env == {"LIGER_FUSED_MOE_AUTOTUNE": "0"}
        assert ("--fsdp" in command) == name.startswith("compat-fsdp")
        assert set(distributed.PATCHES[name.split("-", 2)[2]]) <= set(command)
