"""TRL's ``SFTTrainer`` with PaCA and DropBP: trains, resumes exactly, and its checkpoint merges to a plain model."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_tokenizer, tiny_llama_for
from transformers import AutoModelForCausalLM, TrainerCallback

import leanft

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

STEPS = 4


class StopAt(TrainerCallback):
    """Stop training after optimizer step ``step`` (a checkpoint is saved there), as a killed run would have."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def sft_run(output_dir, tokenizer, resume: bool = False, stop_at: int | None = None):
    """A fresh tiny model with PaCA (r 2) and DropBP 0.5 (allocated after 1 step), trained by SFTTrainer."""
    model = tiny_llama_for(tokenizer)
    leanft.apply_paca(model, r=2, seed=0)
    controller = leanft.apply_dropbp(model, drop_rate=0.5, seed=0)
    data = datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": f"Add one to {i}."}, {"role": "assistant", "content": str(i + 1)}]}
         for i in range(16)]
    )
    config = trl.SFTConfig(
        output_dir=str(output_dir), max_steps=STEPS, save_steps=2, per_device_train_batch_size=2, learning_rate=0.05,
        logging_steps=1, report_to="none", use_cpu=True, bf16=False, max_length=32, seed=0, disable_tqdm=True,
    )
    callbacks = [leanft.DropBPCallback(controller, allocate_at=0.25)]
    if stop_at is not None:
        callbacks.append(StopAt(stop_at))
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume or None)
    return model, controller


def columns(model) -> dict[str, torch.Tensor]:
    return {name: module.paca_weight.detach().clone() for name, module in leanft.paca_modules(model).items()}


@pytest.mark.usefixtures("one_thread")
def test_sft_trainer_with_paca_and_dropbp_resumes_exactly_and_merges(tmp_path):
    tokenizer = make_tiny_tokenizer()
    straight, straight_ctrl = sft_run(tmp_path / "straight", tokenizer)
    assert straight_ctrl.sensitivities is not None and straight_ctrl.rates != [0.5] * len(straight_ctrl.rates)
    sft_run(tmp_path / "resumed", tokenizer, stop_at=2)
    resumed, resumed_ctrl = sft_run(tmp_path / "resumed", tokenizer, resume=True)
    assert resumed_ctrl.rates == straight_ctrl.rates and resumed_ctrl.step == straight_ctrl.step
    trained, untrained = columns(straight), columns(leanft.apply_paca(tiny_llama_for(tokenizer), r=2, seed=0))
    assert all(not torch.equal(trained[name], untrained[name]) for name in trained)  # every layer learned
    for name, value in columns(resumed).items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)

    # a plain model out of the TRL checkpoint: load its PaCA columns into the base, merge, save
    base = tiny_llama_for(tokenizer)
    leanft.load_paca(base, tmp_path / "straight" / f"checkpoint-{STEPS}")
    leanft.merge_paca(base).save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    straight_ctrl.remove()
    ids = torch.randint(3, len(tokenizer), (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, straight.eval()(input_ids=ids).logits)
