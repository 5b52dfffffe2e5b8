"""Built-in tasks: dates and arith generators, the arith verifier and scorer, data=builtin:NAME end to end."""

from __future__ import annotations

import json
import re

import pytest

import leanft.run.evaluate
from leanft import LeanftError
from leanft.cli import main
from leanft.run.config import load_config
from leanft.run.evaluate import EvalSettings, eval_settings
from leanft.run.tasks import TASKS, arith_task, dates_task, final_answer_match, verify_arith


def test_dates_task_is_deterministic_and_held_out():
    train, held_out = dates_task(seed=3, n_train=500, n_eval=100)
    assert len(train) == 500 and len(held_out) == 100
    assert (train, held_out) == dates_task(seed=3, n_train=500, n_eval=100)
    assert dates_task(seed=4, n_train=500, n_eval=100)[1] != held_out
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held_out}
    assert not {r["output"] for r in train} & {r["output"] for r in held_out}  # not even in another style
    assert dates_task(seed=3, n_train=50, n_eval=100)[1] == held_out  # held-out set independent of n_train
    assert all(set(r) == {"instruction", "output"} for r in train + held_out)


def test_arith_task_is_deterministic_held_out_and_verified():
    train, held_out = arith_task(seed=3, n_train=1800, n_eval=200)
    assert len(train) == 1800 and len(held_out) == 200
    assert (train, held_out) == arith_task(seed=3, n_train=1800, n_eval=200)
    assert arith_task(seed=4, n_train=1800, n_eval=200)[1] != held_out
    assert arith_task(seed=3, n_train=10, n_eval=200)[1] == held_out
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held_out}
    assert all(verify_arith(r) for r in train + held_out)
    steps = {r["output"].count("\n") for r in train + held_out}
    assert steps == {2, 3, 4}  # 2-4 operations, then the answer line
    assert {r["output"].split("\n")[0].split()[1] for r in train} == {"+", "-", "x"}  # and "/" as a last step
    assert any(" / " in r["output"] for r in train)


def test_verifier_rejects_wrong_steps_answers_and_problems():
    record = next(r for r in arith_task(seed=0, n_train=50, n_eval=0)[0] if " x " in r["output"])
    *steps, answer = record["output"].split("\n")
    total = int(answer.removeprefix("Answer: "))
    assert verify_arith(record)
    wrong_step = steps[0].rsplit(" ", 1)[0] + f" {int(steps[0].rsplit(' ', 1)[1]) + 1}"
    assert not verify_arith({**record, "output": "\n".join([wrong_step, *steps[1:], answer])})
    assert not verify_arith({**record, "output": "\n".join([*steps, f"Answer: {total + 1}"])})
    assert not verify_arith({**record, "output": "\n".join(steps)})  # no answer line
    # right arithmetic, but the numbers of another problem
    changed = re.sub(r"\d+", lambda number: str(int(number[0]) + 1), record["instruction"], count=1)
    assert not verify_arith({**record, "instruction": changed})
    other = next(r for r in arith_task(seed=1, n_train=50, n_eval=0)[0] if r["output"][-4:] != record["output"][-4:])
    assert verify_arith(other) and not verify_arith({**record, "output": other["output"]})


def test_final_answer_scorer():
    reference = "4 x 12 = 48\n23 + 48 = 71\nAnswer: 71"
    assert final_answer_match("  4 x 12 = 48\n23 + 48 = 70\nAnswer:   71  \n", reference)  # only the answer counts
    assert final_answer_match("Answer: 70\nAnswer: 71", reference)  # the last one
    assert not final_answer_match("4 x 12 = 48\nAnswer: 72", reference)
    assert not final_answer_match("4 x 12 = 48\n23 + 48 = 71", reference)
    assert not final_answer_match("", reference)


def test_builtin_names_in_config():
    with pytest.raises(LeanftError, match="builtin:dates or builtin:arith") as error:
        load_config(overrides=["data=builtin:nope"])
    assert "\n" not in str(error.value)
    with pytest.raises(LeanftError, match="max_new_tokens must be >= 1"):
        load_config(overrides=["max_new_tokens=0"])
    assert eval_settings(load_config()) == EvalSettings(16, TASKS["dates"].correct)
    assert eval_settings(load_config(overrides=["data=builtin:dates"])).max_new_tokens == 16
    arith = eval_settings(load_config(overrides=["data=builtin:arith"]))
    assert arith == EvalSettings(TASKS["arith"].max_new_tokens, final_answer_match)
    assert eval_settings(load_config(overrides=["data=builtin:arith", "max_new_tokens=7"])).max_new_tokens == 7
    assert eval_settings(load_config(overrides=["data=train.jsonl"])).max_new_tokens == 24


def test_builtin_arith_trains_and_evaluates_end_to_end(model_dir, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    args = [f"model={model_dir}", "data=builtin:arith", f"output_dir={run_dir}", "num_train=16", "num_eval=4"]
    assert main(["train", *args, "max_steps=2", "batch_size=4", "save_steps=50", "max_seq_len=512"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    assert summary["num_eval"] == 4

    answers = {r["instruction"]: r["output"] for r in arith_task(seed=0, n_train=16, n_eval=4)[1]}
    asked = []

    def worked_with_extra_text(model, tokenizer, prompts, max_new_tokens, desc=None):
        asked.append(max_new_tokens)
        return [f"Let me see.\n{answers[p]}  \n" for p in prompts]

    monkeypatch.setattr(leanft.run.evaluate, "generate_answers", worked_with_extra_text)
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0  # exact match would give 0
    assert asked == [TASKS["arith"].max_new_tokens]
