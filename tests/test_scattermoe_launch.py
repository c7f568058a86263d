"""The launch cache in front of Triton (monkey_patch/scattermoe/launch.py), with stand-ins for Triton's kernel
objects: on a CPU the kernels run in Triton's interpreter, which has no compiled kernels to call."""

from types import SimpleNamespace

import pytest
import torch
import triton

from monkey_patch.scattermoe import launch


class CompiledStub:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("compiled", grid, args))


class JitStub:
    """Parameters (a, n, K, FLAG, BLOCK); Triton's path and warmup recorded."""

    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.params = [SimpleNamespace(name=name) for name in ("a", "n", "K", "FLAG", "BLOCK")]
        self.arg_names = [p.name for p in self.params]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(("triton", grid, args, kwargs))

    def warmup(self, *args, grid, **kwargs):
        self.calls.append(("warmup", grid, args, kwargs))
        return CompiledStub(self.calls)


class TunerStub(triton.runtime.Autotuner):
    """An autotuner keyed on K that picked BLOCK=64, num_warps=4."""

    def __init__(self, calls: list) -> None:
        self.fn = JitStub(calls)
        self.arg_names = self.fn.arg_names
        self.keys = ["K"]
        self.best_config = triton.Config({"BLOCK": 64}, num_warps=4)

    def __getitem__(self, grid):
        return self.fn[grid]


@pytest.fixture
def compiled_launches(monkeypatch):
    monkeypatch.setattr(launch, "enabled", True)
    monkeypatch.setattr(launch, "_COMPILED", {})
    calls: list = []
    return calls, TunerStub(calls)


def grid(meta):
    return (triton.cdiv(100, meta["BLOCK"]),)


def test_first_launch_goes_through_triton_and_later_ones_to_the_kernel_it_compiled(compiled_launches):
    calls, kernel = compiled_launches
    a = torch.zeros(8)
    launch.launch(kernel, grid, (a, 32, 2048), {"FLAG": True})
    launch.launch(kernel, grid, (a, 48, 2048), {"FLAG": True})  # 48: still a multiple of 16, not 1

    assert [c[0] for c in calls] == ["triton", "warmup", "compiled"]
    _, warm_grid, _, warm_kwargs = calls[1]
    assert warm_grid == (2, 1, 1) and warm_kwargs["BLOCK"] == 64 and warm_kwargs["num_warps"] == 4
    _, compiled_grid, args = calls[2]
    assert compiled_grid == (2, 1, 1)
    assert args[1:] == (48, 2048, True, 64) and args[0] is a  # every parameter in order, constexprs included


@pytest.mark.parametrize(
    "change",
    ["integer divisibility", "integer one", "autotune key", "tensor alignment", "tensor dtype", "constexpr"],
)
def test_anything_triton_specializes_on_sends_the_launch_back_through_triton(compiled_launches, change):
    calls, kernel = compiled_launches
    a = torch.zeros(16)
    launch.launch(kernel, grid, (a, 32, 2048), {"FLAG": True})
    args, constexprs = {
        "integer divisibility": ((a, 33, 2048), {"FLAG": True}),
        "integer one": ((a, 1, 2048), {"FLAG": True}),
        "autotune key": ((a, 32, 4096), {"FLAG": True}),
        "tensor alignment": ((a[1:], 32, 2048), {"FLAG": True}),
        "tensor dtype": ((a.double(), 32, 2048), {"FLAG": True}),
        "constexpr": ((a, 32, 2048), {"FLAG": False}),
    }[change]
    launch.launch(kernel, grid, args, constexprs)

    assert [c[0] for c in calls] == ["triton", "warmup", "triton", "warmup"]


def test_disabled_cache_always_launches_through_triton(monkeypatch):
    monkeypatch.setattr(launch, "enabled", False)
    calls: list = []
    kernel = JitStub(calls)
    for _ in range(2):
        launch.launch(kernel, grid, (torch.zeros(4), 32, 2048), {"FLAG": True, "BLOCK": 64})

    assert [c[0] for c in calls] == ["triton", "triton"]


def test_an_untested_triton_keeps_the_cache_off_with_one_warning(caplog):
    with caplog.at_level("WARNING", logger=launch.__name__):
        assert launch.cache_supported("9.9.0") is False
    assert len(caplog.records) == 1
    assert "Triton 9.9.0" in caplog.text and launch.TESTED_TRITON[0] in caplog.text
    assert launch.cache_supported(launch.TESTED_TRITON[0]) is True
