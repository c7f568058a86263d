"""What the benchmark scripts share: Qwen3-30B-A3B's shape, the environment of their child processes (each run is
its own process so that an out-of-memory costs one row), and telling an out-of-memory from other failures."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Qwen3-30B-A3B's dimensions (its config.json); the depth is the caller's (48 layers in the checkpoint).
QWEN3_30B_A3B = {
    "hidden_size": 2048, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
    "intermediate_size": 6144, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "vocab_size": 151936,
}
QWEN3_30B_A3B_LAYERS = 48

OOM_MARKERS = ("OutOfMemoryError", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def child_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH, so a child imports this checkout's packages."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def is_oom(log_text: str) -> bool:
    """Whether a child's log ends in a device out-of-memory (PyTorch's, or cuBLAS failing to allocate)."""
    return any(marker in log_text for marker in OOM_MARKERS)
