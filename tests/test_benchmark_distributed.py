"""benchmarks/distributed.py on the CPU: its arguments, the models it builds and the tables it prints (the runs need
two GPUs)."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import distributed  # noqa: E402

from turbo_tune.modeling import EMBEDDED_MODEL_DIR  # noqa: E402


def test_defaults_run_every_phase_on_both_models(tmp_path):
    args = distributed.parse_args(["--out", str(tmp_path)])
    assert args.phases == ["stages", "resume", "multinode"] and args.models == ["tiny", "a3b"]
    assert list(distributed.ENGINES) == ["single", "zero1", "zero2", "zero3", "fsdp"]
    flags = distributed.train_flags(tmp_path / "m", "tiny", args)
    micro = int(flags[flags.index("--micro_batch_size") + 1])
    assert int(flags[flags.index("--global_batch_size") + 1]) == args.global_batch == 2 * micro * args.accumulation


def test_resume_without_the_tiny_model_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        distributed.parse_args(["--out", str(tmp_path), "--models", "a3b"])


def test_the_a3b_shape_is_qwen3_30b_a3b_cut_in_depth():
    config = AutoConfig.from_pretrained(EMBEDDED_MODEL_DIR)
    config.update({**distributed.A3B, "num_hidden_layers": 2})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (128, 2 * 768, 2048) and experts.down_proj.shape == (128, 2048, 768)
    per_layer = 128 * 3 * 768 * 2048 + 128 * 2048 + 2 * 2048 * 4096 + 2 * 2048 * 512  # experts, router, attention
    assert model.num_parameters() == pytest.approx(2 * 151936 * 2048 + 2 * per_layer, rel=1e-3)


def test_tables_report_loss_agreement_speed_memory_resume_and_nodes(tmp_path, capsys):
    entries = [{"step": s, "loss": 5.0 - 0.1 * s, "tokens_per_s_per_device": 1000.0 + s,
                "peak_memory_allocated_gib": 1.5} for s in range(1, 21)]
    shifted = [{**e, "loss": e["loss"] * 1.01} for e in entries]
    row = distributed.summarize(shifted, entries)
    assert row["max_rel_dloss"] == pytest.approx(0.01) and row["peak_alloc_gib"] == 1.5
    results = {"stages": {"tiny-zero3": {"model": "tiny", "engine": "zero3", "gpus": 2, "ok": True, **row}},
               "resume": {"zero3": {"ok": True, "steps": "11-20", "max_abs_dloss": 0.0}},
               "multinode": {"ok": True, "command": "+ python3 -m torch.distributed.run --nnodes 2", **row}}
    distributed.print_tables(results, distributed.parse_args(["--out", str(tmp_path)]))
    printed = capsys.readouterr().out
    assert "| tiny | zero3 | 2 | yes | 4.9490 → 3.0300 | 1.00e-02 | 1,013 | 1.50 |" in printed
    assert "| zero3 | yes | 11-20 | 0.00e+00 |" in printed
    assert "`+ python3 -m torch.distributed.run --nnodes 2`" in printed
