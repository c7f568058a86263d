"""Expert-load metrics from the routers' own top-k choices: values, padding, warning, and compiled layers."""

import logging
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoConfig, AutoModelForCausalLM

from monkey_patch.torch_compile import compile_decoder_layers, compile_fell_back
from turbo_tune.arguments import TurboTuneConfig
from turbo_tune.modeling import EMBEDDED_MODEL_DIR
from turbo_tune.moe_health import ExpertLoadMonitor, expert_load_metrics

EXPERTS, TOP_K = 8, 2  # the embedded tiny model's


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(EMBEDDED_MODEL_DIR)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def batch(rows: int = 4, length: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    tokens = torch.randint(3, 370, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}


def favour_expert_zero(router: torch.nn.Module, args: tuple, output: tuple) -> tuple:
    """A router bias: +100 on expert 0's logit, so it is in every token's top-k."""
    logits = output[0].clone()
    logits[:, 0] += 100.0
    weights, indices = logits.softmax(dim=-1, dtype=torch.float).topk(router.top_k, dim=-1)
    return logits, (weights / weights.sum(dim=-1, keepdim=True)).to(logits.dtype), indices


def test_one_expert_taking_every_token_shows_in_its_layer_alone_and_warns_once(caplog):
    model = tiny_model()
    model.model.layers[1].mlp.gate.register_forward_hook(favour_expert_zero)
    monitor = ExpertLoadMonitor(model, warn_ratio=3.0)
    with caplog.at_level(logging.WARNING, logger="turbo_tune.moe_health"):
        for step in (1, 2):
            with monitor.counting(None):
                model(**batch(seed=step))
            metrics = monitor.pop_metrics(step)
    # expert 0 holds one of the k picks of every token: share 1/k, so max/mean = (1/k) / (1/E) = E/k
    assert metrics["moe_load_max_over_mean/layer_1"] == EXPERTS / TOP_K
    assert metrics["moe_load_max_over_mean/layer_0"] < 2.0  # the untouched layer stays near balanced
    assert metrics["moe_router_entropy/layer_0"] > 0.9 > metrics["moe_router_entropy/layer_1"]
    assert metrics["moe_load_max_over_mean"] == EXPERTS / TOP_K
    assert metrics["moe_router_entropy"] == metrics["moe_router_entropy/layer_1"]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "layer(s) 1 " in warning and "4.00 times" in warning and "--moe_load_warn_ratio 3" in warning


def test_metrics_of_even_and_collapsed_counts():
    even = np.full((1, EXPERTS), 10.0)
    collapsed = np.zeros((1, EXPERTS))
    collapsed[0, :TOP_K] = 10.0  # the same k experts for every token
    assert expert_load_metrics(even, [0]) == pytest.approx({
        "moe_load_max_over_mean/layer_0": 1.0, "moe_router_entropy/layer_0": 1.0,
        "moe_load_max_over_mean": 1.0, "moe_router_entropy": 1.0})
    metrics = expert_load_metrics(collapsed, [5])
    assert metrics["moe_load_max_over_mean/layer_5"] == EXPERTS / TOP_K
    assert metrics["moe_router_entropy/layer_5"] == pytest.approx(np.log(TOP_K) / np.log(EXPERTS))
    assert expert_load_metrics(np.zeros((1, EXPERTS)), [0]) == {}


def test_padding_is_not_counted_and_forwards_outside_training_are_not_either():
    model = tiny_model()
    monitor = ExpertLoadMonitor(model, warn_ratio=0)
    inputs = batch(rows=2, length=10)
    inputs["attention_mask"][1, 4:] = 0  # 10 + 4 real tokens
    model(**inputs)  # not counted: an evaluation or a recompute
    with monitor.counting(inputs["attention_mask"]):
        model(**inputs)
    assert monitor.device_counts.sum(dim=1).tolist() == [14 * TOP_K] * 2


def test_compiled_checkpointed_layers_count_each_token_once_like_eager_layers():
    """Under --torch_compile the hook is replayed after the compiled layer, so it costs no recompile; gradient
    checkpointing's recompute in backward runs the routers again and must not count. (With --use_fast_moe_block
    too: test_compile_liger.py's compiled ScatterMoE run logs these metrics.)"""

    def train_step(compiled: bool, monitored: bool) -> tuple[torch.Tensor | None, int]:
        torch._dynamo.reset()
        counters.clear()
        model = tiny_model()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        if compiled:
            compile_decoder_layers(model, TurboTuneConfig(output_dir="unused", report_to="none",
                                                          torch_compile_backend="aot_eager"))
        monitor = ExpertLoadMonitor(model, warn_ratio=0) if monitored else None
        for seed in (0, 1):
            inputs = batch(rows=2, length=16, seed=seed)
            with monitor.counting(inputs["attention_mask"]) if monitor else nullcontext():  # the trainer's forward
                loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
        assert not compile_fell_back(model)
        return monitor.device_counts if monitor else None, counters["stats"]["unique_graphs"]

    eager, _ = train_step(compiled=False, monitored=True)
    _, graphs_unmonitored = train_step(compiled=True, monitored=False)
    compiled, graphs = train_step(compiled=True, monitored=True)
    assert graphs == graphs_unmonitored
    assert compiled.sum(dim=1).tolist() == [2 * 32 * TOP_K] * 2
    assert torch.equal(compiled[0], eager[0])  # same router input in layer 0; layer 1 may flip a near tie
    assert (compiled[1] - eager[1]).abs().sum() <= 2
