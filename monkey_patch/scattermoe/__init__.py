"""ScatterMoE Triton kernels for the Qwen3-MoE expert block (see monkey_patch/fast_moe.py for the patch)."""

from .compilable_ops import scattermoe_experts
from .ops import LowRank

__all__ = ["LowRank", "scattermoe_experts"]
