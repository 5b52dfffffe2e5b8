"""Data sources through Hugging Face ``datasets``: files, save_to_disk folders, hub ids, column mapping, streaming."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from safetensors.torch import load_file
from test_cli import InterruptAt, run_args

from leanft.cli import main
from leanft.core.errors import LeanftError
from leanft.run.config import load_config
from leanft.run.sources import load_records, read_records
from leanft.run.train import train

ROWS = [{"question": f"Add one to {i}.", "answer": str(i + 1), "note": None} for i in range(40)]
MAPPED = [{"instruction": row["question"], "output": row["answer"]} for row in ROWS]
COLUMNS = "columns=instruction:question,output:answer"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """The same 40 question/answer rows as parquet, CSV, JSON, JSONL and a save_to_disk DatasetDict."""
    folder = tmp_path_factory.mktemp("sources")
    table = datasets.Dataset.from_list([{k: v for k, v in row.items() if k != "note"} for row in ROWS])
    table.to_parquet(folder / "rows.parquet")
    table.to_csv(folder / "rows.csv", index=False)
    (folder / "rows.json").write_text(json.dumps(ROWS))
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    datasets.DatasetDict({"train": table, "test": table.select(range(5))}).save_to_disk(folder / "saved")
    return {name: folder / name for name in ("rows.parquet", "rows.csv", "rows.json", "rows.jsonl", "saved")}


def config(source, *keys: str):
    return load_config(None, [f"data={source}", *keys])


@pytest.mark.parametrize("name", ["rows.parquet", "rows.csv", "rows.json", "rows.jsonl", "saved"])
def test_every_source_form_gives_the_same_mapped_records(sources, name):
    assert read_records(str(sources[name]), "train", {"instruction": "question", "output": "answer"}) == MAPPED


def test_a_saved_dataset_dict_gives_its_splits_for_training_and_held_out(sources):
    train_records, held_out = load_records(config(sources["saved"], COLUMNS, "eval_split=test"))
    assert train_records == MAPPED and held_out == MAPPED[:5]
    with pytest.raises(LeanftError, match="no split 'dev' \\(its splits: train, test\\)"):
        load_records(config(sources["saved"], COLUMNS, "eval_split=dev"))


def test_records_already_in_leanft_fields_need_no_mapping(tmp_path):
    path = tmp_path / "chat.parquet"
    chats = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo"}]}
             for i in range(3)]
    datasets.Dataset.from_list(chats).to_parquet(path)
    assert read_records(str(path), "train", {}) == chats


@pytest.mark.parametrize("name", ["rows.parquet", "saved"])
def test_a_missing_column_is_one_line_naming_the_columns_found(sources, tmp_path, capsys, name):
    run_dir = tmp_path / "run"
    assert main(["train", f"data={sources[name]}", f"output_dir={run_dir}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "no column 'instruction', 'output'" in error
    assert "columns found: question, answer" in error
    assert not run_dir.exists()  # refused before the model loads and before the folder exists
    with pytest.raises(LeanftError, match="no column 'prompt'; columns found: question, answer"):
        read_records(str(sources[name]), "train", {"instruction": "prompt", "output": "answer"})


@pytest.mark.parametrize(("keys", "message"), [
    (["columns=instruction=question"], "is not FIELD:COLUMN"),
    (["columns=prompt:question"], "is not FIELD:COLUMN"),
    (["data=builtin:arith", "streaming=true"], "built-in tasks are made in memory"),
    (["data=rows.parquet", "streaming=true", "packing=true"], "packing=true needs the whole dataset"),
])  # fmt: skip
def test_bad_data_keys_are_refused_before_anything_loads(tmp_path, capsys, keys, message):
    assert main(["train", *keys, f"output_dir={tmp_path / 'run'}"]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_an_unreachable_hub_dataset_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert main(["train", "data=someone/no-such-dataset", f"output_dir={tmp_path / 'run'}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "could not read someone/no-such-dataset" in error
    assert "save it with save_to_disk" in error


def test_a_stream_holds_out_its_first_examples_and_trains_on_every_other_one(sources):
    stream, held_out = load_records(config(sources["rows.parquet"], COLUMNS, "streaming=true", "num_eval=4"))
    assert held_out == MAPPED[:4]
    first_pass = list(stream)
    assert sorted(map(json.dumps, first_pass)) == sorted(map(json.dumps, MAPPED[4:]))
    assert first_pass != MAPPED[4:]  # shuffled within the buffer ...
    again, _ = load_records(config(sources["rows.parquet"], COLUMNS, "streaming=true", "num_eval=4"))
    assert list(again) == first_pass  # ... with the run's seed
    stream.set_epoch(1)
    assert list(stream) != first_pass


def test_a_streamed_run_trains_and_resumes_to_the_same_adapter(model_dir, sources, tmp_path):
    """Resume skips the stream's consumed batches, so the adapter equals an uninterrupted streamed run's."""
    keys = (COLUMNS, "streaming=true", "max_steps=12")  # 36 rows at batch 4: a resume inside the second epoch
    data = sources["rows.parquet"]
    assert main(run_args(model_dir, data, tmp_path / "straight", *keys)) == 0
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["data"]["train"] == {"streaming": True} and summary["steps"] == 12
    interrupted = load_config(None, run_args(model_dir, data, tmp_path / "resumed", *keys)[1:])
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, callbacks=[InterruptAt(10)])
    assert main(run_args(model_dir, data, tmp_path / "resumed", *keys, "resume=true")) == 0
    expected = load_file(tmp_path / "straight" / "adapter" / "paca_adapter.safetensors")
    actual = load_file(tmp_path / "resumed" / "adapter" / "paca_adapter.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)



def test_eval_checks_its_data_before_the_model(capsys):
    assert main(["eval", "model=no/such-model", "data=/no/such/rows.parquet"]) == 2
    assert "data file /no/such/rows.parquet does not exist" in capsys.readouterr().err  # not a model error


def test_a_bad_jsonl_record_after_blank_lines_names_its_own_line(tmp_path):
    from leanft.run.sources import load_jsonl_examples

    path = tmp_path / "gaps.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n\n{"instruction": "c"}\n')
    with pytest.raises(LeanftError, match=r"gaps\.jsonl:4: missing \"output\""):
        load_jsonl_examples(path)
