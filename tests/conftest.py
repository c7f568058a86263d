"""Shared test setup: Triton kernels run in the interpreter when there is no GPU."""

import os

import pytest
import torch
from accelerate.state import AcceleratorState

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
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
