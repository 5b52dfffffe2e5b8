"""Data-aware PaCA columns: the scores against plain autograd and direct computation, and their use in a run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import full_weight_grad, tiny_batch, tiny_model
from safetensors.torch import load_file

import leanft
from leanft.cli import main
from leanft.core.paca import target_names
from leanft.core.paca_columns import activation_scores, column_scores, gradient_scores

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_gradient_scores_are_the_column_norms_of_the_full_weight_gradient(arch):
    model, batch = tiny_model(arch), tiny_batch()
    names = target_names(model, "all-linear")
    scores = gradient_scores(model, names, batch)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated
    model.requires_grad_(True)
    model(**batch, use_cache=False).loss.backward()
    for name in names:
        expected = full_weight_grad(model.get_submodule(name)).norm(dim=0)
        torch.testing.assert_close(scores[name], expected, rtol=1e-4, atol=1e-7)


def test_activation_scores_are_the_input_column_norms():
    model, batch = tiny_model("llama"), tiny_batch()
    scores = activation_scores(model, ["model.layers.0.self_attn.q_proj"], batch)
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.get_input_embeddings()(batch["input_ids"]))
    torch.testing.assert_close(scores["model.layers.0.self_attn.q_proj"], hidden.reshape(-1, 32).norm(dim=0))
    assert column_scores(model, ["model.layers.0.self_attn.q_proj"], batch, "random") is None


def test_apply_paca_trains_the_highest_scoring_columns():
    model, batch = tiny_model("llama"), tiny_batch()
    names = target_names(model, "all-linear")
    scores = gradient_scores(model, names, batch)
    leanft.apply_paca(model, r=3, columns=scores)
    for name, layer in leanft.paca_modules(model).items():
        assert layer.paca_index.tolist() == sorted(scores[name].topk(3).indices.tolist())


def test_a_run_with_gradient_columns_trains_the_columns_its_first_batch_scores_highest(model_dir, data_file, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", f"model={model_dir}", f"data={data_file}", f"output_dir={run_dir}", "max_steps=2", "batch_size=4",
            "num_eval=4", "max_new_tokens=2", "eval_steps=0", "r=2", "paca.columns=gradient", "seed=1"]
    assert main(args) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    saved = load_file(run_dir / "adapter" / "paca_adapter.safetensors")
    indices = {key: value for key, value in saved.items() if "index" in key}
    assert indices and all(len(value) == 2 for value in indices.values())
    assert main([*args[:3], f"output_dir={tmp_path / 'other'}", *args[4:-2], "paca.columns=random", "seed=1"]) == 0
    other = load_file(tmp_path / "other" / "adapter" / "paca_adapter.safetensors")
    assert any(not torch.equal(indices[key], other[key]) for key in indices)  # a different choice than random


def test_an_unknown_column_choice_is_refused_in_one_line(capsys):
    assert main(["train", "paca.columns=largest"]) == 2
    assert "paca.columns must be one of random, activation, gradient" in capsys.readouterr().err
