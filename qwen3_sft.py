"""Supervised fine-tuning of a Qwen3-MoE model with Turbo-Tune's kernels, on TRL's SFTTrainer.

    python qwen3_sft.py [--model_path DIR] [--data_path PATH] [--output_dir DIR] [any SFTConfig flag] [--config F]

With no --model_path and --data_path it trains the embedded tiny Qwen3-MoE on the bundled chat task. Every check of
the flags, the model folder and the data runs before the output folder is touched.
"""

import atexit
import logging
import os
import sys
from pathlib import Path

import turbo_tune.triton_mode  # noqa: F401  (before anything imports triton)

# isort: split
import torch.distributed as dist
import transformers
from datasets import Dataset

from callback import EfficiencyCallback, ModelFlops, device_peak_tflops
from monkey_patch import apply_patches, apply_peft_patches, preflight
from monkey_patch.sft_trainer import TurboSFTTrainer, tokenize_and_check
from turbo_tune.arguments import TurboTuneConfig, parse_config
from turbo_tune.checkpoints import TRAINER_STATE, holds_trainer_state, last_complete_checkpoint, saved_progress
from turbo_tune.data import hold_out, load_sft_dataset, record_kind
from turbo_tune.errors import ConfigError, RunStopped
from turbo_tune.modeling import apply_lora, load_model, load_tokenizer
from turbo_tune.run_dir import check_no_earlier_run, claim_output_dir, release_claims
from turbo_tune.run_guard import RunGuard
from turbo_tune.toy_task import bundled_dataset
from turbo_tune.tracking import configure_mlflow, continue_mlflow_run, reports_to_mlflow

logger = logging.getLogger("qwen3_sft")

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


def resolve_resume(config: TurboTuneConfig) -> str | None:
    """The checkpoint to resume from, and a refusal to write over an earlier run's outputs when not resuming."""
    output_dir = Path(config.output_dir)
    resume = config.resume_from_checkpoint
    if resume in ("last", "latest", "true", "True"):
        last = last_complete_checkpoint(output_dir)
        if last is None:
            raise ConfigError(f"--resume_from_checkpoint {resume}: {output_dir} holds no complete checkpoint-* folder.")
        stop_if_complete(config, last)
        logger.info("Resuming from %s.", last)
        return str(last)
    if resume is not None:
        if not Path(resume).is_dir():
            raise ConfigError(f"--resume_from_checkpoint {resume} is not a checkpoint folder.")
        if not holds_trainer_state(resume):
            raise ConfigError(f"--resume_from_checkpoint {resume} has no {TRAINER_STATE}: its save was interrupted.")
        stop_if_complete(config, Path(resume))
        return resume
    check_no_earlier_run(output_dir)
    return None


def stop_if_complete(config: TurboTuneConfig, checkpoint: Path) -> None:
    """Resuming a run that already reached its last step would train past it and rotate a checkpoint away."""
    step, max_steps = saved_progress(checkpoint)
    target = config.max_steps if config.max_steps > 0 else max_steps
    if step < target:
        return
    if not holds_trainer_state(config.output_dir):  # written after the final model
        raise RunStopped(
            f"the run reached its last step ({checkpoint}, step {step} of {target}) but was stopped while writing its "
            f"final model, so {config.output_dir} holds none: the trained weights are the ones in {checkpoint}.",
            0,
        )
    raise RunStopped(
        f"the run is already complete: {checkpoint} is step {step} of {target}; nothing to train or write. "
        "Pass a larger --max_steps to train on.",
        0,
    )


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
    if resume is not None and reports_to_mlflow(config):
        continue_mlflow_run(config.output_dir)
    tokenizer = load_tokenizer(config)
    dataset, eval_dataset = load_datasets(config)
    config.assistant_only_loss = not config.train_on_all_tokens and record_kind(dataset[0]) == "conversational"
    claim_output_dir(config.output_dir, resuming=resume is not None, is_main_process=config.process_index == 0)
    dataset = tokenize_and_check(dataset, tokenizer, config, "train")  # the costly checks after the cheap claim
    if eval_dataset is not None:
        eval_dataset = tokenize_and_check(eval_dataset, tokenizer, config, "eval")

    model = load_model(config)
    model = apply_patches(model, config)
    if config.use_lora:
        model = apply_lora(model, config)
        apply_peft_patches(model, config)  # after peft made its adapters in the weights' own dtype

    efficiency = None
    if config.use_liger_efficiency_callback:
        efficiency = EfficiencyCallback(ModelFlops.from_config(model.config), device_peak_tflops())
    guard = RunGuard(config.max_nonfinite_steps)
    trainer = TurboSFTTrainer(
        model=model, args=config, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
        efficiency=efficiency, guard=guard,
    )
    with guard.catching_signals():
        trainer.train(resume_from_checkpoint=resume)
        guard.finish(trainer.state, config.output_dir, trainer.weights_are_finite())
        trainer.save_final_model(config.output_dir)
        if config.merge_lora:
            trainer.save_merged_model(Path(config.output_dir) / "merged", tokenizer)
        trainer.save_state()  # last: it marks the final model complete (stop_if_complete)
    logger.info("Final model written to %s.", config.output_dir)
    return Path(config.output_dir)


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(argv)
        join_process_group(config)
        configure_logging(config)
        configure_mlflow(config)
        train(config)
        if dist.is_initialized():
            dist.barrier()  # leave together: rank 0 may still be writing the final model the others helped gather
    except ConfigError as error:
        print(f"qwen3_sft.py: error: {error}", file=sys.stderr)
        return 2
    except RunStopped as stop:
        if dist.is_initialized():
            dist.barrier()  # every rank stops at the same step; leave together, or torchrun kills the slower ones
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"qwen3_sft.py: {stop}", file=sys.stderr)
        return stop.exit_code
    finally:
        release_claims()
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
