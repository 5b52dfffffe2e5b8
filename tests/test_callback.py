"""DropBPCallback inside a stock transformers.Trainer: allocation point, rates in checkpoints, resume."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import tiny_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import leanft
from leanft.run.data import collate


def features(count: int = 32, length: int = 10) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 128, (count, length), generator=generator).tolist()
    return [{"input_ids": row, "labels": [-100] * 3 + row[3:]} for row in rows]


class Spy(TrainerCallback):
    """Calls ``record`` after every optimizer step."""

    def __init__(self, record):
        self.record = record

    def on_step_end(self, args, state, control, **kwargs):
        self.record()


def make_trainer(tmp_path, max_steps: int = 10, allocate_at: float = 0.2, sampler: str = "bernoulli"):
    model = leanft.apply_paca(tiny_model("llama"), r=4)
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5, seed=0, sampler=sampler)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_steps=5,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=True,
    )
    callback = leanft.DropBPCallback(ctrl, allocate_at=allocate_at)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=features(),
        data_collator=functools.partial(collate, pad_token_id=0),
        callbacks=[callback],
    )
    return trainer, ctrl, callback


def test_allocates_once_at_the_configured_step_and_checkpoints_the_rates(tmp_path):
    trainer, ctrl, callback = make_trainer(tmp_path)
    seen = []
    trainer.add_callback(Spy(lambda: seen.append(callback.allocated)))
    trainer.train()
    assert seen[:2] == [False, False] and all(seen[2:])  # allocation at step round(0.2 * 10) = 2
    assert ctrl.rates != [0.5] * len(ctrl.branches) and callback.allocated
    assert ctrl.step == 10  # one pattern per training forward
    state = json.loads((tmp_path / "checkpoint-10" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["DropBPCallback"]["attributes"]
    assert saved["dropbp"]["rates"] == ctrl.rates and saved["dropbp"]["step"] == 10 and saved["allocated"]


def test_resume_restores_rates_and_step(tmp_path):
    trainer, ctrl, _ = make_trainer(tmp_path)
    trainer.train()
    rates_at_5 = json.loads((tmp_path / "checkpoint-5" / "trainer_state.json").read_text())
    rates_at_5 = rates_at_5["stateful_callbacks"]["DropBPCallback"]["attributes"]["dropbp"]
    resumed, resumed_ctrl, resumed_callback = make_trainer(tmp_path)
    patterns = []
    resumed.add_callback(Spy(lambda: patterns.append(list(resumed_ctrl.dropped))))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    assert resumed_callback.allocated and resumed_ctrl.rates == rates_at_5["rates"] == ctrl.rates
    assert patterns[0] == resumed_ctrl.sample(5) and resumed_ctrl.step == 10


def test_rejects_bad_allocate_at():
    with pytest.raises(leanft.LeanftError, match="allocate_at"):
        leanft.DropBPCallback(None, allocate_at=1.5)
