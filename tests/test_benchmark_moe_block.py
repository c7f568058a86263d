"""benchmarks/moe_block.py on the CPU (Triton interpreter, fp32): every implementation that runs without a GPU goes
through run_case, so a broken benchmark shows here and not after a GPU machine has started."""

import json
import os
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import moe_block  # noqa: E402
import torch  # noqa: E402

from monkey_patch.scattermoe import kernels  # noqa: E402

TINY = moe_block.Case("tiny", hidden=64, inter=32, experts=8, top_k=2, tokens=40, routing="skewed", with_eager=True)


@pytest.fixture(autouse=True)
def registered():
    moe_block.register_scattermoe()


@pytest.mark.parametrize(("scope", "implementations"), [
    ("experts", ["eager", "grouped_mm", "scattermoe", moe_block.SCATTERMOE_WGRAD_TRITON,
                 moe_block.SCATTERMOE_WGRAD_GROUPED_MM, "scattermoe_no_tma", "scattermoe_no_persistent"]),
    ("block", ["eager", "grouped_mm", "scattermoe"]),
])
def test_every_cpu_implementation_agrees_with_the_fp32_reference(scope, implementations):
    rows = moe_block.run_case(TINY, implementations, repeats=1, dtype=torch.float32, scope=scope)
    assert [row["impl"] for row in rows] == implementations
    for row in rows:
        assert row["err_out"] <= 1e-4 and row["err_grads"] <= 1e-4, row
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["speedup_vs_grouped_mm"] > 0
        assert row["fwd_bwd_queued_ms"] > 0 and row["speedup_queued_vs_grouped_mm"] > 0
    assert f"| {scope} | tiny | 40 | skewed" in moe_block.markdown_table(rows)


def test_skewed_routing_sends_most_assignments_to_the_hot_experts():
    problem = moe_block.Problem(TINY, "block", torch.device("cpu"), torch.float32)
    assert problem.hot_share > 0.9  # 8 hot experts of 8 here: every assignment; at 128 experts, most of them


def test_rows_are_written_as_json_with_the_issue_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(moe_block, "CASES", [TINY])
    path = tmp_path / "moe_block.json"
    moe_block.main(["--cases", "0", "--scopes", "experts,block", "--implementations", "grouped_mm,scattermoe",
                    "--repeats", "1", "--profile", "", "--json", str(path)])
    written = json.loads(path.read_text())
    assert set(written) == {"device", "stack", "date", "command", "rows"}
    assert [(row["scope"], row["impl"]) for row in written["rows"]] == [
        ("experts", "grouped_mm"), ("experts", "scattermoe"), ("block", "grouped_mm"), ("block", "scattermoe")]
    keys = {"shape", "tokens", "routing", "impl", "fwd_ms", "fwd_bwd_ms", "tflops", "extra_peak_gib",
            "speedup_vs_grouped_mm", "err_out", "err_grads"}
    assert all(keys <= set(row) for row in written["rows"])


def test_a_failing_implementation_is_logged_and_skipped(caplog):
    rows = moe_block.run_case(TINY, ["grouped_mm", "no_such_implementation", "scattermoe"], 1, torch.float32)
    assert [row["impl"] for row in rows] == ["grouped_mm", "scattermoe"]
    assert "no_such_implementation failed at tiny" in caplog.text


@pytest.mark.parametrize("impl", ["scattermoe", moe_block.SCATTERMOE_WGRAD_TRITON,
                                  moe_block.SCATTERMOE_WGRAD_GROUPED_MM, "scattermoe_no_tma"])
def test_profile_flops_count_each_matmul_once_whichever_kernel_computes_the_weight_gradients(impl):
    """The six matmuls of forward+backward are 9 down-projection-sized products, split over the kernels that run."""
    flops = moe_block.matmul_flops(TINY, impl)
    assert sum(flops.values()) == 9 * moe_block.pair_flops(TINY)
    assert moe_block.matmul_flops(TINY, "grouped_mm") == {}


