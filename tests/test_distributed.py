"""Two CPU processes over gloo train exactly like one process on the same global batch.

Plain DDP and DeepSpeed ZeRO-2/ZeRO-3 (DeepSpeed's CPU accelerator) run here; ZeRO-3 also resumes from its sharded
checkpoint, writes one consolidated Hugging Face model and merges LoRA from the gathered weights. accelerate applies
FSDP only on GPUs, so FSDP's runs are in benchmarks/distributed.py; here `--fsdp` must refuse the CPU.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from monkey_patch import preflight
from turbo_tune.arguments import parse_config
from turbo_tune.errors import ConfigError
from turbo_tune.modeling import EMBEDDED_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
COMMON = ["--bundled_examples", "96", "--max_steps", str(STEPS), "--logging_steps", "1", "--report_to", "none",
          "--global_batch_size", "8", "--micro_batch_size", "4", "--gradient_checkpointing", "false",
          "--save_steps", str(STEPS // 2), "--learning_rate", "2e-3"]
ZERO2 = ["--deepspeed_config", "config/zero2.json"]
ZERO3 = ["--deepspeed_config", "config/zero3.json"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(processes: int, *args: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    result = subprocess.run([*launcher, *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def train(output_dir: Path, processes: int, model_path: Path, *flags: str) -> dict[int, float]:
    return train_and_log(output_dir, processes, model_path, *flags)[0]


def train_and_log(output_dir: Path, processes: int, model_path: Path, *flags: str) -> tuple[dict[int, float], str]:
    """Losses by step, and the run's stderr (its log)."""
    result = launch(processes, str(ROOT / "qwen3_sft.py"), "--output_dir", str(output_dir),
                    "--model_path", str(model_path), *COMMON, *flags)
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}, result.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The embedded tiny model saved as a checkpoint, so that every engine starts from the same weights: under ZeRO-3
    a randomly initialised model is built already partitioned and draws different random numbers."""
    path = tmp_path_factory.mktemp("tiny-checkpoint")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(EMBEDDED_MODEL_DIR)).save_pretrained(path)
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, checkpoint) -> tuple[Path, dict[int, float]]:
    output_dir = tmp_path_factory.mktemp("single") / "out"
    return output_dir, train(output_dir, 1, checkpoint)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, checkpoint) -> tuple[Path, dict[int, float]]:
    output_dir = tmp_path_factory.mktemp("zero3") / "out"
    return output_dir, train(output_dir, 2, checkpoint, *ZERO3)


def assert_same_losses(losses: dict[int, float], expected: dict[int, float], rel: float = 1e-4) -> None:
    assert sorted(losses) == sorted(expected) == list(range(1, STEPS + 1))
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, rel=rel), step


@pytest.mark.parametrize("engine", [[], ZERO2], ids=["ddp", "zero2"])
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, checkpoint, single_process, engine):
    assert_same_losses(train(tmp_path / "out", 2, checkpoint, *engine), single_process[1])


def test_zero3_matches_one_process_and_saves_one_consolidated_model(single_process, zero3_run):
    (single_dir, expected), (zero3_dir, losses) = single_process, zero3_run
    assert_same_losses(losses, expected)
    assert (zero3_dir / f"checkpoint-{STEPS // 2}" / f"global_step{STEPS // 2}").is_dir()  # sharded engine state
    consolidated, reference = load_file(zero3_dir / "model.safetensors"), load_file(single_dir / "model.safetensors")
    assert consolidated.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(consolidated[name], tensor, atol=1e-4, rtol=1e-3, msg=name)


def test_zero3_runs_the_scattermoe_experts_on_the_gathered_weights(tmp_path, checkpoint, single_process):
    """The Triton experts (CPU interpreter) read each MoE block's weights after ZeRO-3 gathers them; two steps,
    so the second loss also checks the gradients that reached the experts."""
    losses = train(tmp_path / "out", 2, checkpoint, *ZERO3, "--use_fast_moe_block", "--max_steps", "2")
    assert sorted(losses) == [1, 2]
    for step, loss in losses.items():
        assert loss == pytest.approx(single_process[1][step], rel=1e-4), step


def test_zero3_trains_packed_rows_like_one_process(tmp_path, checkpoint):
    packed = ("--use_packing", "--max_steps", "2")
    expected = train(tmp_path / "single", 1, checkpoint, *packed)
    losses = train(tmp_path / "zero3", 2, checkpoint, *ZERO3, *packed)
    assert sorted(losses) == sorted(expected) == [1, 2]
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), step


def test_zero3_compiled_layers_train_like_eager_ones(tmp_path, checkpoint, zero3_run):
    """--torch_compile under ZeRO-3: the layers compile with DeepSpeed's gather hooks around them, no fallback; the
    log says what DeepSpeed's hooks cost the compiled graphs."""
    losses, log = train_and_log(tmp_path / "out", 2, checkpoint, *ZERO3, "--torch_compile")
    assert "torch.compile (inductor) on each of the 2 decoder layers" in log
    assert "continuing uncompiled" not in log
    assert "--torch_compile under ZeRO-3 trains correctly but gains little" in log
    assert_same_losses(losses, zero3_run[1], rel=1e-3)


