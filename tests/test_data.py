"""Data loading: every supported layout loads, and each bad record is reported by file and row."""

import json
import logging

import pytest
from datasets import Dataset

from turbo_tune.data import hold_out, load_sft_dataset
from turbo_tune.errors import ConfigError
from turbo_tune.toy_task import PUZZLES, bundled_dataset

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
PROMPT_COMPLETION = {"prompt": "2+2=", "completion": "4"}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_json_and_parquet_load(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [CHAT, CHAT])
    (tmp_path / "b.json").write_text(json.dumps([CHAT]))
    Dataset.from_list([CHAT]).to_parquet(str(tmp_path / "c.parquet"))
    assert len(load_sft_dataset(str(tmp_path / "a.jsonl"))) == 2
    assert len(load_sft_dataset(str(tmp_path / "b.json"))) == 1
    assert len(load_sft_dataset(str(tmp_path / "c.parquet"))) == 1
    assert len(load_sft_dataset(str(tmp_path))) == 4


def test_save_to_disk_folder_loads(tmp_path):
    Dataset.from_list([PROMPT_COMPLETION] * 3).save_to_disk(str(tmp_path / "saved"))
    dataset = load_sft_dataset(str(tmp_path / "saved"))
    assert dataset[0] == PROMPT_COMPLETION and len(dataset) == 3


def test_record_without_messages_names_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT, CHAT, {"text": "no messages"}])
    with pytest.raises(ConfigError, match=r"train\.jsonl, row 3: .*neither `messages` nor `prompt`"):
        load_sft_dataset(str(path))


def test_unknown_role_names_file_row_and_message(tmp_path):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT, bad])
    with pytest.raises(ConfigError, match=r"train\.jsonl, row 2, message 2: unknown role 'robot'"):
        load_sft_dataset(str(path))


def test_conversation_without_assistant_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ConfigError, match="row 1: no assistant message"):
        load_sft_dataset(str(path))


def test_broken_json_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(CHAT) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"train\.jsonl, line 2: not valid JSON"):
        load_sft_dataset(str(path))


def test_empty_dataset_is_rejected(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="holds no records"):
        load_sft_dataset(str(path))


def test_folder_without_data_files_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="holds no .jsonl, .json or .parquet files"):
        load_sft_dataset(str(tmp_path))


def test_mixed_record_kinds_are_rejected(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [CHAT])
    write_jsonl(tmp_path / "b.jsonl", [PROMPT_COMPLETION])
    with pytest.raises(ConfigError, match="mixes conversational"):
        load_sft_dataset(str(tmp_path))


def test_bundled_task_answers_follow_from_prompts():
    for example in bundled_dataset(50, seed=3):
        _, user, assistant = example["messages"]
        name, items = user["content"].split(": ")
        _, solve = PUZZLES[name]
        assert assistant["content"] == " ".join(solve(items.split(" ")))


def test_bundled_task_is_deterministic():
    assert bundled_dataset(20, seed=1)[:] == bundled_dataset(20, seed=1)[:]


def test_null_content_names_file_row_and_message(tmp_path):
    null = {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]}
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT, null])
    with pytest.raises(ConfigError, match=r"train\.jsonl, row 2, message 1: `content` is null"):
        load_sft_dataset(str(path))


def test_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(CHAT).encode() + b'\n{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(ConfigError, match=r"train\.jsonl, line 2: byte 0xe9 is not UTF-8"):
        load_sft_dataset(str(path))


def test_empty_assistant_message_is_warned_with_file_and_row(tmp_path, caplog):
    empty = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT, CHAT, empty])
    with caplog.at_level(logging.WARNING, logger="turbo_tune.data"):
        assert len(load_sft_dataset(str(path))) == 3
    assert f"{path}, row(s) 3: an assistant message is empty" in caplog.text


def test_skipped_files_of_a_data_folder_are_named(tmp_path, caplog):
    write_jsonl(tmp_path / "a.jsonl", [CHAT])
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "extra.csv").write_text("prompt,completion\n")
    with caplog.at_level(logging.WARNING, logger="turbo_tune.data"):
        assert len(load_sft_dataset(str(tmp_path))) == 1
    assert "skipping 2 file(s) that are not .jsonl, .json or .parquet: extra.csv, notes.txt" in caplog.text


def test_held_out_split_never_overlaps_training_and_is_seeded(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(200)]
    dataset = Dataset.from_list(rows)

    def questions(part: Dataset) -> list[str]:
        return [record["messages"][0]["content"] for record in part]

    train, held_out = hold_out(dataset, 0.05, seed=3)
    assert len(held_out) == 10 and len(train) == 190
    assert not set(questions(train)) & set(questions(held_out))
    assert sorted(questions(train) + questions(held_out)) == sorted(questions(dataset))
    assert questions(held_out) != [f"q{i}" for i in range(190, 200)]  # drawn at random, not the tail
    again_train, again_held_out = hold_out(dataset, 0.05, seed=3)
    assert questions(again_held_out) == questions(held_out) and questions(again_train) == questions(train)
    assert questions(hold_out(dataset, 0.05, seed=4)[1]) != questions(held_out)


def test_held_out_split_that_leaves_nothing_to_train_on_is_refused():
    with pytest.raises(ConfigError, match="--eval_split 0.9 of 2 examples leaves none to train on"):
        hold_out(Dataset.from_list([CHAT, CHAT]), 0.9, seed=0)


def test_eval_data_errors_name_the_eval_flag(tmp_path):
    path = write_jsonl(tmp_path / "eval.jsonl", [CHAT, {"text": "no messages"}])
    with pytest.raises(ConfigError, match=r"^--eval_data_path .*eval\.jsonl, row 2: "):
        load_sft_dataset(str(path), flag="--eval_data_path")
