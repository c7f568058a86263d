"""Every flag of qwen3_sft.py: TRL's SFTConfig (so all TrainingArguments/SFTConfig flags work) plus Turbo-Tune's own.

Validation that needs no model or data happens here, in `__post_init__`, so bad flags stop the run before anything
is loaded or written.
"""

import difflib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from trl import SFTConfig, TrlParser

from turbo_tune.errors import ConfigError

DEFAULT_FSDP_CONFIG = Path(__file__).resolve().parents[1] / "config" / "fsdp.json"
EMBEDDED_MODEL_LEARNING_RATE = 2e-3
CHECKPOINT_LEARNING_RATE = 1e-5
# torch._scaled_mm needs every dimension of an FP8 matmul divisible by 16, the tokens of a batch included (they are
# the reduction dimension of the weight gradient), so FP8 runs pad each batch's tokens to a multiple of it.
FP8_TOKEN_MULTIPLE = 16
FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
FP8_MODULE_PRESETS = ("brief", "routers", "edge_layers", "lm_head", "all_linear")
# The bundled task holds out this share for evaluation (200 of its 20,000 examples) unless --eval_split says otherwise.
BUNDLED_EVAL_SPLIT = 0.01


@dataclass
class TurboTuneConfig(SFTConfig):
    """SFTConfig with Turbo-Tune's flags; defaults suit a Qwen3-MoE fine-tune."""

    model_path: str | None = field(
        default=None,
        metadata={"help": "Local Hugging Face Qwen3-MoE checkpoint. Unset: the embedded tiny Qwen3-MoE."},
    )
    data_path: str | None = field(
        default=None,
        metadata={
            "help": "JSONL/JSON/Parquet file, a folder of them, or a `datasets.save_to_disk` folder, with `messages` "
            "or `prompt`/`completion` records. Unset: the bundled chat task."
        },
    )
    eval_data_path: str | None = field(
        default=None,
        metadata={"help": "Evaluation data, in the same formats as --data_path. Evaluates every --eval_steps "
                  "(default: the save interval) and at the end."},
    )
    eval_split: float | None = field(
        default=None,
        metadata={"help": "Hold out this fraction of the training data (seeded by --data_seed or --seed) and evaluate "
                  f"on it instead of training on it. Unset: {BUNDLED_EVAL_SPLIT} for the bundled task, none for "
                  "--data_path; 0 turns evaluation off."},
    )
    train_on_all_tokens: bool = field(
        default=False,
        metadata={"help": "Train on every token instead of only the assistant's (or the completion's)."},
    )
    model_dtype: str = field(
        default="auto",
        metadata={"help": "Weight dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16 or float32."},
    )
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "auto (flash_attention_2 when flash-attn is installed on a GPU; with --use_packing and no "
                  "flash-attn, varlen_sdpa; else sdpa), varlen_sdpa (padding-free attention for packed rows), or any "
                  "name transformers' attention interface knows."},
    )
    use_fast_moe_block: bool = field(
        default=False, metadata={"help": "Run the experts through Turbo-Tune's Triton ScatterMoE kernels."}
    )
    use_fp8: bool = field(
        default=False, metadata={"help": "FP8 training (torchao float8) of the layers --fp8_modules selects."}
    )
    fp8_recipe: str = field(
        default="tensorwise",
        metadata={"help": f"torchao float8 scaling recipe: {', '.join(FP8_RECIPES)}."},
    )
    fp8_modules: str = field(
        default="brief",
        metadata={"help": f"Comma list of presets ({', '.join(FP8_MODULE_PRESETS)}) or regexes matched against "
                  "whole module names (e.g. model\\.layers\\.\\d+\\.self_attn\\.o_proj)."},
    )
    fp8_experts: bool = field(
        default=False,
        metadata={"help": "With --use_fp8, also run the expert matmuls as torchao FP8 rowwise grouped GEMMs (SM90+)."},
    )
    use_packing: bool = field(
        default=False,
        metadata={"help": "Pack examples into full rows, with no attention across examples (padding-free)."},
    )
    fused_grad_clipping: bool = field(
        default=False,
        metadata={"help": "Clip the gradients inside the fused optimizer's step (--optim adamw_torch_fused, the "
                  "default) instead of in a pass over them of their own: the same clipping, one read of every "
                  "gradient less. Not with DeepSpeed, FSDP or --fp16."},
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the LoRA input; must be 0 with --lora_target_parameters (peft has none there)."},
    )
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj",
        metadata={"help": "Comma-separated module names that get LoRA adapters."},
    )
    lora_target_parameters: str = field(
        default="mlp.experts.gate_up_proj,mlp.experts.down_proj",
        metadata={"help": "Comma-separated 3D expert parameters that get per-expert LoRA (peft target_parameters); "
                  "'' for none. With --use_fast_moe_block they run through scattermoe's low-rank path."},
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "With --use_lora, also write the merged full model to OUTPUT_DIR/merged."}
    )
    fp8_frozen_experts: bool = field(
        default=False,
        metadata={"help": "With --use_lora and --use_fast_moe_block: store the frozen expert weights in FP8 (e4m3, "
                  "one scale per expert row), half their bf16 memory; each layer dequantizes them when it runs."},
    )
    deepspeed_config: str | None = field(
        default=None, metadata={"help": "DeepSpeed JSON config (see config/zero*.json). Same as --deepspeed."}
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "Sequences per optimizer step over all processes; sets gradient accumulation."},
    )
    micro_batch_size: int | None = field(
        default=None, metadata={"help": "Sequences per device per forward pass (default: per_device_train_batch_size)."}
    )
    use_liger_efficiency_callback: bool = field(
        default=False,
        metadata={"help": "Log step time, tokens/s, MFU, memory and time to completion at every logging step."},
    )
    moe_health_metrics: bool = field(
        default=True,
        metadata={"help": "Log each MoE layer's expert load (max/mean ratio, entropy) per logging window and draw "
                  "moe_load.png at each save and at the end."},
    )
    moe_load_warn_ratio: float = field(
        default=4.0,
        metadata={"help": "Warn (once) when a layer's busiest expert gets more than this many times an even share of "
                  "the routed tokens (moe_load_max_over_mean); 0 never warns."},
    )
    bundled_examples: int = field(
        default=20000, metadata={"help": "How many examples of the bundled chat task to generate (no --data_path)."}
    )
    max_nonfinite_steps: int = field(
        default=3,
        metadata={"help": "Stop the run (exit code 3) once the loss or gradient norm has been NaN or inf for this many "
                  "optimizer steps in a row; 0 never stops. Non-finite weights are never saved either way."},
    )

    # Defaults that differ from SFTConfig's.
    learning_rate: float | None = field(
        default=None,
        metadata={"help": f"Peak learning rate. Unset: {EMBEDDED_MODEL_LEARNING_RATE} for the embedded tiny model, "
                  f"{CHECKPOINT_LEARNING_RATE} for a checkpoint."},
    )
    output_dir: str | None = field(default="outputs/qwen3-sft", metadata={"help": "Checkpoints and final model."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(
        default=0.05, metadata={"help": "Warmup steps; a value below 1 is a fraction of all steps."}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the data."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    report_to: None | str | list[str] = field(default="mlflow", metadata={"help": "Where metrics go (mlflow, none)."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep at most this many checkpoints."})
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "Log a NaN/inf loss as the average of the window's finite ones (transformers' default, "
                  "which logs 0 when logging every step) instead of as NaN/inf."},
    )

    def __post_init__(self) -> None:
        self._check_engine_flags()
        self._check_fp8_flags()
        self._check_fp8_frozen_experts()
        self._derive_batch_sizes()
        if self.model_path is not None:
            check_readable(self.model_path, "--model_path (MODEL_PATH)")
        if self.data_path is not None:
            check_readable(self.data_path, "--data_path (DATA_PATH)")
        self._configure_evaluation()
        if self.moe_load_warn_ratio < 0:
            raise ConfigError(f"--moe_load_warn_ratio {self.moe_load_warn_ratio} is negative; use 0 to never warn.")
        if self.model_dtype not in ("auto", "bfloat16", "float32"):
            raise ConfigError(f"--model_dtype {self.model_dtype!r} is not one of auto, bfloat16, float32.")
        if self.max_nonfinite_steps < 0:
            raise ConfigError(
                f"--max_nonfinite_steps must be 0 (never stop) or a number of steps, got {self.max_nonfinite_steps}."
            )
        if self.merge_lora and not self.use_lora:
            raise ConfigError("--merge_lora needs --use_lora: without LoRA the saved model is already full.")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(
                f"--max_length {self.max_length}: an example must keep at least one token. Pass a positive length "
                "(the default is 1024), or --max_length none for no truncation."
            )
        if self.learning_rate is not None and not self.learning_rate >= 0:
            raise ConfigError(f"--learning_rate {self.learning_rate} must be a non-negative number, e.g. 1e-5.")
        if self.learning_rate is None:
            self.learning_rate = (
                EMBEDDED_MODEL_LEARNING_RATE if self.model_path is None else CHECKPOINT_LEARNING_RATE
            )
        if self.bf16 is None and not self.fp16:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        self.run_name = self.run_name or Path(self.output_dir).name  # MLflow's own names repeat with the seed
        self.packing = self.packing or self.use_packing
        self.completion_only_loss = not self.train_on_all_tokens
        try:
            super().__post_init__()
        except ValueError as error:
            if "--load_best_model_at_end" not in str(error):
                raise
            raise ConfigError(
                f"{' '.join(str(error).split())}. --eval_steps defaults to --save_steps; set it to a divisor of it."
            ) from None
        if self.use_fp8:
            self._pad_tokens_for_fp8()
        self._check_fused_grad_clipping()

    def _check_fused_grad_clipping(self) -> None:
        """--fused_grad_clipping sets the fused optimizer's grad_scale, which nothing else may own
        (turbo_tune/grad_clipping.py)."""
        if not self.fused_grad_clipping:
            return
        optim = getattr(self.optim, "value", self.optim)
        conflict = (
            "--deepspeed_config: DeepSpeed clips inside its own optimizer step" if self.deepspeed else
            "--fsdp: FSDP's sharded gradients are clipped by clip_grad_norm_" if self.fsdp else
            "--fp16: its loss scaler owns the optimizer's grad_scale" if self.fp16 else
            f"--optim {optim}: not a fused torch optimizer (the default adamw_torch_fused is)"
            if not optim.endswith("_fused") else
            "--max_grad_norm 0: there is nothing to clip" if not self.max_grad_norm > 0 else None
        )
        if conflict:
            raise ConfigError(f"--fused_grad_clipping does not work with {conflict}; drop one of the two.")

    @property
    def evaluates(self) -> bool:
        return self.eval_data_path is not None or bool(self.eval_split)

    def _configure_evaluation(self) -> None:
        """Evaluation data from one flag, evaluated on the save interval unless --eval_strategy/--eval_steps say
        otherwise (so --load_best_model_at_end finds an evaluation at every save)."""
        if self.eval_data_path is not None and self.eval_split is not None:
            raise ConfigError("--eval_data_path and --eval_split both choose the evaluation data: pass only one.")
        if self.eval_split is not None and not 0 <= self.eval_split < 1:
            raise ConfigError(
                f"--eval_split {self.eval_split} is not a fraction in [0, 1): e.g. 0.01 holds out 1% of the training "
                "data for evaluation (0: no evaluation)."
            )
        if self.eval_data_path is not None:
            check_readable(self.eval_data_path, "--eval_data_path")
        if self.eval_split is None and self.eval_data_path is None and self.data_path is None:
            self.eval_split = BUNDLED_EVAL_SPLIT
        if not self.evaluates:
            strategy = getattr(self.eval_strategy, "value", self.eval_strategy)
            for flag, on in (("--load_best_model_at_end", self.load_best_model_at_end),
                             (f"--eval_strategy {strategy}", strategy != "no")):
                if on:
                    raise ConfigError(
                        f"{flag} needs evaluation data: add --eval_data_path PATH or --eval_split FRACTION."
                    )
            return
        if self.eval_strategy == "no":
            self.eval_strategy = "epoch" if self.save_strategy == "epoch" else "steps"
        if self.eval_steps is None:
            self.eval_steps = self.save_steps

    def _check_engine_flags(self) -> None:
        if self.deepspeed_config is not None and self.deepspeed is not None:
            if Path(self.deepspeed_config) != Path(str(self.deepspeed)):
                raise ConfigError(
                    f"--deepspeed_config {self.deepspeed_config} and --deepspeed {self.deepspeed} disagree: pass one."
                )
        ds_config = self.deepspeed_config or self.deepspeed
        if ds_config is not None and self.fsdp:
            raise ConfigError(
                "--deepspeed_config and --fsdp both choose how the model is sharded: pass only one of them "
                "(unset DS_CONFIG_PATH to use FSDP)."
            )
        if isinstance(ds_config, str):
            zero = load_json_config(ds_config, "--deepspeed_config (DS_CONFIG_PATH)").get("zero_optimization", {})
            self.deepspeed = ds_config
            if self.merge_lora and zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
                raise ConfigError(
                    f"--merge_lora with ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\": true in "
                    f"{ds_config}: merging needs the full weights, which ZeRO-3 only gathers with it "
                    "(see config/zero3.json)."
                )
        if self.fsdp:
            self.fsdp_config = self.fsdp_config or str(DEFAULT_FSDP_CONFIG)
            if isinstance(self.fsdp_config, str):
                fsdp_settings = load_json_config(self.fsdp_config, "--fsdp_config")
                if fsdp_settings.get("activation_checkpointing"):
                    self.gradient_checkpointing = False  # FSDP checkpoints the layers itself, without a re-gather

    def _check_fp8_flags(self) -> None:
        if self.fp8_recipe not in FP8_RECIPES:
            raise ConfigError(f"--fp8_recipe {self.fp8_recipe!r} is not one of {', '.join(FP8_RECIPES)}.")
        fp8_module_selectors(self.fp8_modules)
        if self.fp8_experts and not self.use_fp8:
            raise ConfigError("--fp8_experts needs --use_fp8: add it, or drop --fp8_experts.")
        if self.fp8_experts and self.use_fast_moe_block:
            raise ConfigError(
                "--fp8_experts and --use_fast_moe_block both choose the experts kernels: pass only one of them."
            )

    def _check_fp8_frozen_experts(self) -> None:
        if not self.fp8_frozen_experts:
            return
        missing = [flag for flag, on in (("--use_lora", self.use_lora), ("--use_fast_moe_block",
                                                                          self.use_fast_moe_block)) if not on]
        if missing:
            raise ConfigError(
                f"--fp8_frozen_experts needs {' and '.join(missing)}: the expert weights are frozen only under LoRA, "
                "and only the ScatterMoE experts read FP8 weights."
            )
        if self.merge_lora:
            raise ConfigError(
                "--merge_lora with --fp8_frozen_experts would merge into FP8-rounded expert weights. Drop "
                "--merge_lora and merge the saved adapter into the original checkpoint afterwards: "
                "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL_PATH), OUTPUT_DIR)"
                ".merge_and_unload().save_pretrained(DIR)."
            )
        engine = "--fsdp" if self.fsdp else "DeepSpeed" if (self.deepspeed_config or self.deepspeed) else None
        if engine:
            raise ConfigError(
                f"--fp8_frozen_experts with {engine}: the engine takes over the weights' storage (DeepSpeed casts "
                "every floating-point weight to its bf16/fp16 dtype, FSDP shards them in their own dtype), which "
                "would undo the FP8 storage. Train LoRA on one GPU or with plain DDP (qwen3_sft.sh without "
                "DS_CONFIG_PATH), or drop the flag."
            )

    def _pad_tokens_for_fp8(self) -> None:
        if self.pad_to_multiple_of is None:
            self.pad_to_multiple_of = FP8_TOKEN_MULTIPLE
        elif self.pad_to_multiple_of % FP8_TOKEN_MULTIPLE:
            raise ConfigError(
                f"--pad_to_multiple_of {self.pad_to_multiple_of} with --use_fp8: FP8 matmuls need a batch's tokens in "
                f"multiples of {FP8_TOKEN_MULTIPLE}. Use a multiple of {FP8_TOKEN_MULTIPLE}, or leave it unset."
            )

    def _derive_batch_sizes(self) -> None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and not torch.cuda.is_available():
            self.use_cpu = True  # several CPU processes: distributed over gloo, as on a test machine
            self.ddp_backend = self.ddp_backend or "gloo"
        if self.micro_batch_size is not None:
            if self.micro_batch_size < 1:
                raise ConfigError(f"--micro_batch_size must be at least 1, got {self.micro_batch_size}.")
            self.per_device_train_batch_size = self.micro_batch_size
        if self.global_batch_size is None:
            return
        self.gradient_accumulation_steps = gradient_accumulation_steps(
            self.global_batch_size, self.per_device_train_batch_size, world_size
        )


