"""``--use_liger_kernel``: which of Liger's Qwen3-MoE kernels run, so they compose with the rest of Turbo-Tune.

The Trainer applies Liger itself, once, at the start of training (``Trainer.train`` → transformers'
``apply_liger_kernel(model, args.liger_kernel_config)`` → ``apply_liger_kernel_to_qwen3_moe(model=...)``), after
the model reached its device and through a peft wrapper. Turbo-Tune only chooses the kernel config here:

* ``fused_linear_cross_entropy`` stays off: TRL 1.16 refuses it (it replaces ``model.forward``) because TRL's own
  fused LM head already scores the labels in chunks without the (tokens × vocab) logits, and also returns
  ``is_top1``, from which ``mean_token_accuracy`` is logged.
* ``swiglu`` is off with ``--use_fast_moe_block``: in liger-kernel 0.8.5 it rebinds every experts module's
  ``forward`` to ``LigerExperts.forward``, which would bypass transformers' experts dispatch and so ScatterMoE.
* ``rope`` is off with ``--torch_compile``: Liger's RoPE Triton kernel does not trace under Dynamo on triton 3.6
  ("'float' object has no attribute 'to'"), so the compiled layers use transformers' RoPE instead.
"""

import logging

from turbo_tune.arguments import TurboTuneConfig

logger = logging.getLogger(__name__)


def liger_kernel_config(config: TurboTuneConfig) -> dict[str, bool]:
    """The keyword arguments Liger's Qwen3-MoE patch gets for these flags (the user's own choices kept otherwise)."""
    chosen = {**(config.liger_kernel_config or {}), "cross_entropy": False, "fused_linear_cross_entropy": False}
    if config.use_fast_moe_block:
        chosen["swiglu"] = False
    if config.torch_compile:
        chosen["rope"] = False
    return chosen


def configure_liger(config: TurboTuneConfig) -> None:
    """Set ``config.liger_kernel_config``, which the Trainer hands to Liger when training starts."""
    config.liger_kernel_config = liger_kernel_config(config)
    off = [name for name in ("rope", "swiglu") if config.liger_kernel_config.get(name) is False]
    reasons = {"rope": "transformers' RoPE under --torch_compile", "swiglu": "ScatterMoE experts"}
    logger.info(
        "Liger kernels for Qwen3-MoE: RMSNorm%s%s; loss and token accuracy from TRL's fused LM head.%s",
        "" if "rope" in off else ", RoPE",
        "" if "swiglu" in off else ", SwiGLU experts",
        "".join(f" Not Liger's {name}: {reasons[name]}." for name in off),
    )
