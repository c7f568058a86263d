"""``--use_liger_kernel``: which of Liger's Qwen3-MoE kernels run, so they compose with the rest of Turbo-Tune.

The Trainer applies Liger itself, once, at the start of training (``Trainer.train`` → transformers'
``apply_liger_kernel(model, args.liger_kernel_config)`` → ``apply_liger_kernel_to_qwen3_moe(model=...)``), after
the model reached its device and through a peft wrapper. Turbo-Tune only chooses the kernel config here:

* ``fused_linear_cross_entropy`` stays off: TRL 1.16 refuses it (it replaces ``model.forward``) because TRL's own
  fused LM head already scores the labels in chunks without the (tokens × vocab) logits, and also returns
  ``is_top1``, from which ``mean_token_accuracy`` is logged.
* ``swiglu`` is off with ``--use_fast_moe_block``: in liger-kernel 0.8.5 it rebinds every experts module's
  ``forward`` to ``LigerExperts.forward``, which would bypass transformers' experts dispatch and so ScatterMoE.
* ``rope`` and ``rms_norm`` are off with ``--torch_compile``: Liger's kernels inside the compiled layers failed to
  trace under Dynamo on triton 3.6 with "'float' object has no attribute 'to'" (reported for the RoPE/norm pair).
  That message is RMSNorm's ``eps.to(tl.float32)`` on a Python float, the same error Triton's CPU interpreter
  raises, so both stay out and Inductor fuses transformers' RMSNorm and RoPE instead.
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
        chosen.update(rope=False, rms_norm=False)
    return chosen


def configure_liger(config: TurboTuneConfig) -> None:
    """Set ``config.liger_kernel_config``, which the Trainer hands to Liger when training starts."""
    config.liger_kernel_config = liger_kernel_config(config)
    names = {"rms_norm": "RMSNorm", "rope": "RoPE", "swiglu": "SwiGLU experts"}
    reasons = {"rms_norm": "compiled by Inductor (--torch_compile)", "rope": "compiled by Inductor (--torch_compile)",
               "swiglu": "the experts run through ScatterMoE (--use_fast_moe_block)"}
    on = [names[k] for k in names if config.liger_kernel_config.get(k) is not False]
    off = [f"{names[k]}: {reasons[k]}" for k in names if config.liger_kernel_config.get(k) is False]
    logger.info(
        "Liger kernels for Qwen3-MoE: %s; loss and token accuracy come from TRL's fused LM head.%s",
        ", ".join(on) or "none", "".join(f" Not Liger's {item}." for item in off),
    )