def gradient_accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Steps to accumulate so that micro_batch_size × world_size × steps == global_batch_size exactly."""
    per_pass = micro_batch_size * world_size
    if global_batch_size < 1 or global_batch_size % per_pass:
        raise ConfigError(
            f"--global_batch_size {global_batch_size} is not a positive multiple of --micro_batch_size "
            f"{micro_batch_size} × {world_size} process(es) = {per_pass}. Use a multiple of {per_pass} "
            f"(e.g. {max(per_pass, global_batch_size // per_pass * per_pass)}) or change --micro_batch_size."
        )
    return global_batch_size // per_pass


def comma_list(text: str) -> list[str]:
    """The items of a comma-separated flag value, blanks dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def fp8_module_selectors(text: str) -> list[str]:
    """The items of --fp8_modules: preset names or regular expressions (checked here, so typos stop early)."""
    selectors = comma_list(text)
    if not selectors:
        raise ConfigError(f"--fp8_modules is empty; use a preset ({', '.join(FP8_MODULE_PRESETS)}) or a regex.")
    for item in selectors:
        if item in FP8_MODULE_PRESETS:
            continue
        try:
            re.compile(item)
        except re.error as error:
            raise ConfigError(
                f"--fp8_modules '{item}' is neither a preset ({', '.join(FP8_MODULE_PRESETS)}) nor a valid "
                f"regular expression ({error})."
            ) from None
    return selectors