def test_zero3_resume_from_sharded_state_continues_the_losses(tmp_path, checkpoint, zero3_run):
    first, expected = zero3_run
    resumed = train(tmp_path / "resumed", 2, checkpoint, *ZERO3,
                    "--resume_from_checkpoint", str(first / f"checkpoint-{STEPS // 2}"))
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), step


def test_zero3_merge_lora_merges_the_gathered_weights(tmp_path, checkpoint):
    output_dir = tmp_path / "out"
    train(output_dir, 2, checkpoint, *ZERO3, "--use_lora", "--merge_lora", "--save_strategy", "no")
    merged = AutoModelForCausalLM.from_pretrained(output_dir / "merged").state_dict()  # experts saved per expert
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    original = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    reference = PeftModel.from_pretrained(base, output_dir).merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    changed = [name for name in reference if not torch.equal(reference[name], original[name])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed  # the adapters trained, so the merge shows
    assert "model.layers.0.mlp.experts.gate_up_proj" in changed  # experts are LoRA targets by default
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, msg=name)


def test_zero3_expert_lora_through_scattermoe_matches_peft_path(tmp_path, checkpoint):
    """ScatterMoE's low-rank expert LoRA reads peft's factors and ZeRO-3's gathered base weights."""
    lora = ("--use_lora", "--save_strategy", "no", "--max_steps", "2")
    expected = train(tmp_path / "peft", 2, checkpoint, *ZERO3, *lora)
    losses, log = train_and_log(tmp_path / "scattermoe", 2, checkpoint, *ZERO3, *lora, "--use_fast_moe_block")
    assert "expert LoRA: scattermoe low-rank path" in log and "peft folded its LoRA" not in log
    assert sorted(losses) == sorted(expected) == [1, 2]
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), step


def test_ddp_trains_lora_on_fp8_frozen_experts_like_one_process(tmp_path, checkpoint):
    """DDP leaves the FP8 expert weights alone (every rank quantizes the same checkpoint) and reduces the adapters."""
    flags = ("--use_lora", "--use_fast_moe_block", "--fp8_frozen_experts", "--save_strategy", "no", "--max_steps", "2")
    expected = train(tmp_path / "one", 1, checkpoint, *flags)
    losses, log = train_and_log(tmp_path / "two", 2, checkpoint, *flags)
    assert "FP8 frozen experts: 2 experts modules" in log
    assert sorted(losses) == sorted(expected) == [1, 2]
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), step


