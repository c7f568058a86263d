"""Training data: local files or folders, checked record by record so a bad row is named before training starts."""

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path

from datasets import Dataset, concatenate_datasets, load_from_disk

from turbo_tune.errors import ConfigError

logger = logging.getLogger(__name__)

FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ROLES = {"system", "user", "assistant", "tool"}


def load_sft_dataset(data_path: str, flag: str = "--data_path") -> Dataset:
    """A file, a folder of files, or a `save_to_disk` folder, as one validated dataset; errors name `flag`."""
    path = Path(data_path)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        dataset = load_from_disk(str(path))
        if not isinstance(dataset, Dataset):
            if "train" not in dataset:
                raise ConfigError(f"{flag} {path} is a DatasetDict without a 'train' split: save one split.")
            dataset = dataset["train"]
        validate_records(dataset, str(path), flag)
        return _non_empty(dataset, path, flag)
    files = sorted(p for p in path.rglob("*") if p.suffix in FILE_LOADERS) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"{flag} {path} holds no .jsonl, .json or .parquet files.")
    parts = []
    for file in files:
        part = _load_file(file, flag)
        validate_records(part, str(file), flag)
        parts.append(part)
    kinds = {record_kind(part[0]) for part in parts if len(part)}
    if len(kinds) > 1:
        raise ConfigError(
            f"{flag} {path} mixes conversational (`messages`) and prompt/completion files; use one kind."
        )
    columns = _shared_columns(parts)
    return _non_empty(concatenate_datasets([part.select_columns(columns) for part in parts]), path, flag)


def _load_file(file: Path, flag: str) -> Dataset:
    loader = FILE_LOADERS.get(file.suffix)
    if loader is None:
        raise ConfigError(f"{flag} {file}: unsupported file type {file.suffix!r}; use .jsonl, .json or .parquet.")
    if loader == "json":
        return Dataset.from_list(_read_json_records(file, flag))
    try:
        return Dataset.from_parquet(str(file))
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise ConfigError(f"{flag} {file} is not a readable Parquet file: {error}") from None


def _read_json_records(file: Path, flag: str) -> list[dict]:
    """JSON Lines, or one JSON array of records; a broken line is reported with its number."""
    text = file.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{flag} {file} is not valid JSON: {error.msg} at line {error.lineno}.") from None
    else:
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ConfigError(
                    f"{flag} {file}, line {line_number}: not valid JSON ({error.msg}). Fix or remove that line."
                ) from None
    for row, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise ConfigError(f"{flag} {file}, row {row}: expected a JSON object, got {type(record).__name__}.")
    return records


def record_kind(record: dict) -> str:
    """Rows of a dataset share one schema, so a field a record lacks reads as None."""
    if record.get("messages") is not None:
        return "conversational"
    if record.get("prompt") is not None and record.get("completion") is not None:
        return "prompt-completion"
    return "unknown"


def validate_records(records: Iterable[dict], source: str, flag: str = "--data_path") -> None:
    for row, record in enumerate(records, start=1):
        kind = record_kind(record)
        where = f"{flag} {source}, row {row}"
        if kind == "unknown":
            fields = ", ".join(sorted(key for key, value in record.items() if value is not None)) or "no fields"
            raise ConfigError(
                f"{where}: the record has neither `messages` nor `prompt` and `completion` (it has: {fields}). "
                "Give each record one of those formats."
            )
        if kind == "conversational":
            _validate_messages(record["messages"], where)
        else:
            _validate_prompt_completion(record, where)


def _validate_messages(messages: object, where: str) -> None:
    _validate_turns(messages, where)
    if not any(message["role"] == "assistant" for message in messages):
        raise ConfigError(f"{where}: no assistant message, so there is nothing to learn from this conversation.")


def _validate_turns(messages: object, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: expected a non-empty list of {{role, content}} messages.")
    for turn, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ConfigError(f"{where}, message {turn}: each message needs `role` and `content`.")
        if message["role"] not in ROLES:
            raise ConfigError(
                f"{where}, message {turn}: unknown role {message['role']!r}; use one of {', '.join(sorted(ROLES))}."
            )


def _validate_prompt_completion(record: dict, where: str) -> None:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):
        _validate_turns(prompt, f"{where}, `prompt`")
        _validate_messages(completion, f"{where}, `completion`")
    elif not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise ConfigError(f"{where}: `prompt` and `completion` must be strings, and the completion non-empty.")


def _shared_columns(parts: list[Dataset]) -> list[str]:
    columns = [c for c in parts[0].column_names if all(c in part.column_names for part in parts)]
    return [c for c in columns if c in ("messages", "prompt", "completion", "tools")] or columns


def _non_empty(dataset: Dataset, path: Path, flag: str) -> Dataset:
    if len(dataset) == 0:
        raise ConfigError(f"{flag} {path} holds no records: add examples.")
    logger.info("Loaded %d %s records from %s.", len(dataset), record_kind(dataset[0]), path)
    return dataset


def hold_out(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, held-out): a seeded random `fraction` of the rows (at least one) set aside, so it is never trained on."""
    held_out = math.ceil(fraction * len(dataset))
    if held_out >= len(dataset):
        raise ConfigError(
            f"--eval_split {fraction} of {len(dataset)} examples leaves none to train on; use a smaller fraction."
        )
    split = dataset.train_test_split(test_size=held_out, seed=seed, shuffle=True)
    logger.info("Held out %d of %d examples for evaluation (--eval_split %g).", held_out, len(dataset), fraction)
    return split["train"], split["test"]
