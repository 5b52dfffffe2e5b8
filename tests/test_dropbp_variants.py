"""DropBP variants: rate schedules, the top-up sampler, the authors' allocation rule, realised skipped share."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_batch, tiny_model

import leanft
from leanft.core.allocate import greedy_rates, measure_sensitivities, tensor_norm_change
from leanft.core.autorate import AutoRate, choose_rate
from leanft.core.callback import drops_at
from leanft.core.choices import CANDIDATE_RATES
from leanft.run.config import load_config
from leanft.run.train import train
from leanft.run.trainer import training_arguments


def test_schedule_pauses_dropping_in_the_warmup_and_cooldown_steps():
    shape = [drops_at(step, 10, warmup=0.2, cooldown=0.1) for step in range(10)]
    assert shape == [False, False] + [True] * 7 + [False]
    assert all(drops_at(step, 10) for step in range(10))
    assert [drops_at(step, 10, warmup=0.5) for step in range(10)] == [False] * 5 + [True] * 5
    assert not any(drops_at(step, 10, warmup=0.6, cooldown=0.4) for step in range(10))
    with pytest.raises(leanft.LeanftError, match="warmup and cooldown"):
        load_config(None, ["dropbp.warmup=0.7", "dropbp.cooldown=0.4"])


def test_realised_share_counts_what_was_skipped_and_nothing_while_paused():
    model = tiny_model("llama")
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5, seed=3)
    batch = tiny_batch(length=8)
    expected = []
    for step in range(6):
        ctrl.paused = step < 2
        model(**batch)
        expected.append(0.0 if step < 2 else ctrl.dropped_fraction())
        assert not (ctrl.paused and any(ctrl.dropped))
    assert ctrl.step == 6  # a paused forward still advances the step
    assert ctrl.realised_drop_fraction() == pytest.approx(sum(expected) / 6)
    with torch.no_grad():
        model(**batch)  # no training forward: nothing counted
    assert ctrl.realised_drop_fraction() == pytest.approx(sum(expected) / 6)


def test_state_dict_carries_the_realised_share_and_the_pattern_checksum():
    model = tiny_model("llama")
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5, seed=1)
    for _ in range(3):
        model(**tiny_batch())
    state = ctrl.state_dict()
    other = leanft.apply_dropbp(tiny_model("llama"), drop_rate=0.5, seed=1)
    other.load_state_dict(state)
    assert other.state_dict() == state and other.realised_drop_fraction() == ctrl.realised_drop_fraction()
    diverged = leanft.apply_dropbp(tiny_model("llama"), drop_rate=0.5, seed=2)
    for _ in range(3):
        diverged.model(**tiny_batch())
    assert diverged.pattern_checksum != ctrl.pattern_checksum


def test_topup_sampler_drops_at_least_the_rate_of_branches_highest_rates_first():
    model = tiny_model("llama")  # 2 blocks: 4 branches
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5, seed=0, sampler="topup")
    ctrl.set_rates([0.1, 0.6, 0.3, 0.5])
    plain = leanft.apply_dropbp(tiny_model("llama"), drop_rate=0.5, seed=0)
    plain.set_rates(ctrl.rates)
    topped_up = 0
    for step in range(200):
        pattern, drawn = ctrl.sample(step), plain.sample(step)
        assert sum(pattern) >= 2 and all(p or not d for p, d in zip(pattern, drawn, strict=True))
        if sum(drawn) < 2:
            topped_up += 1
            added = [i for i, (p, d) in enumerate(zip(pattern, drawn, strict=True)) if p and not d]
            assert all(ctrl.rates[i] >= max(ctrl.rates[j] for j in range(4) if not pattern[j]) for i in added)
    assert topped_up > 20
    with pytest.raises(leanft.LeanftError, match="sampler"):
        leanft.apply_dropbp(tiny_model("llama"), sampler="nope")


def test_official_sensitivity_is_the_squared_change_of_per_tensor_norms():
    full = [torch.tensor([3.0, 4.0]), torch.tensor([1.0]), None]
    change = [torch.tensor([3.0, 0.0]), None, torch.tensor([2.0])]
    # norms 5 -> 4, 1 -> 1, 0 -> 2
    assert tensor_norm_change(full, change) == pytest.approx(1.0 + 0.0 + 4.0)


def test_official_sensitivities_by_paths_equal_those_by_dropping_each_branch():
    model = tiny_model("llama")
    leanft.apply_paca(model, r=4, seed=0)
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    batch = tiny_batch(length=10)
    by_paths = measure_sensitivities(ctrl, batch, by_paths=True, allocation="official")
    by_dropping = measure_sensitivities(ctrl, batch, by_paths=False, allocation="official")
    assert min(by_dropping) > 0
    assert by_paths == pytest.approx(by_dropping, rel=1e-4, abs=1e-9)
    with pytest.raises(leanft.LeanftError, match="allocation must be one of"):
        measure_sensitivities(ctrl, batch, allocation="nope")


def test_official_greedy_cost_ignores_flops():
    # equal sensitivities: leanft drops the costlier branch more, the authors' rule charges both alike
    leanft_rates = greedy_rates([1.0, 1.0], [2.0, 1.0], target=0.5)
    official = greedy_rates([1.0, 1.0], [2.0, 1.0], target=0.5, allocation="official")
    assert leanft_rates[0] > leanft_rates[1] and official[0] == pytest.approx(official[1], abs=0.1 + 1e-9)
    assert greedy_rates([4.0, 1.0], [1.0, 1.0], target=0.5, allocation="official")[1] > 0.5


def test_patterns_per_step_splits_the_batch_into_micro_batches(tmp_path):
    config = load_config(None, ["batch_size=8", "grad_accum=2", "dropbp.rate=0.5", "dropbp.patterns_per_step=4"])
    args = training_arguments(config, tmp_path, dropbp_on=True, padding_free=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 8)
    plain = training_arguments(config, tmp_path, dropbp_on=False, padding_free=False)
    assert (plain.per_device_train_batch_size, plain.gradient_accumulation_steps) == (8, 2)
    with pytest.raises(leanft.LeanftError, match="patterns_per_step"):
        load_config(None, ["batch_size=8", "dropbp.patterns_per_step=3"])


def _head_only_model() -> torch.nn.Module:
    """Only the LM head trains: no gradient path runs through a branch, so DropBP's gradient is exact."""
    model = tiny_model("llama")
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("lm_head"))
    return model


