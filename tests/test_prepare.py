"""prepare_model: the one set-up that train and fidelity run, its named steps in their order."""

from __future__ import annotations

import torch
from conftest import tiny_model

import leanft
from leanft.run.config import load_config
from leanft.run.prepare import STEPS, prepare_model


def test_every_step_runs_in_order_when_the_config_asks_for_it():
    keys = ["bf16=true", "compile=true", "dropbp.rate=0.5", "dropbp.sampler=cyclic", "gradient_checkpointing=true"]
    prepared = prepare_model(tiny_model("llama").to(torch.bfloat16), load_config(None, keys))
    assert prepared.steps == list(STEPS)
    trainable = [p for p in prepared.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # fp32 columns on a bf16 base
    assert leanft.paca_modules(prepared.model) and prepared.controller.sampler == "cyclic"
    assert prepared.controller.drop_rate == 0.5 and prepared.model.is_activation_checkpointing


def test_only_the_method_by_default_and_dropbp_at_a_studys_own_rate():
    config = load_config(None, ["bf16=false", "method=lora"])
    bare = prepare_model(tiny_model("llama"), config)
    assert bare.steps == ["method"] and bare.controller is None
    study = prepare_model(tiny_model("llama"), config, dropbp_rate=0.0)  # fidelity sets its rates itself
    assert study.steps == ["method", "dropbp"] and study.controller.drop_rate == 0.0
