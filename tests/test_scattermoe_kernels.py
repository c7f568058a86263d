"""ScatterMoE kernels and ops against transformers' `eager` Qwen3-MoE experts, in fp32 (Triton interpreter on CPU)."""

import importlib
import sys
from pathlib import Path

import pytest
import torch
import triton
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from monkey_patch.scattermoe import kernels, ops
from monkey_patch.scattermoe.compilable_ops import scattermoe_experts
from monkey_patch.scattermoe.launch import INTERPRET
from monkey_patch.scattermoe.ops import WEIGHT_GRAD_BACKENDS, WEIGHT_GRAD_ENV, LowRank, compute_routing
from tests.numerics import relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = 1e-4


def make_eager_experts(hidden: int, inter: int, num_experts: int, top_k: int) -> Qwen3MoeExperts:
    config = Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter, num_experts=num_experts, num_experts_per_tok=top_k
    )
    config._experts_implementation = "eager"
    experts = Qwen3MoeExperts(config).to(DEVICE)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    return experts


def make_routing(tokens: int, num_experts: int, top_k: int, routing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Router-like (T, k) weights and distinct expert ids; `skewed` leaves experts empty or with one token."""
    logits = torch.randn(tokens, num_experts, device=DEVICE)
    if routing == "skewed":
        logits[:, : max(top_k, 2)] += 6.0
        logits[:, -1] = -1e4
        logits[0, -1] = 1e4
    weights, index = logits.softmax(-1).topk(top_k, dim=-1)
    return weights, index


CASES = [
    # tokens, hidden, inter, experts, top_k, routing
    pytest.param(37, 48, 40, 6, 2, "skewed", id="ragged-sizes-empty-and-one-token-experts"),
    pytest.param(29, 64, 32, 4, 1, "uniform", id="top1"),
    pytest.param(13, 40, 24, 8, 8, "uniform", id="top8-all-experts"),
    pytest.param(50, 32, 48, 16, 3, "skewed", id="many-empty-experts"),
    # Several row blocks per expert, several K steps and output-column blocks (the interpreter's tiles are 64 wide).
    pytest.param(150, 136, 80, 4, 2, "skewed", id="multi-tile"),
]


@pytest.mark.parametrize("weight_grad", WEIGHT_GRAD_BACKENDS)
@pytest.mark.parametrize("tokens,hidden,inter,num_experts,top_k,routing", CASES)
def test_outputs_and_gradients_match_eager_experts(tokens, hidden, inter, num_experts, top_k, routing, weight_grad,
                                                    monkeypatch):
    monkeypatch.setenv(WEIGHT_GRAD_ENV, weight_grad)
    assert_matches_eager_experts(tokens, hidden, inter, num_experts, top_k, routing)


@pytest.mark.parametrize("tokens,hidden,inter,num_experts,top_k,routing", CASES)
def test_one_tile_per_program_configs_match_eager_experts(tokens, hidden, inter, num_experts, top_k, routing,
                                                          monkeypatch):
    """With TURBO_TUNE_MOE_PERSISTENT=0 the kernels run a program per tile, spare row blocks returning at once (the
    test above runs the persistent configs, the interpreter's default: three programs looping over the tiles)."""
    monkeypatch.setenv(kernels.PERSISTENT_ENV, "0")
    assert_matches_eager_experts(tokens, hidden, inter, num_experts, top_k, routing)


def assert_matches_eager_experts(tokens: int, hidden: int, inter: int, num_experts: int, top_k: int,
                                 routing: str) -> None:
    torch.manual_seed(tokens * 7 + top_k)
    experts = make_eager_experts(hidden, inter, num_experts, top_k)
    weights, index = make_routing(tokens, num_experts, top_k, routing)
    weights.requires_grad_(True)
    x = torch.randn(tokens, hidden, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(tokens, hidden, device=DEVICE)
    inputs = (x, experts.gate_up_proj, experts.down_proj, weights)

    expected = experts(x, index, weights)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    actual = scattermoe_experts(x, experts.gate_up_proj, experts.down_proj, weights, index)
    actual_grads = torch.autograd.grad(actual, inputs, grad_out)

    assert relative_error(actual, expected) <= TOLERANCE
    for name, got, want in zip(["x", "gate_up_proj", "down_proj", "routing_weights"], actual_grads, expected_grads,
                               strict=True):
        assert relative_error(got, want) <= TOLERANCE, name


def test_routing_groups_pairs_by_expert_and_counts_empty_experts():
    index = torch.tensor([[2, 0], [2, 3], [0, 2]], device=DEVICE)
    sorted_pairs, expert_ends = compute_routing(index, num_experts=5)
    assert index.reshape(-1)[sorted_pairs].tolist() == [0, 0, 2, 2, 2, 3]
    assert expert_ends.tolist() == [2, 2, 5, 6, 6]


@pytest.mark.parametrize("rows_per_expert", [[0, 1, 64, 0, 130, 63, 0], [0, 0, 0], [200]])
def test_row_block_schedule_gives_each_block_its_expert_and_rows_and_counts_the_blocks_in_use(rows_per_expert):
    counts = torch.tensor(rows_per_expert, device=DEVICE)
    expert_ends = counts.cumsum(0).to(torch.int32)
    num_rows = int(counts.sum())
    expected = []
    for expert, (count, end) in enumerate(zip(rows_per_expert, expert_ends.tolist(), strict=True)):
        start = end - count
        expected += [[expert, row, end] for row in range(start, end, kernels.ROW_BLOCK)]
    spare = triton.cdiv(num_rows, kernels.ROW_BLOCK) + len(rows_per_expert) - len(expected)
    expected += [[len(rows_per_expert), num_rows, num_rows]] * spare
    schedule, used_blocks = kernels.row_block_schedule(expert_ends, num_rows)
    assert schedule.tolist() == expected
    assert used_blocks.tolist() == [len(expected) - spare]


@pytest.fixture
def launched(monkeypatch) -> list:
    """The kernels launched while the test runs, in order."""
    kernels_launched = []
    launch = kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda kernel, grid, args, constexprs: (
        kernels_launched.append(kernel), launch(kernel, grid, args, constexprs))[1])
    return kernels_launched


def small_block() -> tuple[Qwen3MoeExperts, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager experts (H 64, I 32, 4 experts, top-2), routing weights and ids, and an input of 40 tokens."""
    torch.manual_seed(0)
    experts = make_eager_experts(64, 32, 4, 2)
    weights, index = make_routing(40, 4, 2, "uniform")
    return experts, weights, index, torch.randn(40, 64, device=DEVICE, requires_grad=True)


def test_the_row_block_schedule_is_computed_once_for_a_forward_and_its_backward(launched):
    experts, weights, index, x = small_block()
    scattermoe_experts(x, experts.gate_up_proj, experts.down_proj, weights, index).sum().backward()
    assert launched.count(kernels._row_block_schedule_kernel) == 1
    assert x.grad is not None and experts.down_proj.grad is not None


def unspecialized(jit) -> set[str]:
    """The parameters a (JIT or interpreted) kernel is compiled for whatever their value."""
    listed = jit.kwargs.get("do_not_specialize") if INTERPRET else jit.do_not_specialize
    return {jit.arg_names[p] if isinstance(p, int) else p for p in listed or ()}


def test_a_new_token_count_compiles_no_kernel_again(monkeypatch):
    """Packed rows change the token count every step. An integer argument that follows it and that Triton
    specializes on (being 1, a multiple of 16) compiles the kernel again the first time the count falls on the other
    side: half a second of host time in the middle of training on an H200 (docs/history.md). So every such argument
    must be ``do_not_specialize``; this runs the block with LoRA and all weight gradients on the Triton kernels at
    80 and 82 routed rows and compares each launch's integer arguments as Triton would."""
    monkeypatch.setenv(WEIGHT_GRAD_ENV, "triton")
    launches: list = []
    launch = kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda kernel, grid, args, constexprs: (
        launches.append((kernel, args)), launch(kernel, grid, args, constexprs))[1])
    experts, weights, index, x = small_block()
    lora = LowRank(torch.randn(4, 8, 64, device=DEVICE), torch.randn(4, 64, 8, device=DEVICE), 2.0)
    runs = []
    for tokens in (40, 41):
        launches.clear()
        x_rows = torch.randn(tokens, 64, device=DEVICE, requires_grad=True)
        routing = make_routing(tokens, 4, 2, "uniform")
        scattermoe_experts(x_rows, experts.gate_up_proj, experts.down_proj, *routing, gate_up_lora=lora,
                           down_lora=lora).sum().backward()
        runs.append(list(launches))
    assert [kernel for kernel, _ in runs[0]] == [kernel for kernel, _ in runs[1]]
    checked = set()
    for (kernel, args), (_, other_args) in zip(*runs, strict=True):
        jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        free = unspecialized(jit)
        for name, value, other in zip(jit.arg_names, args, other_args, strict=False):
            if isinstance(value, int) and not isinstance(value, bool) and name not in free:
                checked.add(name)
                assert (value == 1, value % 16 == 0) == (other == 1, other % 16 == 0), (
                    f"{jit.__name__}: {name} = {value} then {other}")
    assert "NUM_EXPERTS" in checked  # the comparison ran over the kernels' integer arguments


@pytest.mark.parametrize("setting", [None, "1", "0"])
def test_every_matmul_kernel_is_offered_persistent_configs_unless_turned_off(setting, launched, monkeypatch):
    if setting is not None:
        monkeypatch.setenv(kernels.PERSISTENT_ENV, setting)
    monkeypatch.setenv(WEIGHT_GRAD_ENV, "triton")
    experts, weights, index, x = small_block()
    scattermoe_experts(x, experts.gate_up_proj, experts.down_proj, weights, index).sum().backward()
    matmuls = [kernel for kernel in launched if kernel.fn.__name__ in kernels._PERSISTENT_CONFIGS]
    assert {kernel.fn.__name__ for kernel in matmuls} == set(kernels._PERSISTENT_CONFIGS)
    for kernel in matmuls:
        assert any(config.kwargs["PERSISTENT"] for config in kernel.configs) == (setting != "0"), kernel.fn.__name__


def test_launches_with_the_lora_term_are_not_offered_persistent_configs(monkeypatch):
    launches = []
    launch = kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda kernel, grid, args, constexprs: (
        launches.append((kernel, constexprs.get("HAS_A2"))), launch(kernel, grid, args, constexprs))[1])
    experts, weights, index, x = small_block()
    lora = LowRank(torch.randn(4, 8, 32, device=DEVICE), torch.randn(4, 64, 8, device=DEVICE), 2.0)
    scattermoe_experts(x, experts.gate_up_proj, experts.down_proj, weights, index, down_lora=lora).sum().backward()
    offered = {(kernel.fn.__name__, has_a2): any(config.kwargs["PERSISTENT"] for config in kernel.configs)
               for kernel, has_a2 in launches if kernel.fn.__name__ in kernels._PERSISTENT_CONFIGS}
    assert offered[("_scatter_matmul_kernel", True)] is False
    assert offered[("_scatter_matmul_kernel", False)] is True


def test_weight_grad_kernel_writes_zeros_for_experts_without_rows():
    torch.manual_seed(0)
    index = torch.tensor([[0], [0], [2]], device=DEVICE)
    sorted_pairs, expert_ends = compute_routing(index, num_experts=3)
    a = torch.randn(3, 20, device=DEVICE)
    b = torch.randn(3, 36, device=DEVICE)
    dw = torch.full((3, 20, 36), float("nan"), device=DEVICE)
    kernels.grouped_weight_grad(a, b, kernels.Routing.of(sorted_pairs, expert_ends, 1), a_gathered=True,
                                b_gathered=False, dw=dw)
    assert (dw[1] == 0).all()
    b_grouped = b[sorted_pairs]
    assert relative_error(dw[0], a[:2].T @ b_grouped[:2]) <= TOLERANCE
    assert relative_error(dw[2], a[2:].T @ b_grouped[2:]) <= TOLERANCE


@pytest.mark.parametrize("a_gathered", [True, False], ids=["dW_down-like", "dW_gate_up-like"])
@pytest.mark.parametrize("persistent", [False, True])
def test_weight_grad_kernel_one_program_per_tile_or_persistent_matches_torch_with_empty_and_ragged_experts(
        a_gathered, persistent):
    """The persistent form runs each program's tiles as one loop of row chunks (three programs in the interpreter,
    42 tiles here, several chunks for the busy experts, one for the empty ones, which must still be zeros)."""
    torch.manual_seed(3)
    tokens, top_k, num_experts, m_dim, n_dim = 50, 2, 7, 72, 40
    logits = torch.randn(tokens, num_experts, device=DEVICE)
    logits[:, :2] += 4.0
    logits[:, 5:] = -1e4  # experts 5 and 6 get no rows
    index = logits.topk(top_k, dim=-1).indices
    sorted_pairs, expert_ends = compute_routing(index, num_experts)
    routing = kernels.Routing.of(sorted_pairs, expert_ends, top_k)
    token_rows = torch.randn(tokens, m_dim if a_gathered else n_dim, device=DEVICE)
    grouped_rows = torch.randn(tokens * top_k, n_dim if a_gathered else m_dim, device=DEVICE)
    a, b = (token_rows, grouped_rows) if a_gathered else (grouped_rows, token_rows)
    gathered = token_rows[sorted_pairs // top_k]
    a_grouped, b_grouped = (gathered, grouped_rows) if a_gathered else (grouped_rows, gathered)
    starts = [0, *expert_ends[:-1].tolist()]
    expected = torch.stack([a_grouped[start:end].T @ b_grouped[start:end]
                            for start, end in zip(starts, expert_ends.tolist(), strict=True)])
    config = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "PERSISTENT": persistent}, num_warps=4,
                           num_stages=1)
    dw = torch.full((num_experts, m_dim, n_dim), float("nan"), device=DEVICE)
    kernels.grouped_weight_grad(a, b, routing, a_gathered, not a_gathered, dw, config=config)
    assert (dw[5:] == 0).all()
    assert relative_error(dw, expected) <= 1e-5


