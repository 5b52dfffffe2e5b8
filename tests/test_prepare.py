"""prepare_model: the one set-up that train and fidelity run, its named steps in their order."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_model

import leanft
from leanft.run.config import load_config
from leanft.run.prepare import STEPS, prepare_model


def test_every_step_runs_in_order_when_the_config_asks_for_it():
    keys = ["bf16=true", "compile=true", "dropbp.rate=0.5", "dropbp.sampler=topup", "gradient_checkpointing=true"]
    prepared = prepare_model(tiny_model("llama").to(torch.bfloat16), load_config(None, keys))
    assert prepared.steps == list(STEPS)
    trainable = [p for p in prepared.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # fp32 columns on a bf16 base
    assert leanft.paca_modules(prepared.model) and prepared.controller.sampler == "topup"
    assert prepared.controller.drop_rate == 0.5 and prepared.model.is_activation_checkpointing


def test_only_the_method_by_default_and_dropbp_at_a_studys_own_rate():
    config = load_config(None, ["bf16=false", "method=lora"])
    bare = prepare_model(tiny_model("llama"), config)
    assert bare.steps == ["method"] and bare.controller is None
    study = prepare_model(tiny_model("llama"), config, dropbp_rate=0.0)  # fidelity sets its rates itself
    assert study.steps == ["method", "dropbp"] and study.controller.drop_rate == 0.0


def set_up_as(model, controller) -> dict:
    """What must match between commands: dtypes of base and trainables, what trains, PaCA's columns, DropBP."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    columns = {name: module.paca_index.tolist() for name, module in leanft.paca_modules(model).items()}
    dropbp = None if controller is None else (controller.sampler, controller.seed, controller.drop_rate,
                                              controller.rates, len(controller.branches))
    return {"frozen": frozen, "trainable": {name: (p.dtype, tuple(p.shape)) for name, p in trainable.items()},
            "columns": columns, "dropbp": dropbp, "checkpointing": model.is_activation_checkpointing}


def test_bench_and_fidelity_set_up_the_model_train_does(model_dir, data_file, tmp_path):
    """For one config (bf16 on, DropBP 0.5 with the top-up sampler, checkpointing, seed 3), train's model, bench's
    worker model and fidelity's model have the same base and trainable dtypes, trained columns and DropBP."""
    from leanft.run.callbacks import TrainingClock
    from leanft.run.train import build_trainer, load_inputs
    from leanft.studies.bench_options import parse_bench_options
    from leanft.studies.bench_worker import Trainee
    from leanft.studies.fidelity_study import study_model

    keys = [f"model={model_dir}", f"data={data_file}", "bf16=true", "dropbp.rate=0.5", "dropbp.sampler=topup",
            "seed=3", "r=4", "gradient_checkpointing=true", "max_steps=2", f"output_dir={tmp_path / 'run'}"]
    config = load_config(None, keys)
    run = build_trainer(load_inputs(config, tmp_path / "run"), config, [], TrainingClock())
    train = set_up_as(run.trainer.model, run.controller)
    assert train["frozen"] == {torch.bfloat16} and train["columns"] and train["dropbp"][0] == "topup"

    prepared, _, _ = study_model(config, 0.5)
    assert set_up_as(prepared.model, prepared.controller) == train

    plan = parse_bench_options([*keys, "variants=paca", "device=cpu", "rates=0.5"])
    paca = next(method for method in plan.methods if method.key == "paca")
    trainee = Trainee(dataclasses.replace(plan.case, config=plan.row_config(paca)))
    trainee.controller.drop_rate = 0.5  # bench sets a row's rate per step
    trainee.controller.set_rates([0.5] * len(trainee.controller.branches))
    assert set_up_as(trainee.model, trainee.controller) == train
    assert plan.dtype == "bfloat16" and plan.batch == config.batch_size and plan.seq_len == config.max_seq_len


def test_bench_refuses_its_old_spellings_with_trains_key():
    from leanft.core.errors import LeanftError
    from leanft.studies.bench_options import parse_bench_options

    for old, new in (("batch=4", "batch_size"), ("seq_len=64", "max_seq_len"), ("dtype=float32", "bf16"),
                     ("warmup=1", "untimed_steps"), ("chunked=true", "chunked_loss"), ("bases=lora", "variants"),
                     ("optimizers=apollo", "a variant's key")):
        with pytest.raises(LeanftError, match=f"is now {new}"):
            parse_bench_options(["quick=true", old])