def test_rate_auto_keeps_the_largest_rate_where_fidelity_is_perfect_and_lowers_it_where_it_is_not():
    batch = tiny_batch(batch=4, length=10)
    exact = leanft.apply_dropbp(_head_only_model(), drop_rate=0.5)
    choice = choose_rate(exact, batch, AutoRate(threshold=0.99))
    assert choice["rate"] == 0.5 and choice["fidelity"] == pytest.approx(1.0) and len(choice["tried"]) == 1

    model = tiny_model("llama")
    leanft.apply_paca(model, r=4, seed=0)  # the trained columns sit inside the branches
    lossy = leanft.apply_dropbp(model, drop_rate=0.5)
    every = choose_rate(lossy, batch, AutoRate(threshold=1.0))  # nothing passes: every candidate measured, DropBP off
    assert every["rate"] == 0.0 and lossy.rates == [0.0] * 4 and len(every["tried"]) == len(CANDIDATE_RATES)
    fidelity = {t["rate"]: t["fidelity"] for t in every["tried"]}
    assert all(value < 0.99 for value in fidelity.values()) and fidelity[0.1] > fidelity[0.5]
    threshold = fidelity[0.1]
    chosen = choose_rate(lossy, batch, AutoRate(threshold=threshold))
    assert 0.0 < chosen["rate"] < 0.5 and chosen["fidelity"] >= threshold and lossy.drop_rate == chosen["rate"]
    assert all(t["fidelity"] < threshold for t in chosen["tried"][:-1])  # every larger rate fell short


def test_train_with_rate_auto_reports_the_choice_and_drops_nothing_before_it(model_dir, data_file, tmp_path):
    run_dir = tmp_path / "auto"
    items = [f"model={model_dir}", f"data={data_file}", f"output_dir={run_dir}", "max_steps=6", "batch_size=4",
             "num_eval=4", "max_new_tokens=4", "save_steps=3", "dropbp.rate=auto", "dropbp.allocate_at=0.5",
             "dropbp.auto_threshold=0.01"]  # fmt: skip
    summary = train(load_config(None, items))
    auto = summary["dropbp_auto"]
    assert auto["rate"] == 0.5 == summary["dropbp_rate"] and auto["fidelity"] >= 0.01
    assert summary["dropbp_rates"] != [0.5] * 4  # allocated at the chosen rate
    state = json.loads((run_dir / "checkpoint-3" / "trainer_state.json").read_text())
    dropbp = state["stateful_callbacks"]["DropBPCallback"]["attributes"]["dropbp"]
    assert dropbp["skipped_flops"] == 0.0 and dropbp["step"] == 3  # steps 0-2 ran before the choice at step 3
    assert 0.0 < summary["dropbp_skipped_share"] < 0.5  # dropping only in the second half
    with pytest.raises(leanft.LeanftError, match="dropbp.rate"):
        load_config(None, ["dropbp.rate=sometimes"])
