"""ScatterMoE Triton kernels for the Qwen3-MoE expert block (see monkey_patch/fast_moe.py for the patch)."""

from .compilable_ops import scattermoe_experts
from .ops import scattermoe_experts_autograd

__all__ = ["scattermoe_experts", "scattermoe_experts_autograd"]
