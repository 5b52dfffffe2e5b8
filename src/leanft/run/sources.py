"""Where training records come from: JSONL read here, other files and datasets through Hugging Face ``datasets``.

``data=`` and ``eval_data=`` take a JSONL file (errors name ``file:line``), a ``.json``, ``.parquet`` or ``.csv``
file, a folder written by ``save_to_disk``, or a hub dataset id. ``columns=`` maps leanft's record fields to a
dataset's own column names. With ``streaming=true`` rows are read while training consumes them, so the data
never has to fit in memory. A record is ``{"instruction", "input" (optional), "output"}`` or ``{"messages"}``.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from leanft.core.errors import LeanftError
from leanft.run.config import FIELDS, TrainConfig, parse_columns
from leanft.run.hub import is_hub_id
from leanft.run.tasks import builtin_task

logger = logging.getLogger(__name__)

Record = dict
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SHUFFLE_BUFFER = 1000  # rows a stream shuffles among (datasets' buffer shuffle)


def validate_record(record: object) -> str | None:
    """Return what is wrong with a record (one short phrase), or ``None`` when it is usable."""
    if not isinstance(record, dict):
        return "expected a JSON object"
    if "messages" in record:
        return _chat_problem(record["messages"])
    for key in ("instruction", "output"):
        if key not in record:
            return f'missing "{key}" (or give "messages")'
    for key in ("instruction", "input", "output"):
        if key in record and not isinstance(record[key], str):
            return f'"{key}" must be a string'
    return None


def _chat_problem(messages: object) -> str | None:
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list'
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not all(isinstance(message.get(key), str) for key in ("role", "content")):
            return f'messages[{i}] needs string "role" and "content"'
    roles = [message["role"] for message in messages]
    if "assistant" not in roles:
        return "no assistant message to learn from"
    if roles[0] == "assistant":
        return "the first message must not be from the assistant"
    return None


def as_record(row: dict, columns: dict[str, str]) -> Record:
    """leanft's fields of a dataset row: mapped columns first, else the fields under their own names (nulls dropped)."""
    record = {field: row.get(columns.get(field, field)) for field in FIELDS}
    return {field: value for field, value in record.items() if value is not None}


def check_columns(found: Iterable[str] | None, columns: dict[str, str], where: str) -> None:
    """One line naming the columns found when the mapped or the default columns are not there."""
    if found is None:  # a stream whose schema is only known from its rows
        return
    found = list(found)
    absent = [column for column in columns.values() if column not in found]
    if not absent and columns.get("messages", "messages") not in found:
        absent = [columns.get(f, f) for f in ("instruction", "output") if columns.get(f, f) not in found]
    if absent:
        raise LeanftError(f"{where}: no column {', '.join(map(repr, absent))}; columns found: {', '.join(found)} "
                          "(map them with columns=instruction:COLUMN,output:COLUMN or columns=messages:COLUMN)")


def checked_records(rows: Iterable[dict], columns: dict[str, str], where: str) -> Iterator[Record]:
    """Rows as validated records; a bad row raises one line naming ``where`` and the row number."""
    for number, row in enumerate(rows):
        record = as_record(row, columns)
        problem = validate_record(record)
        if problem:
            raise LeanftError(f"{where} row {number}: {problem}")
        yield record


