"""TRL's SFTTrainer with what Turbo-Tune adds: per-micro-batch efficiency accounting, expert-load metrics and
pictures of the run, evaluation on the language-model loss with its perplexity, a truncation report, and
checkpoints that are complete when they appear and never hold non-finite weights."""

import logging
import math
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import PreTrainedTokenizerBase
from transformers.integrations import MLflowCallback, is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTTrainer
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from callback import EfficiencyCallback
from monkey_patch.torch_compile import is_compiled_per_layer
from turbo_tune.checkpoints import (
    FINAL_STAGING_DIR,
    TRAINER_STATE,
    last_complete_checkpoint,
    publish,
    publish_final_model,
    staging_root,
)
from turbo_tune.errors import ConfigError
from turbo_tune.grad_clipping import clip_in_step, fused_step_optimizer
from turbo_tune.moe_health import ExpertLoadMonitor, routers
from turbo_tune.run_dir import honour_umask
from turbo_tune.run_guard import RunGuard
from turbo_tune.run_pictures import RunPicturesCallback
from turbo_tune.tracking import ResilientMLflowCallback
from turbo_tune.train_mode import TrainingModules, train_call_skipped

logger = logging.getLogger(__name__)


def report_truncation(tokenized: Dataset, max_length: int, truncation_mode: str, packing: bool, name: str) -> None:
    """Log how many examples max_length cuts, and how many TRL will drop: without packing it truncates each example
    and then drops those left with no trained token (a prompt that fills max_length). None left is a ConfigError."""
    labels = tokenized.data.column("labels").combine_chunks()
    offsets = labels.offsets.to_numpy()
    lengths = np.diff(offsets)
    row = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(offsets[-1] - offsets[0]) - np.repeat(offsets[:-1] - offsets[0], lengths)
    kept = position < max_length if truncation_mode == "keep_start" else position >= lengths[row] - max_length
    trained = labels.flatten().to_numpy() != -100
    dropped = 0 if packing else int((np.bincount(row[kept & trained], minlength=len(lengths)) == 0).sum())
    too_long = int((lengths > max_length).sum())
    if not too_long:
        logger.info("%s: no example is longer than max_length=%d tokens.", name, max_length)
        return
    if dropped == len(lengths):
        purpose = "train on" if name == "train" else "evaluate on (or pass --eval_split 0)"
        raise ConfigError(
            f"--max_length {max_length}: every example of the {name} set is longer and none keeps a trained token in "
            f"its first {max_length} tokens (the prompt fills them), so nothing is left to {purpose}. Raise "
            f"--max_length (the longest example has {lengths.max()} tokens)."
        )
    logger.warning(
        "%s: %d of %d examples are longer than max_length=%d tokens (longest: %d): %d are truncated%s. "
        "Raise --max_length to keep them whole.",
        name, too_long, len(lengths), max_length, lengths.max(), too_long - dropped,
        f" and {dropped} dropped, since no trained token is left in them" if dropped else "",
    )


def untokenized(dataset, args) -> bool:
    """Whether the dataset still has to be tokenized and checked against --max_length."""
    return args.max_length is not None and isinstance(dataset, Dataset) and "input_ids" not in dataset.column_names


def _tokenize_reporting_truncation(trainer, dataset: Dataset, processing_class, args, packing: bool, formatting_func,
                                   name: str) -> Dataset:
    """SFTTrainer's tokenization without its truncation, then report_truncation. TRL truncates or packs the result
    later; it keeps the records' columns, so TRL still sees what kind of data it is."""
    max_length, args.max_length = args.max_length, None
    try:
        tokenized = SFTTrainer._prepare_dataset(trainer, dataset, processing_class, args, False, formatting_func, name)
    finally:
        args.max_length = max_length
    report_truncation(tokenized, max_length, args.truncation_mode, packing, name)
    return tokenized


