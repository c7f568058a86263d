"""Training data: local files or folders, checked record by record so a bad row is named before training starts."""

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
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
    files = _data_files(path, flag) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"{flag} {path} holds no .jsonl, .json or .parquet files.")
    parts = [_load_file(file, flag) for file in files]
    kinds = {record_kind(part[0]) for part in parts if len(part)}
    if len(kinds) > 1:
        raise ConfigError(
            f"{flag} {path} mixes conversational (`messages`) and prompt/completion files; use one kind."
        )
    columns = _shared_columns(parts)
    return _non_empty(concatenate_datasets([part.select_columns(columns) for part in parts]), path, flag)


def _data_files(folder: Path, flag: str) -> list[Path]:
    """The folder's data files; the others are named in the log, so a file in the wrong format is not lost silently."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    skipped = [str(p.relative_to(folder)) for p in files if p.suffix not in FILE_LOADERS]
    if skipped:
        logger.warning(
            "%s %s: skipping %d file(s) that are not .jsonl, .json or .parquet: %s.",
            flag, folder, len(skipped), ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else ""),
        )
    return [p for p in files if p.suffix in FILE_LOADERS]


def _load_file(file: Path, flag: str) -> Dataset:
    loader = FILE_LOADERS.get(file.suffix)
    if loader is None:
        raise ConfigError(f"{flag} {file}: unsupported file type {file.suffix!r}; use .jsonl, .json or .parquet.")
    if loader == "json":
        records = _read_json_records(file, flag)
        validate_records(records, str(file), flag)  # before Arrow, which fails on mixed types without naming the row
        try:
            return Dataset.from_list(records)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise ConfigError(f"{flag} {file}: the records do not share one schema ({error}).") from None
    try:
        dataset = Dataset.from_parquet(str(file))
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise ConfigError(f"{flag} {file} is not a readable Parquet file: {error}") from None
    validate_records(dataset, str(file), flag)
    return dataset


def _read_json_records(file: Path, flag: str) -> list[dict]:
    """JSON Lines, or one JSON array of records; a broken line is reported with its number."""
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            f"{flag} {file}, line {line}: byte 0x{raw[error.start]:02x} is not UTF-8. "
            "Save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None
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
    empty_answers = []
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
        if _has_empty_answer(record):
            empty_answers.append(row)
    if empty_answers:
        logger.warning(
            "%s %s, row(s) %s: an assistant message is empty, so those examples teach the model to answer "
            "with nothing but end-of-turn. Fill in or drop them if that is not intended.",
            flag, source, ", ".join(map(str, empty_answers[:10])) + (f" and {len(empty_answers) - 10} more"
                                                               if len(empty_answers) > 10 else ""),
        )


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
        content = message["content"]
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            got = "null" if content is None else f"a {type(content).__name__}"
            raise ConfigError(
                f"{where}, message {turn}: `content` is {got}; the chat template needs a string (\"\" for none)."
            )


def _validate_prompt_completion(record: dict, where: str) -> None:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):
        _validate_turns(prompt, f"{where}, `prompt`")
        _validate_messages(completion, f"{where}, `completion`")
    elif not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise ConfigError(f"{where}: `prompt` and `completion` must be strings, and the completion non-empty.")


def _has_empty_answer(record: dict) -> bool:
    turns = record.get("messages") or (record["completion"] if isinstance(record.get("completion"), list) else [])
    return any(m["role"] == "assistant" and m["content"] == "" and not m.get("tool_calls") for m in turns)


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