def test_profile_bytes_count_each_memory_bound_pass_and_the_row_copies_of_the_grouped_gemm():
    rows, inter, hidden = TINY.tokens * TINY.top_k, TINY.inter, TINY.hidden
    swiglu, combines = 2 * rows * 6 * inter, 2 * 2 * (rows + TINY.tokens) * hidden
    assert moe_block.memory_bytes(TINY, moe_block.SCATTERMOE_WGRAD_TRITON) == {
        "_swiglu_backward_kernel": swiglu, "_sum_top_k_kernel": combines}
    copy = 2 * 2 * rows * hidden  # read and written once, bf16
    row_copy = kernels._gather_token_rows_kernel.fn.__name__  # the kernel that copies them, as a GPU profile names it
    assert moe_block.memory_bytes(TINY, "scattermoe")[row_copy] == copy
    assert moe_block.memory_bytes(TINY, moe_block.SCATTERMOE_WGRAD_GROUPED_MM)[row_copy] == 2 * copy
    assert moe_block.memory_bytes(TINY, "grouped_mm") == {}


@pytest.mark.parametrize(("impl", "turned_off"), [
    ("scattermoe", set()), ("scattermoe_no_tma", {kernels.TMA_ENV}),
    ("scattermoe_no_persistent", {kernels.PERSISTENT_ENV}),
    (f"{moe_block.SCATTERMOE_WGRAD_TRITON}_no_persistent", {kernels.PERSISTENT_ENV}), ("grouped_mm", set()),
])
def test_each_implementation_turns_off_exactly_its_knobs(impl, turned_off, monkeypatch):
    for env in moe_block.TURNED_OFF.values():
        monkeypatch.setenv(env, "0")
    problem = moe_block.Problem(TINY, "experts", torch.device("cpu"), torch.float32)
    moe_block.use_implementation(problem.block, impl)
    assert {env for env in moe_block.TURNED_OFF.values() if os.environ[env] == "0"} == turned_off


def fake_sonic_moe(x, router_scores, token_indices, expert_indices, w1, b1, w2, b2, num_experts, stream_id,
                   activation_type, is_inference_mode_enabled=False, concat_layout=False):
    """SonicMoE's ``moe_general_routing_inputs`` as its docstring states it, in torch: pairs sorted by token, w1
    (2I, H, E) with [gate; up] concatenated, w2 (H, I, E), fp32 scores."""
    assert concat_layout and b1 is None and b2 is None and router_scores.dtype == torch.float32
    assert token_indices.dtype == expert_indices.dtype == torch.int32 and bool((token_indices.diff() >= 0).all())
    tokens, experts = token_indices.long(), expert_indices.long()
    gate, up = torch.einsum("pih,ph->pi", w1.permute(2, 0, 1)[experts], x[tokens]).chunk(2, dim=-1)
    y = torch.einsum("phi,pi->ph", w2.permute(2, 0, 1)[experts], torch.nn.functional.silu(gate) * up)
    out = torch.zeros_like(x).index_add(0, tokens, y * router_scores[:, None].to(y.dtype))
    return out, torch.bincount(experts, minlength=num_experts)


def test_sonic_moe_gets_the_weights_and_pairs_in_its_own_layout(monkeypatch):
    """The adapter that times SonicMoE beside ours (on a GPU where it is staged) hands it transformers' weights and
    routing as its interface documents them; a wrong permutation or pair order fails against the reference here."""
    monkeypatch.setitem(sys.modules, "sonicmoe", types.SimpleNamespace(moe_general_routing_inputs=fake_sonic_moe))
    monkeypatch.setitem(sys.modules, "sonicmoe.enums",
                        types.SimpleNamespace(ActivationType=types.SimpleNamespace(SWIGLU="swiglu")))
    moe_block.register_sonic_moe()
    rows = moe_block.run_case(TINY, ["grouped_mm", "sonic_moe"], repeats=1, dtype=torch.float32)
    assert [row["impl"] for row in rows] == ["grouped_mm", "sonic_moe"]
    assert rows[1]["err_out"] <= 1e-5 and rows[1]["err_grads"] <= 1e-5


def test_sonic_moe_without_its_packages_fails_naming_the_staging_script(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "sonicmoe", None)  # import fails, as where it is not installed
    moe_block.register_sonic_moe()
    assert [row["impl"] for row in moe_block.run_case(TINY, ["sonic_moe"], 1, torch.float32)] == []
    assert "benchmarks/sonic_moe/stage.sh" in caplog.text