def test_unknown_weight_grad_backend_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(WEIGHT_GRAD_ENV, "cublas")
    experts = make_eager_experts(16, 16, 2, 1)
    weights, index = make_routing(3, 2, 1, "uniform")
    x = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    out = scattermoe_experts(x, experts.gate_up_proj, experts.down_proj, weights, index)
    with pytest.raises(ValueError, match="TURBO_TUNE_MOE_WEIGHT_GRAD='cublas': choose one of triton, grouped_mm, "
                       "grouped_mm_gate_up, auto"):
        out.sum().backward()


def eager_and_scattermoe_weight_grads(seed: int, tokens: int):
    """The eager experts' weight gradients (H 48, I 40, 6 experts, top-2, skewed routing), and a function giving
    scattermoe's for the same inputs."""
    torch.manual_seed(seed)
    experts = make_eager_experts(48, 40, 6, 2)
    weights, index = make_routing(tokens, 6, 2, "skewed")
    x = torch.randn(tokens, 48, device=DEVICE)
    grad_out = torch.randn(tokens, 48, device=DEVICE)
    params = (experts.gate_up_proj, experts.down_proj)
    expected = torch.autograd.grad(experts(x, index, weights), params, grad_out)
    return expected, lambda: torch.autograd.grad(scattermoe_experts(x, *params, weights, index), params, grad_out)


