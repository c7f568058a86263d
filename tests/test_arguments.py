"""Flag parsing: every promised flag exists, batch sizes derive from the world size, bad flags stop early."""

import json

import pytest

from turbo_tune.arguments import (
    BUNDLED_EVAL_SPLIT,
    CHECKPOINT_LEARNING_RATE,
    EMBEDDED_MODEL_LEARNING_RATE,
    gradient_accumulation_steps,
    parse_config,
)
from turbo_tune.errors import ConfigError

PRODUCT_FLAGS = [
    "--use_fast_moe_block", "--use_fp8", "--use_liger_kernel", "--torch_compile", "--use_packing", "--use_lora",
    "--use_liger_efficiency_callback",
]


def parse(tmp_path, *flags: str):
    return parse_config(["--output_dir", str(tmp_path / "out"), "--report_to", "none", *flags])


@pytest.mark.parametrize("flag", PRODUCT_FLAGS)
def test_every_boolean_product_flag_parses(tmp_path, flag):
    config = parse(tmp_path, flag)
    assert getattr(config, flag[2:]) is True


def test_valued_product_flags_parse(tmp_path):
    config = parse(
        tmp_path, "--global_batch_size", "32", "--micro_batch_size", "4", "--logging_steps", "1",
        "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.1", "--lora_target_modules", "q_proj,v_proj",
        "--fsdp", "full_shard auto_wrap",
    )
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (4, 8)
    assert config.logging_steps == 1
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.1)
    assert config.lora_target_modules == "q_proj,v_proj"
    assert config.fsdp


def test_global_batch_size_divides_over_world_size():
    assert gradient_accumulation_steps(64, 2, 4) == 8
    assert gradient_accumulation_steps(64, 8, 8) == 1


def test_global_batch_size_that_does_not_divide_names_the_numbers():
    with pytest.raises(ConfigError, match=r"--global_batch_size 10 .* --micro_batch_size 4 × 2 process\(es\) = 8"):
        gradient_accumulation_steps(10, 4, 2)


def test_global_batch_size_error_stops_parsing(tmp_path):
    with pytest.raises(ConfigError, match="global_batch_size 30"):
        parse(tmp_path, "--global_batch_size", "30", "--micro_batch_size", "4")


def test_missing_deepspeed_config_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"--deepspeed_config .*nope\.json does not exist"):
        parse(tmp_path, "--deepspeed_config", str(tmp_path / "nope.json"))


@pytest.mark.parametrize(("flag", "name", "text", "message"), [
    ("--deepspeed_config", "zero.json", '{\n  "zero_optimization": {"stage": 3,}\n}\n',
     r"zero\.json is not valid JSON: .* line 2"),
    ("--config", "run.yaml", "learning_rate: [1\n", r"--config {path} is not valid YAML: .* line 1, column 16"),
])
def test_a_config_file_that_does_not_parse_names_the_file_and_line(tmp_path, flag, name, text, message):
    bad = tmp_path / name
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message.format(path=bad)):
        parse(tmp_path, flag, str(bad))


def test_deepspeed_and_fsdp_conflict(tmp_path):
    config_file = tmp_path / "zero.json"
    config_file.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="pass only one"):
        parse(tmp_path, "--deepspeed_config", str(config_file), "--fsdp", "full_shard auto_wrap")


def test_missing_model_and_data_paths_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"--model_path \(MODEL_PATH\) .*/no-model does not exist"):
        parse(tmp_path, "--model_path", str(tmp_path / "no-model"))
    with pytest.raises(ConfigError, match=r"--data_path \(DATA_PATH\) .*/no-data does not exist"):
        parse(tmp_path, "--data_path", str(tmp_path / "no-data"))


def test_learning_rate_default_depends_on_model(tmp_path):
    assert parse(tmp_path).learning_rate == EMBEDDED_MODEL_LEARNING_RATE
    model_dir = tmp_path / "ckpt"
    model_dir.mkdir()
    assert parse(tmp_path, "--model_path", str(model_dir)).learning_rate == CHECKPOINT_LEARNING_RATE
    assert parse(tmp_path, "--learning_rate", "3e-4").learning_rate == 3e-4


def test_cpu_trains_in_fp32_with_completion_only_loss(tmp_path):
    config = parse(tmp_path)
    assert config.bf16 is False
    assert config.completion_only_loss is True
    assert parse(tmp_path, "--train_on_all_tokens").completion_only_loss is False


