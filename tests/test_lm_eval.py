"""``leanft eval lm_eval=TASK``: lm-eval's harness on a run folder, checked against log-likelihoods computed here."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import run_args

from leanft.cli import main
from leanft.run.rundir import load_run

QUESTIONS = [
    {"question": f"Add one to {i}.", "choices": [str(i + 1), str(i + 2), str(i)], "label": i % 3} for i in range(12)
]


@pytest.fixture
def task_folder(tmp_path):
    """A multiple-choice lm-eval task whose data is a local JSONL file."""
    data = tmp_path / "choice.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return folder


def choice_logprob(model, tokenizer, context: str, choice: str) -> float:
    """log p(" " + choice | context), tokenized as lm-eval does: the whole text, minus the context's tokens."""
    whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return float(sum(logits[i - 1, whole[i]] for i in range(start, len(whole))))


def test_an_lm_eval_task_on_a_run_folder_scores_as_its_log_likelihoods_say(model_dir, data_file, tmp_path, task_folder,
                                                                           capsys):
    run_dir = tmp_path / "run"
    assert main(run_args(model_dir, data_file, run_dir, "max_steps=2", "lr=0.05", "bf16=false")) == 0  # exact sums
    capsys.readouterr()
    assert main(["eval", str(run_dir), "lm_eval=tiny_choice", f"lm_eval_include={task_folder}"]) == 0
    reported = json.loads(capsys.readouterr().out)["lm_eval"]["tiny_choice"]

    model, tokenizer, _ = load_run(run_dir)
    model.eval()
    right = [
        max(range(3), key=lambda c: choice_logprob(model, tokenizer, q["question"], q["choices"][c])) == q["label"]
        for q in QUESTIONS
    ]
    assert 0 < sum(right) < len(right)  # a score that tells right from wrong choices
    assert reported["acc,none"] == pytest.approx(sum(right) / len(right))


@pytest.mark.parametrize(("keys", "message"), [
    (["lm_eval=no_such_task"], "lm-eval has no task 'no_such_task'"),
    (["lm_eval=arc_easy"], "the data of lm-eval task arc_easy cannot be reached"),
    (["lm_eval="], "lm_eval= names no task"),
])  # fmt: skip
def test_lm_eval_problems_end_in_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, keys, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", "model=no/such-model", *keys]) == 2  # the model would fail to load: it is never tried
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and message in error
