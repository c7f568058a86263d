"""The loss sees only what the model should learn to say: assistant turns (or completions), unless told otherwise."""

import json

import pytest
from datasets import Dataset

from monkey_patch.sft_trainer import TurboSFTTrainer
from turbo_tune.arguments import parse_config
from turbo_tune.data import record_kind
from turbo_tune.errors import ConfigError
from turbo_tune.modeling import load_model, load_tokenizer
from turbo_tune.toy_task import bundled_dataset


def prepared_rows(tmp_path, dataset: Dataset, *flags: str) -> tuple[list[dict], object]:
    config = parse_config(["--output_dir", str(tmp_path), "--report_to", "none", "--eval_split", "0", *flags])
    config.assistant_only_loss = not config.train_on_all_tokens and record_kind(dataset[0]) == "conversational"
    tokenizer = load_tokenizer(config)
    trainer = TurboSFTTrainer(
        model=load_model(config), args=config, train_dataset=dataset, processing_class=tokenizer
    )
    return list(trainer.train_dataset), tokenizer


def supervised_text(row: dict, tokenizer) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])


def test_only_assistant_tokens_and_end_of_turn_are_supervised(tmp_path):
    dataset = bundled_dataset(8, seed=5)
    rows, tokenizer = prepared_rows(tmp_path, dataset)
    for row, example in zip(rows, dataset, strict=True):
        answer = example["messages"][-1]["content"]
        assert supervised_text(row, tokenizer) == answer + "<|im_end|>"
        supervised = [label for label in row["labels"] if label != -100]
        assert supervised == [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]


def test_every_assistant_turn_of_a_multi_turn_chat_is_supervised(tmp_path):
    chat = {
        "messages": [
            {"role": "user", "content": "reverse: a b"},
            {"role": "assistant", "content": "b a"},
            {"role": "user", "content": "upper: c"},
            {"role": "assistant", "content": "C"},
        ]
    }
    (row,), tokenizer = prepared_rows(tmp_path, Dataset.from_list([chat]))
    assert supervised_text(row, tokenizer) == "b a<|im_end|>C<|im_end|>"


def test_prompt_completion_supervises_completion_only(tmp_path):
    dataset = Dataset.from_list([{"prompt": "upper: a b", "completion": " A B"}])
    (row,), tokenizer = prepared_rows(tmp_path, dataset)
    assert supervised_text(row, tokenizer) == " A B<|im_end|>"


@pytest.mark.parametrize("make_dataset", [
    lambda: bundled_dataset(4, seed=2),
    lambda: Dataset.from_list([{"prompt": "upper: a b", "completion": " A B"}]),
])
def test_train_on_all_tokens_supervises_everything(tmp_path, make_dataset):
    rows, _ = prepared_rows(tmp_path, make_dataset(), "--train_on_all_tokens")
    for row in rows:
        assert row["labels"] == row["input_ids"]


def test_truncation_is_counted_and_logged(tmp_path, caplog):
    caplog.set_level("WARNING", logger="monkey_patch.sft_trainer")
    rows, _ = prepared_rows(tmp_path, bundled_dataset(16, seed=4), "--max_length", "36")
    assert all(len(row["input_ids"]) <= 36 for row in rows)
    assert any("longer than max_length=36 tokens" in r.message and "are truncated." in r.message
               for r in caplog.records)


def long_prompt_chats(count: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": "upper: " + "a " * 60},
                          {"role": "assistant", "content": "A"}]}] * count


def test_examples_whose_prompt_fills_max_length_are_counted_as_dropped(tmp_path, caplog):
    caplog.set_level("WARNING", logger="monkey_patch.sft_trainer")
    rows, _ = prepared_rows(tmp_path, Dataset.from_list(long_prompt_chats(3) + list(bundled_dataset(2, seed=1))),
                            "--max_length", "36")
    assert len(rows) == 2
    assert any("5 of 5 examples are longer than max_length=36 tokens" in r.message
               and "2 are truncated and 3 dropped, since no trained token is left in them" in r.message
               for r in caplog.records)


def test_nothing_left_after_truncation_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--max_length 36: every example .* nothing is left to train on"):
        prepared_rows(tmp_path, Dataset.from_list(long_prompt_chats(4)), "--max_length", "36")


def test_nothing_left_after_truncation_stops_the_run_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import qwen3_sft

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(chat) + "\n" for chat in long_prompt_chats(4)))
    monkeypatch.setattr(qwen3_sft, "load_model", lambda config: pytest.fail("the model loaded before the refusal"))
    assert qwen3_sft.main(["--output_dir", str(tmp_path / "out"), "--data_path", str(data), "--max_length", "36",
                           "--report_to", "none"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qwen3_sft.py: error:")]
    assert len(errors) == 1 and "--max_length 36: every example of the train set is longer" in errors[0]
    assert not (tmp_path / "out").exists()
