"""The shipped DeepSpeed and FSDP configs: the Trainer fills every "auto", ZeRO-3 prefetches and gathers each MoE
block whole, FSDP2 wraps the decoder layers, and combinations that cannot work stop before anything loads."""

import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import FullyShardedDataParallelPlugin
from transformers import AutoConfig, AutoModelForCausalLM

from turbo_tune.arguments import parse_config
from turbo_tune.errors import ConfigError
from turbo_tune.modeling import EMBEDDED_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]


def parse(tmp_path, *flags: str):
    return parse_config(["--output_dir", str(tmp_path / "out"), "--report_to", "none", *flags])


def leaves(value) -> list:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in leaves(item)]
    return [value]


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_the_trainer_fills_every_auto_value(tmp_path, name):
    config = parse(tmp_path, "--deepspeed_config", f"config/{name}.json", "--global_batch_size", "16",
                   "--micro_batch_size", "2")
    assert "auto" in leaves(json.loads((ROOT / "config" / f"{name}.json").read_text()))
    model = SimpleNamespace(config=AutoConfig.from_pretrained(EMBEDDED_MODEL_DIR))  # only its hidden size is read
    config.hf_deepspeed_config.trainer_config_finalize(config, model, num_training_steps=10)
    settings = config.hf_deepspeed_config.config
    assert "auto" not in leaves(settings)
    assert (settings["train_batch_size"], settings["train_micro_batch_size_per_gpu"]) == (16, 2)
    assert settings["gradient_accumulation_steps"] == 8


def test_zero3_prefetches_gathers_the_final_model_and_fetches_each_moe_block_whole():
    zero = json.loads((ROOT / "config" / "zero3.json").read_text())["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["overlap_comm"] and zero["stage3_prefetch_bucket_size"] > 0
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # one Hugging Face model at the end
    (leaf_class,) = zero["leaf_module"]["classes"]
    module_name, class_name = leaf_class.rsplit(".", 1)
    block_class = getattr(importlib.import_module(module_name), class_name)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(EMBEDDED_MODEL_DIR))
    blocks = [module for module in model.modules() if isinstance(module, block_class)]
    assert len(blocks) == model.config.num_hidden_layers
    expert_weights = [p for p in blocks[0].parameters() if p.dim() == 3]  # every expert's weights, fused
    assert expert_weights and all(p.shape[0] == model.config.num_experts for p in expert_weights)
    assert zero["stage3_prefetch_bucket_size"] >= 128 * 3 * 2048 * 768  # a whole Qwen3-30B-A3B MoE block prefetches


def test_fsdp_config_is_fsdp2_on_decoder_layers_with_activation_checkpointing(tmp_path):
    config = parse(tmp_path, "--fsdp")
    settings = config.fsdp_config
    assert settings["version"] == 2
    (layer,) = settings["transformer_layer_cls_to_wrap"]
    assert hasattr(importlib.import_module("transformers.models.qwen3_moe.modeling_qwen3_moe"), layer)
    assert settings["activation_checkpointing"] is True and config.gradient_checkpointing is False
    plugin = FullyShardedDataParallelPlugin(**config.fsdp_plugin_args)  # accelerate rejects FSDP1-only keys for FSDP2
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)


def test_merge_lora_under_zero3_needs_the_gathered_save(tmp_path):
    settings = json.loads((ROOT / "config" / "zero3.json").read_text())
    settings["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    no_gather = tmp_path / "zero3-no-gather.json"
    no_gather.write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match="--merge_lora with ZeRO-3 needs \"stage3_gather_16bit_weights_on_model"):
        parse(tmp_path, "--deepspeed_config", str(no_gather), "--use_lora", "--merge_lora")
    parse(tmp_path, "--deepspeed_config", str(no_gather), "--use_lora")  # no merge: the adapter saves anyway
    assert parse(tmp_path, "--deepspeed_config", "config/zero3.json", "--use_lora", "--merge_lora").merge_lora