def read_jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, JSON object) of each non-blank line of a JSONL file; a bad line raises one line naming it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise LeanftError(f"{path} is not UTF-8 text (byte {error.start}): save it as UTF-8") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise LeanftError(f"{path.name}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise LeanftError(f"{path.name}:{number}: expected a JSON object")
        rows.append((number, row))
    return rows


def load_jsonl_examples(path: str | Path, columns: dict[str, str] | None = None) -> list[Record]:
    """Read and validate a JSONL file of instruction or chat records; errors name ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise LeanftError(f"data file {path} does not exist: check the path")
    rows = read_jsonl_rows(path)
    if not rows:
        raise LeanftError(f"{path} holds no examples: add one JSON object per line")
    records = []
    for number, row in rows:  # the file's own line numbers, blank lines counted
        record = as_record(row, columns or {})
        problem = validate_record(record)
        if problem:
            raise LeanftError(f"{path.name}:{number}: {problem}")
        records.append(record)
    return records


def open_dataset(source: str, split: str, streaming: bool = False):
    """``source`` as a ``datasets`` Dataset (an IterableDataset when ``streaming``), or one line saying why not."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source)
    if path.is_dir():
        if not any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json")):
            raise LeanftError(f"{path} is a folder but not a dataset saved with save_to_disk: pass a file or such "
                              "a folder")
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise LeanftError(f"{path} has no split {split!r} (its splits: {', '.join(loaded)}): set data_split "
                                  "or eval_split")
            loaded = loaded[split]
        return loaded.to_iterable_dataset() if streaming else loaded
    if path.suffix in FILE_FORMATS or path.is_file():
        if not path.is_file():
            raise LeanftError(f"data file {path} does not exist: check the path")
        if path.suffix not in FILE_FORMATS:
            raise LeanftError(f"{path}: unknown data format {path.suffix!r}: use {', '.join(FILE_FORMATS)} or a "
                              "save_to_disk folder")
        typed = {"features": csv_as_text(path)} if path.suffix == ".csv" else {}
        return _load(source, FILE_FORMATS[path.suffix], "train", streaming, data_files=str(path), **typed)
    if not is_hub_id(source):
        raise LeanftError(f"data {source} does not exist: pass a {', '.join(FILE_FORMATS)} file, a save_to_disk "
                          "folder or a hub dataset id")
    return _load(source, source, split, streaming)


def csv_as_text(path: Path):
    """Every column of a CSV file as text, so that a numeric answer column stays the answer's text."""
    import datasets

    with path.open(encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


def _load(source: str, builder: str, split: str, streaming: bool, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(builder, split=split, streaming=streaming, **kwargs)
    except Exception as error:  # the library raises many kinds; the user needs the first line of any of them
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        hint = "" if Path(source).exists() else (" (no such file or folder here; a hub dataset needs the network: "
                                                 "save it with save_to_disk where the hub is reachable)")
        raise LeanftError(f"could not read {source}: {first_line}{hint}") from None


def located_rows(source: str, split: str) -> list[tuple[str, dict]]:
    """(where, row) of every row of ``source``: ``file:line`` for JSONL (read here), ``source row N`` otherwise."""
    if Path(source).suffix == ".jsonl":
        path = Path(source)
        if not path.is_file():
            raise LeanftError(f"data file {path} does not exist: check the path")
        rows = [(f"{path.name}:{number}", row) for number, row in read_jsonl_rows(path)]
    else:
        rows = [(f"{source} row {number}", dict(row)) for number, row in enumerate(open_dataset(source, split))]
    if not rows:
        raise LeanftError(f"{source} holds no examples: add at least one record")
    return rows


def read_records(source: str, split: str, columns: dict[str, str]) -> list[Record]:
    """Every record of ``source`` (a JSONL file read here, anything else through ``datasets``)."""
    if Path(source).suffix == ".jsonl":
        return load_jsonl_examples(source, columns)
    dataset = open_dataset(source, split)
    check_columns(dataset.column_names, columns, source)
    records = list(checked_records(dataset, columns, source))
    if not records:
        raise LeanftError(f"{source} holds no examples")
    return records


class RecordStream:
    """Training records read lazily from a dataset: shuffled within a buffer (seeded), epoch after epoch."""

    def __init__(self, dataset, columns: dict[str, str], where: str, seed: int, skip: int = 0) -> None:
        self.dataset = dataset.skip(skip).shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
        self.columns, self.where = columns, where

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new pass over the data (the Trainer calls this each epoch)."""
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[Record]:
        return checked_records(self.dataset, self.columns, self.where)


def held_out_records(config: TrainConfig, columns: dict[str, str]) -> list[Record] | None:
    """Records of ``eval_data`` or of the ``eval_split`` of ``data``, at most ``num_eval``; None when neither is set."""
    if config.eval_data is None and config.eval_split is None:
        return None
    source = config.eval_data if config.eval_data is not None else config.data
    held_out = read_records(source, config.eval_split or config.data_split, columns)
    if len(held_out) < config.num_eval:
        logger.warning("%s holds %d examples, fewer than num_eval=%d: evaluating on all of them",
                       source, len(held_out), config.num_eval)
    return held_out[: config.num_eval]


def load_records(config: TrainConfig) -> tuple[list[Record] | RecordStream, list[Record]]:
    """(training records, held-out records) from a built-in task, files or datasets; a stream when ``streaming``."""
    task = builtin_task(config.data)
    if task is not None:
        return task.generate(config.seed, config.num_train, config.num_eval)
    columns = parse_columns(config.columns)
    if config.streaming:
        return stream_records(config, columns)
    records = read_records(config.data, config.data_split, columns)
    held_out = held_out_records(config, columns)
    if held_out is not None:
        return records, held_out
    return split_off_held_out(records, config)


def split_off_held_out(records: list[Record], config: TrainConfig) -> tuple[list[Record], list[Record]]:
    """(training, held-out) records of ``data`` when no held-out data is given: 5% (at most ``num_eval``), drawn
    with the run's seed."""
    if len(records) < 2:
        raise LeanftError(f"{config.data} has {len(records)} example: a held-out split needs at least 2")
    held = max(1, min(config.num_eval, len(records) // 20))
    if held < config.num_eval:
        logger.warning("held out %d of %d examples (5%%), fewer than num_eval=%d: pass eval_data=... for more",
                       held, len(records), config.num_eval)
    chosen = set(random.Random(config.seed).sample(range(len(records)), held))  # drawn with the run's seed
    return ([r for i, r in enumerate(records) if i not in chosen], [r for i, r in enumerate(records) if i in chosen])


def stream_records(config: TrainConfig, columns: dict[str, str]) -> tuple[RecordStream, list[Record]]:
    """A training stream and its held-out records (``eval_data``/``eval_split``, else the first ``num_eval``)."""
    dataset = open_dataset(config.data, config.data_split, streaming=True)
    check_columns(dataset.column_names, columns, config.data)
    held_out = held_out_records(config, columns)
    skip = 0
    if held_out is None:
        held_out = list(islice(checked_records(dataset, columns, config.data), config.num_eval))
        skip = len(held_out)
        logger.info("streaming: the first %d examples of %s are held out", skip, config.data)
    stream = RecordStream(dataset, columns, config.data, config.seed, skip)
    if next(iter(stream), None) is None:
        raise LeanftError(f"{config.data} holds no examples to train on after the {skip} held out")
    return stream, held_out
