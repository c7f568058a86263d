"""Shared test setup: Triton kernels run in the interpreter when there is no GPU."""

import os

import turbo_tune.triton_mode  # noqa: F401  (first: Triton's interpreter on a CPU, before anything imports triton)

# isort: split
import pytest
import torch
from accelerate.state import AcceleratorState

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def isolated_process_state():
    """Undo what a test's libraries leave behind: DeepSpeed and accelerate set environment variables (RANK,
    ACCELERATE_USE_DEEPSPEED, ...) and may open a process group, which would leak into later tests' runs."""
    environ = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environ)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