@pytest.mark.parametrize("setting", ["grouped_mm_gate_up", None])
def test_grouped_mm_gate_up_is_the_default_and_runs_only_dw_gate_up_on_the_grouped_gemm(monkeypatch, setting):
    """dW_down is computed while dW_gate_up is held: on the Triton kernel it needs no copy of the routed rows, so the
    block's peak stays below transformers' grouped_mm (docs/results.md)."""
    if setting is None:
        monkeypatch.delenv(WEIGHT_GRAD_ENV, raising=False)
    else:
        monkeypatch.setenv(WEIGHT_GRAD_ENV, setting)
    calls = []
    grouped_mm, triton_kernel = torch._grouped_mm, kernels.grouped_weight_grad
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: (calls.append("grouped_mm"), grouped_mm(*a, **k))[1])
    monkeypatch.setattr(kernels, "grouped_weight_grad",
                        lambda *a, **k: (calls.append("triton"), triton_kernel(*a, **k))[1])
    expected, weight_grads = eager_and_scattermoe_weight_grads(seed=4, tokens=29)
    actual = weight_grads()
    assert calls == ["grouped_mm", "triton"]
    for got, want in zip(actual, expected, strict=True):
        assert relative_error(got, want) <= TOLERANCE


def test_auto_weight_grad_keeps_the_faster_backend_per_shape(monkeypatch):
    monkeypatch.setenv(WEIGHT_GRAD_ENV, "auto")
    monkeypatch.setattr(ops, "_FASTEST_WEIGHT_GRAD", {})
    timings = iter([2.0, 1.0, 2.0, 1.0])  # triton then grouped_mm, for dW_gate_up and then dW_down
    monkeypatch.setattr(ops, "_time_ms", lambda fn: (fn(), next(timings))[1])
    expected, weight_grads = eager_and_scattermoe_weight_grads(seed=2, tokens=37)
    for _ in range(2):  # the second backward reuses the choices: no more timings to draw
        actual = weight_grads()
        for got, want in zip(actual, expected, strict=True):
            assert relative_error(got, want) <= TOLERANCE
    assert sorted(ops._FASTEST_WEIGHT_GRAD.values()) == ["grouped_mm", "grouped_mm"]


