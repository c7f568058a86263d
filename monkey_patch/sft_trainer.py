"""TRL's SFTTrainer with what Turbo-Tune adds: per-micro-batch efficiency accounting and a truncation report."""

import logging
from pathlib import Path

import pyarrow.compute as pc
import torch
from datasets import Dataset
from peft import PeftModel
from trl import SFTTrainer

from callback import EfficiencyCallback
from monkey_patch.torch_compile import is_compiled_per_layer

logger = logging.getLogger(__name__)


class TurboSFTTrainer(SFTTrainer):
    def __init__(self, *args, efficiency: EfficiencyCallback | None = None, **kwargs) -> None:
        self.efficiency = efficiency
        if efficiency is not None:
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), efficiency]
        super().__init__(*args, **kwargs)

    def _build_accelerator_args(self, **kwargs) -> dict:
        """No whole-model torch.compile when monkey_patch already compiled the decoder layers (with its fallback)."""
        args = super()._build_accelerator_args(**kwargs)
        if is_compiled_per_layer(self.model):
            args.pop("dynamo_plugin", None)
        return args

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        if self.efficiency is not None:
            self.efficiency.observe_batch(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.efficiency is not None and self.model.training and "loss" in logs:
            logs.update(self.efficiency.pop_metrics(self.state))
        super().log(logs, start_time)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """Tokenize first, count what max_length will cut, then let TRL truncate or pack the tokenized rows."""
        if args.max_length is None or not isinstance(dataset, Dataset):
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        max_length, args.max_length = args.max_length, None
        try:
            tokenized = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
        finally:
            args.max_length = max_length
        lengths = pc.list_value_length(tokenized.data.column("input_ids"))
        too_long = pc.sum(pc.greater(lengths, max_length)).as_py() or 0
        if too_long:
            logger.warning(
                "%s: %d of %d examples are longer than max_length=%d tokens and are truncated (longest: %d). "
                "Raise --max_length to keep them whole.",
                dataset_name, too_long, len(tokenized), max_length, pc.max(lengths).as_py(),
            )
        else:
            logger.info("%s: no example is longer than max_length=%d tokens.", dataset_name, max_length)
        return super()._prepare_dataset(tokenized, processing_class, args, packing, formatting_func, dataset_name)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Resume a plain full-weight run through `from_pretrained`, which converts the saved layout.

        transformers saves Qwen3-MoE experts one tensor per expert (the hub layout) while the live model holds them
        fused; Trainer's own resume loads the file unconverted with strict=False, so the experts would silently keep
        their initial weights. DeepSpeed, FSDP and peft checkpoints keep the live layout and go the usual way.
        """
        target = model if model is not None else self.model
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or isinstance(target, PeftModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not (Path(resume_from_checkpoint) / "config.json").is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        dtype = next(target.parameters()).dtype
        saved = type(target).from_pretrained(resume_from_checkpoint, dtype=dtype, device_map="cpu")
        target.load_state_dict(saved.state_dict(), strict=True)
        logger.info("Weights restored from %s.", resume_from_checkpoint)
