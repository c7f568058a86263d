"""Model and tokenizer: a local Qwen3-MoE checkpoint, or the embedded tiny one built from the config in assets/."""

import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import is_flash_attn_2_available

from monkey_patch.attention import VARLEN_SDPA, register_varlen_sdpa, torch_varlen_available
from turbo_tune.arguments import TurboTuneConfig, comma_list
from turbo_tune.errors import ConfigError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-qwen3-moe"


def model_source(config: TurboTuneConfig) -> Path:
    return Path(config.model_path) if config.model_path else EMBEDDED_MODEL_DIR


def load_tokenizer(config: TurboTuneConfig) -> PreTrainedTokenizerBase:
    source = model_source(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"--model_path {source}: no usable tokenizer there ({error}). The folder must hold a Hugging Face "
            "checkpoint with tokenizer files (tokenizer.json, tokenizer_config.json)."
        ) from None
    if tokenizer.chat_template is None:
        raise ConfigError(
            f"--model_path {source}: the tokenizer has no chat template, so conversations cannot be formatted. "
            "Use an instruct checkpoint or add a chat_template to its tokenizer_config.json."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weight_dtype(config: TurboTuneConfig) -> torch.dtype:
    """The dtype weights load in. ``auto`` under bf16 mixed precision: bf16 where something else keeps fp32 master
    weights (DeepSpeed's optimizer, FSDP2's sharded parameters) or nothing trains them (LoRA's frozen base; peft keeps
    the adapters fp32), else fp32 with bf16 compute under autocast. In bf16, AdamW's update at a fine-tuning learning
    rate is below half a bf16 step for most weights and is rounded away."""
    if config.model_dtype != "auto":
        return getattr(torch, config.model_dtype)
    if not config.bf16:
        return torch.float32
    return torch.bfloat16 if config.use_lora or config.deepspeed or config.fsdp else torch.float32


def describe_precision(config: TurboTuneConfig, dtype: torch.dtype) -> tuple[int, str]:
    """The log level and line saying what holds the master weights and what computes (a warning when nothing keeps
    fp32 master weights of trained bf16 weights)."""
    compute = "bf16" if config.bf16 else "fp16" if config.fp16 else "the weights' dtype"
    if config.use_lora:
        return logging.INFO, f"LoRA: frozen base weights in {dtype}, adapters in fp32 (peft), compute in {compute}."
    if config.deepspeed:
        return logging.INFO, f"Weights in {dtype}; DeepSpeed's optimizer keeps fp32 masters; compute in {compute}."
    if config.fsdp:
        return logging.INFO, f"Weights load in {dtype}; FSDP2 keeps sharded fp32 parameters; compute in {compute}."
    if dtype == torch.bfloat16:
        return logging.WARNING, (
            "Full-parameter training with bf16 weights and no fp32 master copy (--model_dtype bfloat16): AdamW "
            "updates smaller than half a bf16 step are lost. Leave --model_dtype auto for fp32 master weights.")
    line = f"Master weights in {dtype}, compute in {compute} (autocast where it differs)."
    if dtype == torch.float32 and compute != "the weights' dtype" and not config.use_fast_moe_block:
        return logging.WARNING, line + (
            " transformers' experts ignore autocast and compute in fp32, about 2.8x slower a step at Qwen3-30B-A3B's "
            "shape (docs/results.md): add --use_fast_moe_block (bf16 compute, fp32 masters) or --model_dtype bfloat16.")
    return logging.INFO, line


def attention_implementation(config: TurboTuneConfig) -> str:
    """flash-attn when it is installed on a GPU; for packed rows without it, our padding-free ``varlen_sdpa``
    (monkey_patch/attention.py), which spares SDPA the dense block-diagonal mask; PyTorch SDPA otherwise."""
    if config.attn_implementation == VARLEN_SDPA:
        return register_varlen_sdpa()
    if config.attn_implementation != "auto":
        return config.attn_implementation
    if is_flash_attn_2_available():  # its distribution, not the `flash_attn` package flash-attn-4 installs too
        return "flash_attention_2"
    if config.use_packing and (not torch.cuda.is_available() or torch_varlen_available()):
        return register_varlen_sdpa()
    return "sdpa"


def load_model(config: TurboTuneConfig) -> PreTrainedModel:
    source = model_source(config)
    kwargs = {"dtype": weight_dtype(config), "attn_implementation": attention_implementation(config)}
    logger.log(*describe_precision(config, kwargs["dtype"]))
    try:
        model_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--model_path {source}: no usable config.json there ({error}).") from None
    if getattr(model_config, "model_type", None) != "qwen3_moe":
        raise ConfigError(
            f"--model_path {source} holds a {model_config.model_type!r} model; Turbo-Tune trains Qwen3-MoE "
            "(model_type 'qwen3_moe') checkpoints such as Qwen3-30B-A3B."
        )
    if config.model_path is None:
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_config(model_config, **kwargs)
        logger.info("Built the embedded tiny Qwen3-MoE (%.2fM parameters, random init).", model.num_parameters() / 1e6)
        return model
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        raise ConfigError(f"--model_path {source}: the weights could not be loaded ({error}).") from None


def apply_lora(model: PreTrainedModel, config: TurboTuneConfig) -> PeftModel:
    targets = comma_list(config.lora_target_modules)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(targets) - present)
    if missing:
        raise ConfigError(
            f"--lora_target_modules names {', '.join(missing)}, which this model does not have. "
            f"Linear layers it has include: {', '.join(sorted(n for n in present if n.endswith('proj')))}."
        )
    parameters = expert_lora_parameters(model, config)
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        target_parameters=parameters or None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora_config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA on %s: %d of %d parameters train (%.3f%%).", targets + parameters, trainable, total,
                100 * trainable / total)
    return model


def expert_lora_parameters(model: PreTrainedModel, config: TurboTuneConfig) -> list[str]:
    """--lora_target_parameters, checked against the model (peft matches a suffix of the full parameter name).

    peft's LoRA on a 3D expert parameter has no dropout, and without scattermoe it folds B·A into every
    expert's weight on every forward; the log says which path the experts take.
    """
    parameters = comma_list(config.lora_target_parameters)
    if not parameters:
        return []
    names = [name for name, _ in model.named_parameters()]
    missing = [p for p in parameters if not any(n == p or n.endswith(f".{p}") for n in names)]
    if missing:
        raise ConfigError(
            f"--lora_target_parameters names {', '.join(missing)}, which this model does not have; Qwen3-MoE's "
            "expert parameters are mlp.experts.gate_up_proj and mlp.experts.down_proj."
        )
    if config.lora_dropout:
        raise ConfigError(
            f"--lora_dropout {config.lora_dropout}: peft's LoRA on expert parameters has no dropout (the input "
            "cannot be factored out of B·A·dropout(x) per expert). Pass --lora_dropout 0, or "
            "--lora_target_parameters '' to keep LoRA off the experts."
        )
    if getattr(model.config, "_experts_implementation", None) == "scattermoe":
        logger.info("expert LoRA: scattermoe low-rank path (x·Aᵀ·Bᵀ over routed tokens, no per-expert delta).")
    else:
        logger.info(
            "expert LoRA: peft's target_parameters path, which folds B·A into every expert weight on each forward; "
            "--use_fast_moe_block keeps the factors apart."
        )
    return parameters
