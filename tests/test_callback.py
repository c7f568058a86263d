"""The efficiency callback's arithmetic: FLOPs per token, real sequence lengths, and windowed metrics."""

import gc

import pytest
import torch
from transformers import Qwen3MoeConfig, TrainerState

from callback import EfficiencyCallback, ModelFlops, token_counts

QWEN3_30B_A3B = Qwen3MoeConfig(
    vocab_size=151936, hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
)


def test_qwen3_30b_a3b_counts_about_3b_active_parameters():
    flops = ModelFlops.from_config(QWEN3_30B_A3B)
    active = flops.flops_per_token / 6
    # Qwen reports 3.3B activated parameters including the input embedding (0.31B), which costs no matmul.
    assert active == pytest.approx(3.3e9 - 151936 * 2048, rel=0.03)
    assert flops.attention_flops_per_token_pair == 12 * 48 * 32 * 128


def test_attention_flops_grow_with_squared_sequence_length():
    flops = ModelFlops.from_config(QWEN3_30B_A3B)
    one_long = flops.flops(tokens=4096, sum_squared_lengths=4096**2)
    many_short = flops.flops(tokens=4096, sum_squared_lengths=16 * 256**2)
    assert one_long - many_short == pytest.approx(flops.attention_flops_per_token_pair * (4096**2 - 16 * 256**2))


def test_token_counts_ignore_padding_and_split_packed_rows():
    padded = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    assert token_counts(padded).tolist() == [5, 3**2 + 2**2]
    packed = {"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])}
    assert token_counts(packed).tolist() == [9, 3**2 + 2**2 + 4**2]


def test_counting_a_micro_batch_reads_nothing_back_to_the_host(monkeypatch):
    """Reading a count back would make the host wait for the GPU before every forward."""
    callback = EfficiencyCallback(ModelFlops(flops_per_token=1e9, attention_flops_per_token_pair=0.0))

    def read_back(*args, **kwargs):
        raise AssertionError("a device value was read back to the host")

    for name in ("item", "tolist", "__int__", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    callback.observe_batch({"position_ids": torch.tensor([[0, 1, 2, 0, 1]])})
    callback.observe_batch({"attention_mask": torch.ones(2, 3, dtype=torch.long)})
    monkeypatch.undo()
    assert callback.window_counts.tolist() == [11, 3**2 + 2**2 + 2 * 3**2]


def test_window_metrics_count_tokens_steps_and_remaining_time():
    callback = EfficiencyCallback(ModelFlops(flops_per_token=1e9, attention_flops_per_token_pair=0.0), 100.0)
    callback.observe_batch({"attention_mask": torch.ones(2, 50, dtype=torch.long)})
    callback.observe_batch({"attention_mask": torch.ones(2, 50, dtype=torch.long)})
    callback.on_step_end(None, None, None)
    state = TrainerState(max_steps=10, global_step=4)
    metrics = callback.pop_metrics(state)
    elapsed = 200 / metrics["tokens_per_s"]
    assert metrics["step_time_s"] == pytest.approx(elapsed)
    assert metrics["tflops_per_device"] == pytest.approx(200 * 1e9 / elapsed / 1e12)
    assert metrics["mfu"] == pytest.approx(metrics["tflops_per_device"] / 100.0)
    assert metrics["eta_s"] == pytest.approx(6 * metrics["step_time_s"])
    assert metrics["peak_rss_gib"] > 0
    assert callback.window_counts is None and callback.window_steps == 0


def test_time_in_python_garbage_collection_is_reported_per_step_while_training():
    callback = EfficiencyCallback(ModelFlops(flops_per_token=1e9, attention_flops_per_token_pair=0.0))
    callback.on_train_begin(None, None, None)
    for _ in range(2):
        cycles = [[] for _ in range(20000)]
        for item in cycles:
            item.append(item)  # reference cycles: only the collector frees them
        del cycles
        gc.collect()
        callback.on_step_end(None, None, None)
    collected = callback.pop_metrics(TrainerState(max_steps=10, global_step=2))["gc_s_per_step"]
    callback.on_train_end(None, None, None)
    gc.collect()
    assert collected > 0
    assert callback.gc_timer.seconds == pytest.approx(collected * 2)  # collections after training are not counted


def test_trainer_flops_match_transformers_and_count_the_parameters_once(tmp_path, monkeypatch):
    from transformers import Trainer

    from monkey_patch.sft_trainer import TurboSFTTrainer
    from turbo_tune.arguments import parse_config
    from turbo_tune.modeling import load_model, load_tokenizer
    from turbo_tune.toy_task import bundled_dataset

    config = parse_config(["--output_dir", str(tmp_path), "--report_to", "none", "--eval_split", "0"])
    trainer = TurboSFTTrainer(model=load_model(config), args=config, train_dataset=bundled_dataset(4, seed=0),
                              processing_class=load_tokenizer(config))
    counts = []
    count_parameters = type(trainer.model).num_parameters
    monkeypatch.setattr(type(trainer.model), "num_parameters",
                        lambda model, **kwargs: counts.append(kwargs) or count_parameters(model, **kwargs))
    batches = [{"input_ids": torch.zeros(shape, dtype=torch.long)} for shape in ((2, 37), (1, 501))]
    ours = [trainer.floating_point_ops(batch) for batch in batches]
    assert len(counts) == 1
    assert ours == [Trainer.floating_point_ops(trainer, batch) for batch in batches]
    assert ours[0] == 6 * 74 * count_parameters(trainer.model, exclude_embeddings=True) > 0
