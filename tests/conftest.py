"""Shared test setup: Triton kernels run in the interpreter when there is no GPU; the tiny checkpoint that the
distributed tests start from."""

import os
from pathlib import Path

import turbo_tune.triton_mode  # noqa: F401  (first: Triton's interpreter on a CPU, before anything imports triton)

# isort: split
import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from turbo_tune.modeling import EMBEDDED_MODEL_DIR

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


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """The embedded tiny model saved as a checkpoint, so that every engine starts from the same weights: under ZeRO-3
    a randomly initialised model is built already partitioned and draws different random numbers."""
    path = tmp_path_factory.mktemp("tiny-checkpoint")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(EMBEDDED_MODEL_DIR)).save_pretrained(path)
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR).save_pretrained(path)
    return path


@pytest.fixture
def down_projections(monkeypatch):
    """``record(inter, hidden)``: from then on, the shape of every expert down projection ScatterMoE computes (its
    weight as an (E, inter, hidden) view; LoRA's rank-sized products excluded) is appended to the list it returns."""
    from monkey_patch.scattermoe import kernels

    def record(inter: int, hidden: int) -> list:
        shapes, scatter_matmul = [], kernels.scatter_matmul

        def counting(a, w, *args, **kwargs):
            shapes.extend([w.shape] if tuple(w.shape[1:]) == (inter, hidden) else [])
            return scatter_matmul(a, w, *args, **kwargs)

        monkeypatch.setattr(kernels, "scatter_matmul", counting)
        return shapes

    return record