LEAF_PROBE = """
import json, sys
from deepspeed.utils import z3_leaf_module
from qwen3_sft import join_process_group
from monkey_patch.sft_trainer import TurboSFTTrainer
from turbo_tune.arguments import parse_config
from turbo_tune.modeling import load_model, load_tokenizer
from turbo_tune.toy_task import bundled_dataset

config = parse_config(sys.argv[1:])
join_process_group(config)
trainer = TurboSFTTrainer(model=load_model(config), args=config, train_dataset=bundled_dataset(16, seed=0),
                          processing_class=load_tokenizer(config))
trainer.train()
blocks = [m for m in trainer.model_wrapped.module.modules() if type(m).__name__ == "Qwen3MoeSparseMoeBlock"]
if trainer.is_world_process_zero():  # one line: two ranks printing at once can interleave
    print("PROBE", json.dumps({
        "blocks": len(blocks),
        "leaf": [z3_leaf_module(block) for block in blocks],
        "owned": [all(getattr(p, "ds_z3_leaf_module", None) is block for p in block.parameters()) for block in blocks],
    }))
import torch.distributed as dist
dist.destroy_process_group()  # as qwen3_sft.py: gloo can abort at interpreter exit while its group is alive
"""


def test_zero3_gathers_each_moe_block_as_one_leaf(tmp_path, checkpoint):
    """The experts' 3D weights and the router are fetched together at the MoE block, with no hooks inside it."""
    result = launch(1, "--no-python", sys.executable, "-c", LEAF_PROBE, "--output_dir", str(tmp_path / "out"),
                    "--model_path", str(checkpoint), "--report_to", "none", "--max_steps", "1",
                    "--save_strategy", "no", *ZERO3)
    probe = json.loads(result.stdout.split("PROBE ", 1)[1])
    assert probe["blocks"] == AutoConfig.from_pretrained(checkpoint).num_hidden_layers
    assert all(probe["leaf"]) and all(probe["owned"])


def test_fsdp_refuses_the_cpu_instead_of_training_unsharded(tmp_path):
    config = parse_config(["--output_dir", str(tmp_path / "out"), "--report_to", "none", "--fsdp"])
    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs FSDP")
    with pytest.raises(ConfigError, match="--fsdp needs CUDA GPUs"):
        preflight(config)


FP8_PROBE = """
import json, math, sys
from monkey_patch.fp8 import apply_fp8
from monkey_patch.sft_trainer import TurboSFTTrainer
from qwen3_sft import join_process_group
from turbo_tune.arguments import parse_config
from turbo_tune.modeling import load_model, load_tokenizer
from turbo_tune.toy_task import bundled_dataset

config = parse_config(sys.argv[1:])
join_process_group(config)
model = load_model(config)
partitioned = all(p.numel() == 0 for p in model.parameters())
selection = apply_fp8(model, "tensorwise", "all_linear", emulate=True)  # torchao's FP8 numerics, on the CPU
trainer = TurboSFTTrainer(model=model, args=config, train_dataset=bundled_dataset(32, seed=0),
                          processing_class=load_tokenizer(config))
trainer.train()
losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
if trainer.is_world_process_zero():  # one line: two ranks printing at once can interleave
    print("PROBE", json.dumps({"partitioned": partitioned, "chosen": selection.chosen,
                               "skipped": sorted(selection.skipped), "finite": all(map(math.isfinite, losses)),
                               "steps": len(losses)}))
import torch.distributed as dist
dist.destroy_process_group()  # as qwen3_sft.py: gloo can abort at interpreter exit while its group is alive
"""


def test_zero3_selects_and_trains_fp8_layers_on_partitioned_weights(tmp_path, checkpoint):
    """ZeRO-3 partitions the weights while loading, before the patches run (an H200 run failed on it)."""
    from monkey_patch.fp8 import select_fp8_modules

    result = launch(2, "--no-python", sys.executable, "-c", FP8_PROBE, "--output_dir", str(tmp_path / "out"),
                    "--model_path", str(checkpoint), "--report_to", "none", "--max_steps", "2", "--logging_steps",
                    "1", "--save_strategy", "no", "--gradient_checkpointing", "false", *ZERO3)
    probe = json.loads(result.stdout.split("PROBE ", 1)[1].splitlines()[0])
    expected = select_fp8_modules(AutoModelForCausalLM.from_pretrained(checkpoint), "all_linear")
    assert probe["partitioned"]
    assert probe["chosen"] == expected.chosen and probe["skipped"] == sorted(expected.skipped)
    assert probe["chosen"] and probe["finite"] and probe["steps"] == 2