def tokenize_and_check(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, args, name: str) -> Dataset:
    """Tokenize a dataset as TurboSFTTrainer would, before the model loads, so that a --max_length that leaves nothing
    to train on stops the run before the model is loaded; the trainer takes the tokenized rows as they are. What
    SFTTrainer._prepare_dataset reads from its trainer is set here as SFTTrainer.__init__ sets it."""
    if not untokenized(dataset, args):
        return dataset
    training_template = args.assistant_only_loss and not has_generation_markers(tokenizer.chat_template)
    preparation = SimpleNamespace(
        _tokenizer=getattr(tokenizer, "tokenizer", tokenizer),
        chat_template=get_training_chat_template(tokenizer) if training_template else None,
        completion_only_loss=args.completion_only_loss,
    )
    packing = args.packing if name == "train" or args.eval_packing is None else args.eval_packing
    return _tokenize_reporting_truncation(preparation, dataset, tokenizer, args, packing, None, name)


class TurboSFTTrainer(SFTTrainer):
    def __init__(self, model: torch.nn.Module, args=None, *, efficiency: EfficiencyCallback | None = None,
                 guard: RunGuard | None = None, **kwargs) -> None:
        self.efficiency = efficiency
        self.guard = guard
        self._staging_checkpoint = False
        self.expert_load = None
        self._counted_model, self._parameter_count = None, 0  # floating_point_ops's count, per model
        self._training_modules = TrainingModules()
        if getattr(args, "moe_health_metrics", False) and routers(model):
            self.expert_load = ExpertLoadMonitor(model, args.moe_load_warn_ratio)
        ours = [callback for callback in (efficiency, guard) if callback is not None]
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), *ours, RunPicturesCallback(self.expert_load)]
        super().__init__(model=model, args=args, **kwargs)
        # report_to's MLflow, minus the stalls when its store fails; in its place, ahead of the run guard, which marks
        # the MLflow run that callback starts as KILLED or FAILED
        callbacks = self.callback_handler.callbacks
        for index, callback in enumerate(callbacks):
            if type(callback) is MLflowCallback:
                callbacks[index] = ResilientMLflowCallback()

    def _build_accelerator_args(self, **kwargs) -> dict:
        """No whole-model torch.compile when monkey_patch already compiled the decoder layers (with its fallback)."""
        args = super()._build_accelerator_args(**kwargs)
        if is_compiled_per_layer(self.model):
            args.pop("dynamo_plugin", None)
        return args

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        if self.efficiency is not None:
            self.efficiency.observe_batch(inputs)
        with train_call_skipped(model, self._training_modules):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.guard is not None:
            self.guard.observe_loss(loss)
        return loss

    def floating_point_ops(self, inputs: dict) -> int:
        """transformers' estimate, 6 × input tokens × non-embedding parameters, with the parameters counted once per
        model instead of at every micro-batch: counting walks every module and parameter (7 ms for full-depth
        Qwen3-30B-A3B with LoRA, docs/history.md), in a step that can be bound by host time."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._counted_model is not self.model:
            self._counted_model = self.model
            self._parameter_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._parameter_count

    def _clip_grad_norm(self, model: torch.nn.Module):
        """With --fused_grad_clipping, the norm here and the clip inside the fused optimizer's step."""
        if not getattr(self.args, "fused_grad_clipping", False):
            return super()._clip_grad_norm(model)
        optimizer = fused_step_optimizer(self.optimizer)
        if optimizer is None:
            raise ConfigError(f"--fused_grad_clipping needs a fused torch optimizer, and this run's is "
                              f"{type(getattr(self.optimizer, 'optimizer', self.optimizer)).__name__}: use "
                              "--optim adamw_torch_fused or drop --fused_grad_clipping.")
        return clip_in_step(optimizer, model.parameters(), self.args.max_grad_norm)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if self.guard is not None:
            self.guard.observe_grad_norm(grad_norm)
        return grad_norm

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training forwards feed the expert-load count; evaluation scores the language-model loss alone."""
        if not self.model.training:
            return self._language_model_loss(model, inputs, return_outputs, num_items_in_batch)
        counting = self.expert_load.counting(inputs.get("attention_mask")) if self.expert_load else nullcontext()
        with counting:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _language_model_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """Without the load-balancing term, so that eval_loss is the cross-entropy of the supervised tokens (what
        perplexity and --load_best_model_at_end should see), not that plus router_aux_loss_coef × aux_loss."""
        aux_loss_enabled, self.aux_loss_enabled = self.aux_loss_enabled, False
        inputs["output_router_logits"] = False
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self.aux_loss_enabled = aux_loss_enabled

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            if self.efficiency is not None:
                logs.update(self.efficiency.pop_metrics(self.state))
            if self.expert_load is not None:
                logs.update(self.expert_load.pop_metrics(self.state.global_step, warn=self.is_world_process_zero()))
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 700.0))  # exp overflows a float past ~709
        super().log(logs, start_time)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """Tokenize first, count what max_length will cut, then let TRL truncate or pack the tokenized rows (a dataset
        tokenize_and_check already tokenized and counted goes straight to TRL)."""
        if untokenized(dataset, args):
            dataset = _tokenize_reporting_truncation(self, dataset, processing_class, args, packing, formatting_func,
                                                     dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Resume a plain full-weight run through `from_pretrained`, which converts the saved layout.

        transformers saves Qwen3-MoE experts one tensor per expert (the hub layout) while the live model holds them
        fused; Trainer's own resume loads the file unconverted with strict=False, so the experts would silently keep
        their initial weights. DeepSpeed, FSDP and peft checkpoints keep the live layout and go the usual way.
        """
        target = model if model is not None else self.model
        if not self._saved_in_hub_layout(resume_from_checkpoint, target):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_converted(resume_from_checkpoint, target)

    def _load_best_model(self) -> None:
        """--load_best_model_at_end: the same conversion as _load_from_checkpoint, for the same reason (Trainer loads
        the best checkpoint's file non-strictly, so the experts would keep the last step's weights)."""
        best = self.state.best_model_checkpoint
        if not self._saved_in_hub_layout(best, self.model):
            return super()._load_best_model()
        logger.info("Loading the best model from %s (score: %s).", best, self.state.best_metric)
        self._load_converted(best, self.model)

    def _saved_in_hub_layout(self, checkpoint: str, model: torch.nn.Module) -> bool:
        """Whether the checkpoint is a plain full-weight save that `from_pretrained` must convert."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or isinstance(model, PeftModel):
            return False
        return (Path(checkpoint) / "config.json").is_file()

    @staticmethod
    def _load_converted(checkpoint: str, model: torch.nn.Module) -> None:
        dtype = next(model.parameters()).dtype
        saved = type(model).from_pretrained(checkpoint, dtype=dtype, device_map="cpu")
        model.load_state_dict(saved.state_dict(), strict=True)
        logger.info("Weights restored from %s.", checkpoint)

    def weights_are_finite(self) -> bool:
        """Whether every trainable weight is finite on every rank, each rank checking the part it holds (a ZeRO-3
        partition, an FSDP2 shard) through its min and max, which NaN and inf propagate to. Frozen weights cannot
        change. Collective: every rank must call it."""
        device = self.args.device
        parts = [local_part(p) for p in self.model.parameters() if p.requires_grad]
        extremes = [torch.stack(torch.aminmax(part)).float().to(device) for part in parts if part.numel()]
        finite = (torch.cat(extremes).isfinite().all() if extremes else torch.tensor(True)).to(device, torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite.item())

    def _save_checkpoint(self, model: torch.nn.Module, trial) -> None:
        """Transformers' checkpoint, written into a staging folder and renamed into place once every rank is done
        (turbo_tune/checkpoints.py); not written at all from non-finite weights, so the rotation that follows can
        only ever delete older finite checkpoints and the newest one stays a finite one."""
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if not self.weights_are_finite():
            last = last_complete_checkpoint(run_dir)
            logger.warning("Step %d: the weights are not finite; %s not written (last finite checkpoint: %s).",
                           self.state.global_step, name, last)
            return
        staging = staging_root(run_dir)
        with self._written_by_every_rank(staging):
            with self._saving_into_staging():
                super()._save_checkpoint(model, trial)
            self._point_best_checkpoint_at(run_dir, staging / name)
        if self.args.should_save:
            publish(staging / name, run_dir / name)
            staging.rmdir()
            rotate_checkpoints(
                output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True,
            )

    def _point_best_checkpoint_at(self, run_dir: Path, staged: Path) -> None:
        """transformers records the best checkpoint under the folder it saved into, the staging one here (and only if
        the best is the checkpoint being saved): name its published place instead, in the state and in the staged
        checkpoint's trainer_state.json, which --load_best_model_at_end and a resumed run read."""
        best_step = self.state.best_global_step
        if not best_step:
            return
        best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{best_step}"
        if best_step == self.state.global_step or best.is_dir():
            self.state.best_model_checkpoint = str(best)
            if self.args.should_save:
                self.state.save_to_json(str(staged / TRAINER_STATE))

    @contextmanager
    def _written_by_every_rank(self, staging: Path):
        """The block writes into ``staging``, emptied first of what a killed save left there; when it ends, every
        rank has finished its part (its shards, its share of a gather), so the main process may publish."""
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        yield
        self.accelerator.wait_for_everyone()

    @contextmanager
    def _saving_into_staging(self):
        self._staging_checkpoint = True
        try:
            yield
        finally:
            self._staging_checkpoint = False

    def _get_output_dir(self, trial) -> str:
        """The staging folder while a checkpoint is written, so that everything transformers writes for it (and its
        rotation, which then sees one checkpoint) happens there."""
        run_dir = super()._get_output_dir(trial)
        return str(staging_root(run_dir)) if self._staging_checkpoint else run_dir

    def weights_are_sharded(self) -> bool:
        """Whether no single rank holds whole weights (ZeRO-3, FSDP), so saving or merging needs the engine's gather."""
        return self.is_fsdp_enabled or (self.is_deepspeed_enabled and is_deepspeed_zero3_enabled())

    def save_final_model(self, output_dir: str) -> None:
        """The trained model as one Hugging Face checkpoint, whatever the engine.

        FSDP checkpoints stay sharded (fast to write, and resumable on the same world size); for the final model the
        engine gathers the full state dict onto rank 0 instead. ZeRO-3 gathers through
        `stage3_gather_16bit_weights_on_model_save` inside `save_model`. Written into a staging folder and moved into
        ``output_dir`` once complete (turbo_tune/checkpoints.py).
        """
        staging = Path(output_dir) / FINAL_STAGING_DIR
        with self._written_by_every_rank(staging):
            if self.is_fsdp_enabled:
                self.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
            self.save_model(str(staging))
        if self.args.should_save:
            publish_final_model(staging, Path(output_dir))
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            honour_umask(Path(output_dir or self.args.output_dir))

    def save_merged_model(self, output_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
        """Merge the LoRA adapters into the base weights and write the full model from rank 0.

        Under ZeRO-3 and FSDP every rank holds only a shard, so merging the live model would merge shards: the engine
        first gathers the full state dict onto rank 0's CPU, where a weightless (meta) copy of the model takes it
        over and merges. Every rank must call this, since the gather is collective.
        """
        peft_model = self.accelerator.unwrap_model(self.model)
        if not isinstance(peft_model, PeftModel):
            raise TypeError(f"save_merged_model needs a peft model, got {type(peft_model).__name__}.")
        if self.weights_are_sharded():
            state_dict = self.accelerator.get_state_dict(self.deepspeed if self.is_deepspeed_enabled else self.model)
            if self.is_world_process_zero():
                base = peft_model.get_base_model()
                with torch.device("meta"):
                    peft_model = get_peft_model(type(base)(base.config), peft_model.peft_config["default"])
                peft_model.load_state_dict(state_dict, strict=True, assign=True)
        if self.is_world_process_zero():
            peft_model.merge_and_unload().save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
            honour_umask(output_dir)
            logger.info("Merged model written to %s.", output_dir)


def local_part(param: torch.nn.Parameter) -> torch.Tensor:
    """The values of a parameter this rank holds: its ZeRO-3 partition, its FSDP2 shard, or the whole tensor."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    if hasattr(param, "to_local"):
        return param.to_local()
    return param.detach()
