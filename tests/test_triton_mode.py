"""turbo_tune.triton_mode: the Triton settings a run gets before Triton is imported."""

import importlib
import os

import torch

import turbo_tune.triton_mode as triton_mode


def test_gpu_runs_keep_autotuning_results_unless_the_user_says_otherwise(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    importlib.reload(triton_mode)
    assert os.environ["TRITON_CACHE_AUTOTUNING"] == "1"
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "0")
    importlib.reload(triton_mode)
    assert os.environ["TRITON_CACHE_AUTOTUNING"] == "0"


def test_cpu_runs_interpret_the_kernels(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    importlib.reload(triton_mode)
    assert os.environ["TRITON_INTERPRET"] == "1" and "TRITON_CACHE_AUTOTUNING" not in os.environ
