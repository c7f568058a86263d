"""Supervised fine-tuning of a Qwen3-MoE model with Turbo-Tune's kernels, on TRL's SFTTrainer.

    python qwen3_sft.py [--model_path DIR] [--data_path PATH] [--output_dir DIR] [any SFTConfig flag] [--config F]

With no --model_path and --data_path it trains the embedded tiny Qwen3-MoE on the bundled chat task. Every check of
the flags, the model folder and the data runs before the output folder is touched.
"""

import atexit
import importlib.util
import logging
import os
import sys
from pathlib import Path

import turbo_tune.triton_mode  # noqa: F401  (before anything imports triton)

# isort: split
import torch.distributed as dist
import transformers
from datasets import Dataset
from transformers.trainer_utils import get_last_checkpoint

from callback import EfficiencyCallback, ModelFlops, device_peak_tflops
from monkey_patch import apply_patches, apply_peft_patches, preflight
from monkey_patch.sft_trainer import TurboSFTTrainer
from turbo_tune.arguments import TurboTuneConfig, parse_config
from turbo_tune.data import hold_out, load_sft_dataset, record_kind
from turbo_tune.errors import ConfigError
from turbo_tune.modeling import apply_lora, load_model, load_tokenizer
from turbo_tune.toy_task import bundled_dataset

logger = logging.getLogger("qwen3_sft")

RUN_OUTPUTS = ("config.json", "adapter_config.json", "trainer_state.json", "model.safetensors")


OUR_LOGGERS = ("qwen3_sft", "turbo_tune", "monkey_patch", "callback")


def configure_logging(config: TurboTuneConfig) -> None:
    """Our own messages at INFO on the main process; transformers at the level --log_level asks for."""
    level = config.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(min(level, logging.INFO) if config.should_log else level)
    transformers.utils.logging.set_verbosity(level)


def join_process_group(config: TurboTuneConfig) -> None:
    """Set up devices and the process group now, not in the Trainer: ZeRO-3 partitions the weights while they load
    (deepspeed.zero.Init needs the world size), and only the main process should log at INFO."""
    config.device  # noqa: B018 (TrainingArguments sets up accelerate's PartialState on first access)
    if config.deepspeed and dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed()  # DeepSpeed's comm adopts the group (accelerate does this itself on GPUs only)


def configure_mlflow() -> None:
    """A local store in ./mlruns (SQLite: MLflow's file store is retired) unless MLFLOW_TRACKING_URI says otherwise,
    and MLflow's system metrics (CPU, memory; GPU utilisation and memory through nvidia-ml-py) where psutil is."""
    if "MLFLOW_TRACKING_URI" not in os.environ:
        store = Path("mlruns").resolve()
        store.mkdir(exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "turbo-tune")
    if importlib.util.find_spec("psutil") is not None:
        os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")


def resolve_resume(config: TurboTuneConfig) -> str | None:
    """The checkpoint to resume from, and a refusal to write over an earlier run's outputs when not resuming."""
    output_dir = Path(config.output_dir)
    resume = config.resume_from_checkpoint
    if resume in ("last", "latest", "true", "True"):
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise ConfigError(f"--resume_from_checkpoint {resume}: {output_dir} holds no checkpoint-* folder.")
        return last
    if resume is not None:
        if not Path(resume).is_dir():
            raise ConfigError(f"--resume_from_checkpoint {resume} is not a checkpoint folder.")
        return resume
    if output_dir.is_dir():
        earlier = [p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint-") or p.name in RUN_OUTPUTS]
        if earlier:
            raise ConfigError(
                f"--output_dir {output_dir} already holds an earlier run ({', '.join(sorted(earlier)[:3])}). "
                "Resume it with --resume_from_checkpoint last, or choose a new --output_dir."
            )
    return None


def load_datasets(config: TurboTuneConfig) -> tuple[Dataset, Dataset | None]:
    """The training data and the evaluation data (from --eval_data_path, or held out by --eval_split), checked."""
    if config.data_path is None:
        train_data = bundled_dataset(config.bundled_examples, seed=config.data_seed or 0)
    else:
        train_data = load_sft_dataset(config.data_path)
    if config.eval_data_path is not None:
        eval_data = load_sft_dataset(config.eval_data_path, flag="--eval_data_path")
        if record_kind(eval_data[0]) != record_kind(train_data[0]):
            raise ConfigError(
                f"--eval_data_path {config.eval_data_path} holds {record_kind(eval_data[0])} records but the training "
                f"data {record_kind(train_data[0])} ones; evaluate on the same kind."
            )
        return train_data, eval_data
    if config.eval_split:
        seed = config.seed if config.data_seed is None else config.data_seed
        return hold_out(train_data, config.eval_split, seed)
    return train_data, None


def train(config: TurboTuneConfig) -> Path:
    preflight(config)
    resume = resolve_resume(config)
    tokenizer = load_tokenizer(config)
    dataset, eval_dataset = load_datasets(config)
    config.assistant_only_loss = not config.train_on_all_tokens and record_kind(dataset[0]) == "conversational"

    model = load_model(config)
    model = apply_patches(model, config)
    if config.use_lora:
        model = apply_lora(model, config)
        apply_peft_patches(model, config)  # after peft made its adapters in the weights' own dtype

    efficiency = None
    if config.use_liger_efficiency_callback:
        efficiency = EfficiencyCallback(ModelFlops.from_config(model.config), device_peak_tflops())
    trainer = TurboSFTTrainer(
        model=model, args=config, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
        efficiency=efficiency,
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_final_model(config.output_dir)
    trainer.save_state()
    if config.merge_lora:
        trainer.save_merged_model(Path(config.output_dir) / "merged", tokenizer)
    logger.info("Final model written to %s.", config.output_dir)
    return Path(config.output_dir)


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(argv)
        join_process_group(config)
        configure_logging(config)
        configure_mlflow()
        train(config)
        if dist.is_initialized():
            dist.barrier()  # leave together: rank 0 may still be writing the final model the others helped gather
    except ConfigError as error:
        print(f"qwen3_sft.py: error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # gloo aborts at interpreter exit when its group is still alive
    return 0


def exit_now(code: int) -> None:
    """Exit a distributed worker without interpreter finalization: run the exit handlers (MLflow, logging, temporary
    files) and flush, then end the process. Finalization races the C++ threads of Gloo and autograd, which touch
    Python objects while the interpreter is torn down (pytorch/pytorch#190489): a run that had written everything
    still died with SIGABRT ("terminate called without an active exception") in two CI runs of seven."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_now(exit_code)
    sys.exit(exit_code)