def test_yaml_config_file_sets_flags_and_command_line_wins(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("use_packing: true\nmicro_batch_size: 2\nmax_length: 512\n")
    config = parse(tmp_path, "--config", str(config_file), "--max_length", "256")
    assert config.packing and config.per_device_train_batch_size == 2
    assert config.max_length == 256


def test_merge_lora_requires_lora(tmp_path):
    with pytest.raises(ConfigError, match="--merge_lora needs --use_lora"):
        parse(tmp_path, "--merge_lora")


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_shipped_deepspeed_configs_are_accepted_by_the_trainer(tmp_path, name):
    config = parse(tmp_path, "--deepspeed_config", f"config/{name}.json")
    settings = config.hf_deepspeed_config.config
    assert settings["zero_optimization"]["stage"] == int(name[-1])
    assert settings["train_micro_batch_size_per_gpu"] == config.per_device_train_batch_size


def test_fsdp_uses_the_shipped_config_and_its_own_activation_checkpointing(tmp_path):
    config = parse(tmp_path, "--fsdp")
    assert config.fsdp_config["version"] == 2
    assert config.fsdp_config["transformer_layer_cls_to_wrap"] == ["Qwen3MoeDecoderLayer"]
    assert config.fsdp_config["activation_checkpointing"] is True
    assert config.gradient_checkpointing is False


@pytest.mark.parametrize(("flags", "message"), [
    (["--max_length", "0"], "--max_length 0: an example must keep at least one token"),
    (["--learning_rate", "-1"], "--learning_rate -1.0 must be a non-negative number"),
    (["--lerning_rate", "1e-4"], "unknown argument '--lerning_rate'; did you mean --learning_rate?"),
    (["--max_steps", "ten"], "argument --max_steps/--max-steps: invalid int value: 'ten'"),
    (["--eval_split", "0.1", "--eval_data_path", "x.jsonl"], "--eval_data_path and --eval_split both choose"),
    (["--eval_split", "1.5"], "--eval_split 1.5 is not a fraction in [0, 1)"),
    (["--eval_split", "-0.1"], "--eval_split -0.1 is not a fraction in [0, 1)"),
    (["--eval_data_path", "/nonexistent/eval.jsonl"], "--eval_data_path /nonexistent/eval.jsonl does not exist"),
    (["--eval_split", "0", "--load_best_model_at_end"], "--load_best_model_at_end needs evaluation data"),
    (["--eval_split", "0", "--eval_strategy", "steps"], "--eval_strategy steps needs evaluation data"),
    (["--load_best_model_at_end", "--save_steps", "30", "--eval_steps", "20"],
     "--load_best_model_at_end requires the saving steps to be a round multiple of the evaluation steps"),
    (["--moe_load_warn_ratio", "-1"], "--moe_load_warn_ratio -1.0 is negative"),
])
def test_bad_flag_is_one_config_error(tmp_path, flags, message):
    with pytest.raises(ConfigError) as error:
        parse(tmp_path, *flags)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bundled_task_evaluates_on_the_save_interval_by_default(tmp_path):
    config = parse(tmp_path, "--save_steps", "200")
    assert config.eval_split == BUNDLED_EVAL_SPLIT
    assert (config.eval_strategy, config.eval_steps) == ("steps", 200)
    assert not parse(tmp_path, "--eval_split", "0").evaluates
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    assert not parse(tmp_path, "--data_path", str(data)).evaluates  # own data: evaluation only when asked for
    assert parse(tmp_path, "--data_path", str(data), "--eval_split", "0.1", "--eval_steps", "50").eval_steps == 50


def test_unknown_key_in_config_file_suggests_the_closest_flag(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=rf"--config {config_file}: unknown key 'lerning_rate'; did you mean "
                                          "learning_rate"):
        parse(tmp_path, "--config", str(config_file))


def test_mlflow_run_name_defaults_to_the_output_folder(tmp_path):
    assert parse(tmp_path).run_name == "out"
    assert parse(tmp_path, "--run_name", "mine").run_name == "mine"


def test_load_best_model_at_end_works_with_the_default_eval_interval(tmp_path):
    config = parse(tmp_path, "--load_best_model_at_end", "--save_steps", "30")
    assert config.eval_steps == 30 and config.metric_for_best_model == "loss"
