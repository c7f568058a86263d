"""Turbo-Tune's features under DDP and DeepSpeed ZeRO on two CPU processes over gloo: packed rows, LoRA merged
from ZeRO-3's gathered weights, expert LoRA through ScatterMoE, FP8 frozen experts, the MoE block as one ZeRO-3 leaf
and FP8 layers chosen on partitioned weights."""

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from distributed_runs import ZERO3, assert_same_losses, launch, train, train_and_log

NO_EVAL = ("--eval_split", "0")  # evaluation under the engines is test_distributed.py's; here it would only add time
LORA = ("--use_lora", "--save_strategy", "no", "--max_steps", "2", *NO_EVAL)


@pytest.fixture(scope="module")
def zero3_peft_lora(tmp_path_factory, checkpoint) -> tuple[Path, dict[int, float]]:
    """peft's LoRA under ZeRO-3, merged at the end: the merge's run and the reference of ScatterMoE's LoRA path."""
    output_dir = tmp_path_factory.mktemp("zero3-lora") / "out"
    return output_dir, train(output_dir, 2, checkpoint, *ZERO3, *LORA, "--merge_lora")


def test_zero3_trains_packed_rows_like_one_process(tmp_path, checkpoint):
    packed = ("--use_packing", "--max_steps", "2", *NO_EVAL)
    expected = train(tmp_path / "single", 1, checkpoint, *packed)
    losses = train(tmp_path / "zero3", 2, checkpoint, *ZERO3, *packed)
    assert_same_losses(losses, expected, steps=2)


def test_zero3_merge_lora_merges_the_gathered_weights(checkpoint, zero3_peft_lora):
    output_dir = zero3_peft_lora[0]
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


def test_zero3_expert_lora_through_scattermoe_matches_peft_path(tmp_path, checkpoint, zero3_peft_lora):
    """ScatterMoE's low-rank expert LoRA reads peft's factors and ZeRO-3's gathered base weights."""
    losses, log = train_and_log(tmp_path / "scattermoe", 2, checkpoint, *ZERO3, *LORA, "--use_fast_moe_block")
    assert "expert LoRA: scattermoe low-rank path" in log and "peft folded its LoRA" not in log
    assert_same_losses(losses, zero3_peft_lora[1], steps=2)


def test_ddp_trains_lora_on_fp8_frozen_experts_like_one_process(tmp_path, checkpoint):
    """DDP leaves the FP8 expert weights alone (every rank quantizes the same checkpoint) and reduces the adapters."""
    flags = ("--use_lora", "--use_fast_moe_block", "--fp8_frozen_experts", "--save_strategy", "no", "--max_steps", "2",
             *NO_EVAL)
    # one process takes the global batch of 8 in one pass: the same token-weighted loss as two ranks of 4
    expected = train(tmp_path / "one", 1, checkpoint, *flags, "--micro_batch_size", "8")
    losses, log = train_and_log(tmp_path / "two", 2, checkpoint, *flags)
    assert "FP8 frozen experts: 2 experts modules" in log
    assert_same_losses(losses, expected, steps=2)


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
                    "--save_strategy", "no", "--eval_split", "0", *ZERO3)
    probe = json.loads(result.stdout.split("PROBE ", 1)[1])
    assert probe["blocks"] == AutoConfig.from_pretrained(checkpoint).num_hidden_layers
    assert all(probe["leaf"]) and all(probe["owned"])


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
                    "1", "--save_strategy", "no", "--gradient_checkpointing", "false", "--eval_split", "0", *ZERO3)
    probe = json.loads(result.stdout.split("PROBE ", 1)[1].splitlines()[0])
    expected = select_fp8_modules(AutoModelForCausalLM.from_pretrained(checkpoint), "all_linear")
    assert probe["partitioned"]
    assert probe["chosen"] == expected.chosen and probe["skipped"] == sorted(expected.skipped)
    assert probe["chosen"] and probe["finite"] and probe["steps"] == 2
