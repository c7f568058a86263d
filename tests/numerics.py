"""The one comparison every numerics test makes (CPU suite and GPU gate alike)."""

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in fp32; never against zeros, never with a non-finite value."""
    expected = expected.float()
    assert expected.abs().max() > 0, "never compare against zeros"
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual.float() - expected).norm() / expected.norm()).item()
