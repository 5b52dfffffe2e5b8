"""gradient_fidelity against plain autograd on a copy of the model with the dropped branch detached."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from test_dropbp import reference_with_detached

import leanft
from leanft.fidelity import gradient_fidelity

ALMOST_ALWAYS = 1.0 - 1e-7


def flat_grads(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return torch.cat([
        (torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in model.parameters() if p.requires_grad
    ])


def trainable_model() -> torch.nn.Module:
    model = tiny_model("llama")
    model.train()
    leanft.apply_paca(model, r=4, seed=0)
    return model


def test_no_dropping_is_perfect_fidelity(batch):
    model = trainable_model()
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    ctrl.set_rates([0.0] * len(ctrl.branches))
    result = gradient_fidelity(ctrl, batch, samples=2)
    assert result == pytest.approx({"mean_cosine": 1.0, "cosine_of_mean": 1.0, "norm_ratio_of_mean": 1.0}, abs=1e-5)


def test_one_branch_always_dropped_matches_a_detached_reference(batch):
    model = trainable_model()
    plain = copy.deepcopy(model)
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    dropped = 2  # layer 1's attention: layer 0's gradients lose the paths through it
    pattern = [i == dropped for i in range(len(ctrl.branches))]
    ctrl.set_rates([ALMOST_ALWAYS if p else 0.0 for p in pattern])
    full = flat_grads(reference_with_detached(plain, ctrl, [False] * len(pattern)), batch)
    partial = flat_grads(reference_with_detached(plain, ctrl, pattern), batch)
    expected = float(partial @ full / (partial.norm() * full.norm()))
    assert expected < 0.999  # the dropped branch really changes the gradient

    result = gradient_fidelity(ctrl, batch, samples=3)

    assert result["mean_cosine"] == pytest.approx(expected, abs=1e-5)
    assert result["cosine_of_mean"] == pytest.approx(expected, abs=1e-5)
    assert result["norm_ratio_of_mean"] == pytest.approx(float(partial.norm() / full.norm()), rel=1e-5)


def test_leaves_rng_grads_and_step_alone(batch):
    model = trainable_model()
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    model(**batch).loss.backward()
    before_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    step, rng = ctrl.step, torch.get_rng_state()

    gradient_fidelity(ctrl, batch, samples=2)

    assert ctrl.step == step and torch.equal(torch.get_rng_state(), rng)
    after_grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(after_grads) == len(before_grads)
    assert all(torch.equal(a, b) for a, b in zip(after_grads, before_grads, strict=True))


def test_zero_samples_is_a_clear_error(batch):
    ctrl = leanft.apply_dropbp(trainable_model(), drop_rate=0.5)
    with pytest.raises(leanft.LeanftError, match="samples"):
        gradient_fidelity(ctrl, batch, samples=0)