def test_frozen_expert_weights_skip_weight_grads_and_still_give_input_and_routing_grads():
    torch.manual_seed(1)
    experts = make_eager_experts(32, 32, 4, 2)
    experts.requires_grad_(False)
    weights, index = make_routing(9, 4, 2, "uniform")
    weights.requires_grad_(True)
    x = torch.randn(9, 32, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(9, 32, device=DEVICE)
    out = scattermoe_experts(x, experts.gate_up_proj, experts.down_proj, weights, index)
    actual = torch.autograd.grad(out, (x, weights), grad_out)
    expected = torch.autograd.grad(experts(x, index, weights), (x, weights), grad_out)
    for got, want in zip(actual, expected, strict=True):
        assert relative_error(got, want) <= TOLERANCE


def test_backward_fills_no_zero_gradients_for_the_outputs_the_forward_keeps_for_it():
    """The forward op's other outputs (pre-activations, schedule) are not differentiable; autograd used to hand the
    backward a zero-filled tensor for each, one of the pre-activations' (T*k, 2I) size."""
    torch.manual_seed(2)
    experts = make_eager_experts(32, 24, 8, 2)
    weights, index = make_routing(64, 8, 2, "uniform")
    x = torch.randn(64, 32, device=DEVICE, requires_grad=True)
    out = scattermoe_experts(x, experts.gate_up_proj, experts.down_proj, weights.requires_grad_(), index)
    with torch.profiler.profile() as profile:
        out.backward(torch.randn_like(out))
    assert not [event.name for event in profile.events() if event.name in ("aten::zeros", "aten::zero_", "aten::fill_")]
    assert x.grad is not None and experts.gate_up_proj.grad is not None and weights.grad is not None


@pytest.mark.parametrize("tokens, hidden, top_k", [(1, 40, 1), (37, 72, 8), (5, 33, 3)])
def test_top_k_combine_sums_each_tokens_rows(tokens, hidden, top_k):
    rows = torch.randn(tokens * top_k, hidden, device=DEVICE)
    expected = rows.view(tokens, top_k, hidden).sum(1)
    assert relative_error(kernels.sum_top_k(rows, top_k), expected) <= 1e-6


def test_top_k_combine_of_no_tokens_is_empty():
    assert kernels.sum_top_k(torch.randn(0, 16, device=DEVICE), 4).shape == (0, 16)


@pytest.fixture
def wgrad_sweep():
    """benchmarks/wgrad_sweep.py as a module (the benchmarks import their siblings by name)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("wgrad_sweep")


def test_weight_grad_sweep_launches_the_kernel_as_the_launcher_does(wgrad_sweep):
    """benchmarks/wgrad_sweep.py calls the kernel with fixed configs: its arguments must be the launcher's."""
    problems = wgrad_sweep.weight_grad_problems(40, 64, 48, 6, 2, "cpu", torch.float32)
    for a, b, routing, a_gathered, b_gathered, dw in problems.values():
        expected = kernels.grouped_weight_grad(a, b, routing, a_gathered, b_gathered, torch.empty_like(dw))
        for persistent in (False, True):
            actual = wgrad_sweep.launch((a, b, routing, a_gathered, b_gathered, dw), 64, 64, 64, 4, 1, persistent)
            assert relative_error(actual, expected) <= 1e-5


def test_weight_grad_sweep_times_the_grouped_mm_backend_beside_the_tiles(wgrad_sweep, monkeypatch):
    """The sweep's second row is ops.expert_weight_grad on torch's grouped GEMM, checked against the kernel."""
    monkeypatch.setattr(wgrad_sweep, "median_ms", lambda fn, warmup, repeats: float(fn() is not None))
    monkeypatch.setenv(WEIGHT_GRAD_ENV, "triton")
    problem = wgrad_sweep.weight_grad_problems(40, 64, 48, 6, 2, "cpu", torch.float32)["dW_down"]
    autotuned, on_grouped_mm, *tiles = wgrad_sweep.sweep(problem, [(64, 64, 64, 4, 1)], flops=1e9)
    assert on_grouped_mm == {"config": wgrad_sweep.GROUPED_MM, "ms": 1.0, "tflops": 1.0}
    assert [row["config"] for row in tiles] == [(64, 64, 64, 4, 1)]


def test_strided_misaligned_and_transposed_inputs_give_the_contiguous_results():
    """x one element past an aligned start with an odd row stride, both weights transposed views, routing weights
    every other column of a wider tensor (a (T, k) view that flattens with stride 2)."""
    torch.manual_seed(5)
    tokens, hidden, inter, num_experts, top_k = 37, 48, 40, 6, 2
    experts = make_eager_experts(hidden, inter, num_experts, top_k)
    weights, index = make_routing(tokens, num_experts, top_k, "skewed")
    weights.requires_grad_(True)
    x = torch.randn(tokens, hidden, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(tokens, hidden, device=DEVICE)
    leaves = [t.detach().clone().requires_grad_() for t in (x, experts.gate_up_proj, experts.down_proj, weights)]

    def strided(x, w_gate_up, w_down, weights):
        stride = 2 * hidden + 1
        x_view = torch.empty(tokens * stride + 1, device=DEVICE).as_strided((tokens, hidden), (stride, 1), 1)
        return (x_view.copy_(x), w_gate_up.transpose(1, 2).contiguous().transpose(1, 2),
                w_down.transpose(1, 2).contiguous().transpose(1, 2),
                torch.stack([weights, torch.zeros_like(weights)], -1).flatten(1)[:, ::2])

    expected = experts(x, index, weights)
    expected_grads = torch.autograd.grad(expected, (x, experts.gate_up_proj, experts.down_proj, weights), grad_out)
    x_s, w_gate_up_s, w_down_s, weights_s = strided(*leaves)
    assert not any(t.is_contiguous() for t in (x_s, w_gate_up_s, w_down_s, weights_s))
    actual = scattermoe_experts(x_s, w_gate_up_s, w_down_s, weights_s, index)
    assert relative_error(actual, expected) <= TOLERANCE
    for got, want in zip(torch.autograd.grad(actual, leaves, grad_out), expected_grads, strict=True):
        assert relative_error(got, want) <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, width, num_experts, top_k, routing", [
    (37, 72, 6, 2, "skewed"),  # ragged rows and columns, empty experts
    (150, 520, 8, 8, "uniform"),  # several row and column blocks
    (1, 16, 4, 1, "uniform"),
])
def test_token_rows_gathered_in_expert_order_are_index_selects_exact_copy(tokens, width, num_experts, top_k, routing,
                                                                         dtype):
    weights, index = make_routing(tokens, num_experts, top_k, routing)
    sorted_pairs, expert_ends = compute_routing(index, num_experts)
    route = kernels.Routing.of(sorted_pairs, expert_ends, top_k)
    wide = torch.randn(tokens, width + 24, device=DEVICE).to(dtype)
    for src in (wide[:, :width].contiguous(), wide[:, 24:], wide[:, :width].t().contiguous().t()):  # row strides
        gathered = kernels.gather_token_rows(src, route)
        assert torch.equal(gathered, src.index_select(0, sorted_pairs // top_k))


def test_no_routed_rows_gather_to_an_empty_tensor():
    route = kernels.Routing.of(*compute_routing(torch.zeros(0, 2, dtype=torch.long, device=DEVICE), 4), 2)
    assert kernels.gather_token_rows(torch.randn(0, 8, device=DEVICE), route).shape == (0, 8)


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_a_recompute_in_backward_skips_the_down_projection_and_keeps_every_gradient(down_projections, reentrant,
                                                                                      lora):
    """Checkpointed `x + experts(x)`, as a Qwen3-MoE layer ends: the recompute runs no down projection and every
    gradient, LoRA factors' included, equals the uncheckpointed one's."""
    tokens, hidden, inter, num_experts, top_k, rank = 37, 48, 40, 6, 2, 8
    experts = make_eager_experts(hidden, inter, num_experts, top_k)
    weights, index = make_routing(tokens, num_experts, top_k, "skewed")
    shapes = down_projections(inter, hidden)

    def layer_end(x, w_gate_up, w_down, routing_weights, *factors):
        loras = [LowRank(a, b, 2.0) for a, b in zip(factors[::2], factors[1::2], strict=True)] or [None, None]
        return x + scattermoe_experts(x, w_gate_up, w_down, routing_weights, index, *loras,
                                      skip_recomputed_output=True)

    inputs = [torch.randn(tokens, hidden, device=DEVICE), experts.gate_up_proj, experts.down_proj, weights]
    if lora:
        inputs += [torch.randn(num_experts, rank, hidden, device=DEVICE) * 0.1,
                   torch.randn(num_experts, 2 * inter, rank, device=DEVICE) * 0.1,
                   torch.randn(num_experts, rank, inter, device=DEVICE) * 0.1,
                   torch.randn(num_experts, hidden, rank, device=DEVICE) * 0.1]
    grads = []
    for checkpointed in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        shapes.clear()
        if checkpointed:
            out = torch.utils.checkpoint.checkpoint(layer_end, *leaves, use_reentrant=reentrant)
        else:
            out = layer_end(*leaves)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE))
        assert len(shapes) == 1  # the forward's; neither the recompute nor the backward run one
        grads.append([leaf.grad for leaf in leaves])
    for plain, checkpointed in zip(*grads, strict=True):
        assert torch.equal(plain, checkpointed)


def test_a_model_that_reads_the_recomputed_output_gets_nan_gradients_not_wrong_ones():
    tokens, hidden, inter, num_experts, top_k = 13, 40, 24, 8, 2
    experts = make_eager_experts(hidden, inter, num_experts, top_k)
    weights, index = make_routing(tokens, num_experts, top_k, "uniform")
    x = torch.randn(tokens, hidden, device=DEVICE, requires_grad=True)

    def squared(x):  # square saves its input for backward: the recomputed output
        return scattermoe_experts(x, experts.gate_up_proj, experts.down_proj, weights, index,
                                  skip_recomputed_output=True).square()

    torch.utils.checkpoint.checkpoint(squared, x, use_reentrant=False).sum().backward()
    assert x.grad.isnan().all()