def check_readable(path: str, flag: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"{flag} {path} does not exist. Point it at a local folder or file.")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{flag} {path} is not readable by this user. Fix its permissions.")


def load_json_config(path: str, flag: str) -> dict:
    """A JSON config file's object, or an error that names the flag, the file and where the JSON breaks."""
    check_readable(path, flag)
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{flag} {path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
        ) from None
    if not isinstance(config, dict):
        raise ConfigError(f"{flag} {path} must hold a JSON object, not {type(config).__name__}.")
    return config


class TurboTuneParser(TrlParser):
    """TRL's parser, with argparse's usage dump and exit replaced by one ConfigError line."""

    def error(self, message: str) -> None:
        raise ConfigError(f"{message}. See python qwen3_sft.py --help.")

    def closest_flag(self, flag: str) -> str | None:
        known = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        return next(iter(difflib.get_close_matches(flag, known, n=1)), None)


def parse_config(argv: list[str] | None = None) -> TurboTuneConfig:
    """Flags from the command line, optionally on top of a YAML file given with --config; a flag or key that
    TurboTuneConfig does not have stops the run with the closest one it does have."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[-1:] == ["--config"]:
        raise ConfigError("--config needs a YAML file: --config run.yaml.")
    config_file = argv[argv.index("--config") + 1] if "--config" in argv else None
    if config_file is not None:
        check_readable(config_file, "--config")
    parser = TurboTuneParser(TurboTuneConfig)
    try:
        config, from_file, from_command_line = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except ConfigError:
        raise
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {config_file} is not valid YAML: {' '.join(str(error).split())}") from None
    except ValueError as error:  # TRL's checks of the --config file, transformers' of the flags: messages for users
        raise ConfigError(" ".join(str(error).split())) from None
    if from_command_line:
        unknown = next((item for item in from_command_line if item.startswith("-")), from_command_line[0])
        flag = unknown.split("=", 1)[0]
        close = parser.closest_flag(flag) if flag.startswith("-") else None
        hint = f"did you mean {close}?" if close else "see python qwen3_sft.py --help for the flags."
        raise ConfigError(f"unknown argument {unknown!r}; {hint}")
    if from_file:
        key = from_file[0].removeprefix("--")
        close = parser.closest_flag(f"--{key}")
        hint = f"did you mean {close.removeprefix('--')}?" if close else "see python qwen3_sft.py --help for the keys."
        raise ConfigError(f"--config {config_file}: unknown key {key!r}; {hint}")
    return config
