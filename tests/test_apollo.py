"""APOLLO / APOLLO-Mini (apollo-torch) as leanft's optimizer: far less state than AdamW, and runs that train."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_batch, tiny_model
from test_cli import run_args

import leanft
from leanft.cli import main
from leanft.run.optimizers import apollo_optimizer, state_bytes


def one_step_state(model, optimizer, batch=None) -> int:
    if batch is None:
        model(**tiny_batch()).loss.backward()
    else:
        model(batch).square().mean().backward()
    optimizer.step()
    return state_bytes(optimizer)


def wide_model() -> torch.nn.Module:
    """Two 384 x 384 layers: wider than APOLLO's rank 128, so both APOLLO forms project them."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(384, 384), torch.nn.ReLU(), torch.nn.Linear(384, 384))


@pytest.mark.parametrize(("name", "share"), [("apollo", 0.7), ("apollo-mini", 0.05)])
def test_apollo_keeps_less_optimizer_state_than_adamw_for_full_fine_tuning(name, share):
    batch = torch.randn(16, 384, generator=torch.Generator().manual_seed(1))
    adamw_model, apollo_model = wide_model(), wide_model()
    adamw = one_step_state(adamw_model, torch.optim.AdamW(adamw_model.parameters(), lr=1e-3), batch)
    apollo = one_step_state(apollo_model, apollo_optimizer(apollo_model, name, lr=1e-3), batch)
    parameters = sum(p.numel() * p.element_size() for p in adamw_model.parameters())
    assert adamw == pytest.approx(2 * parameters, rel=0.01)  # two fp32 moments per weight
    assert apollo < share * adamw
    moved = [not torch.equal(a, b) for a, b in zip(apollo_model.parameters(), wide_model().parameters(), strict=True)]
    assert all(moved)  # every parameter got an update, projected or not


def test_apollo_mini_on_a_tiny_llama_keeps_a_small_fraction_of_adamws_state():
    adamw_model, apollo_model = tiny_model("llama").requires_grad_(True), tiny_model("llama").requires_grad_(True)
    adamw = one_step_state(adamw_model, torch.optim.AdamW(adamw_model.parameters(), lr=1e-3))
    assert one_step_state(apollo_model, apollo_optimizer(apollo_model, "apollo-mini", lr=1e-3)) < 0.1 * adamw


def test_apollo_mini_projects_paca_columns_and_updates_them():
    model = leanft.apply_paca(tiny_model("llama"), r=4)
    optimizer = apollo_optimizer(model, "apollo-mini", lr=1e-2)
    projected = [g for g in optimizer.param_groups if "rank" in g]
    assert projected and all(p.shape[1] == 4 for p in projected[0]["params"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    one_step_state(model, optimizer)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["full", "paca"])
def test_a_run_with_apollo_mini_lowers_the_held_out_loss(model_dir, data_file, tmp_path, method):
    run_dir = tmp_path / "run"
    lr = "lr=0.001" if method == "full" else "lr=0.01"
    assert main(run_args(model_dir, data_file, run_dir, "optimizer=apollo-mini", f"method={method}", lr)) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"]


def test_an_unknown_optimizer_is_one_line_before_anything_loads(tmp_path, capsys):
    assert main(["train", "optimizer=lion", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "optimizer must be one of adamw, apollo, apollo-mini" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
