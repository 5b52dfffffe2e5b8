"""DropBP against plain-PyTorch references: detached branches, unchanged forward, no saved activations."""

from __future__ import annotations

import copy
import random

import numpy as np
import peft
import pytest
import torch
from conftest import ARCHITECTURES, tiny_batch, tiny_model
from torch import nn

import leanft
from leanft.core.allocate import allocate_rates, greedy_rates, measure_sensitivities
from leanft.studies.memory import SavedTensorMeter


def detach_output(module, args, output):
    if isinstance(output, tuple):
        return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in output)
    return output.detach()


def reference_with_detached(model: nn.Module, ctrl: leanft.DropBP, pattern: list[bool]) -> nn.Module:
    """A copy of ``model`` without DropBP where exactly the branches dropped in ``pattern`` are detached."""
    reference = copy.deepcopy(model)
    for branch, dropped in zip(ctrl.branches, pattern, strict=True):
        if dropped:
            block, sub_names = branch.name.rsplit(".", 1)  # OPT's MLP is "fc1+fc2": detach fc2's output
            reference.get_submodule(f"{block}.{sub_names.split('+')[-1]}").register_forward_hook(detach_output)
    return reference


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: param.grad for name, param in model.named_parameters() if param.requires_grad}


def assert_same_grads(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in actual:
        if expected[name] is None or not expected[name].any():
            assert actual[name] is None or not actual[name].any(), name
        else:
            torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def mixed_pattern(count: int) -> list[bool]:
    return [i % 3 != 1 for i in range(count)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_finds_attn_and_mlp_branches_in_model_order(arch):
    model = tiny_model(arch)
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    layers = model.config.num_hidden_layers
    assert [b.kind for b in ctrl.branches] == ["attn", "mlp"] * layers
    assert [b.layer for b in ctrl.branches] == [i // 2 for i in range(2 * layers)]
    assert all(b.flops > 0 for b in ctrl.branches)
    assert ctrl.rates == [0.5] * 2 * layers and len(ctrl.dropped) == 2 * layers


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pattern_keeps_forward_and_matches_detached_reference(arch):
    model = tiny_model(arch)
    plain = copy.deepcopy(model)
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    pattern = mixed_pattern(len(ctrl.branches))
    reference = reference_with_detached(plain, ctrl, pattern)
    batch = tiny_batch()
    with ctrl.forced(pattern):
        out = model(**batch)
    torch.testing.assert_close(out.logits, plain(**batch).logits, rtol=0, atol=0)
    ref_out = reference(**batch)
    out.loss.backward()
    ref_out.loss.backward()
    assert_same_grads(grads(model), grads(reference))
    for branch, dropped in zip(ctrl.branches, pattern, strict=True):
        branch_grads = [p.grad for m in branch.modules for p in m.parameters()]
        if dropped:
            assert all(g is None for g in branch_grads), branch.name
        else:
            assert all(g is not None for g in branch_grads), branch.name


def test_drop_rate_zero_gives_the_gradients_of_no_dropbp(batch):
    model = tiny_model("llama")
    plain = copy.deepcopy(model)
    leanft.apply_dropbp(model, drop_rate=0.0)
    model(**batch).loss.backward()
    plain(**batch).loss.backward()
    assert_same_grads(grads(model), grads(plain))


def test_sampled_pattern_matches_reference_and_advances_step(batch):
    model = tiny_model("llama")
    plain = copy.deepcopy(model)
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5, seed=3)
    out = model(**batch)
    assert ctrl.step == 1 and ctrl.dropped == ctrl.sample(0)
    reference = reference_with_detached(plain, ctrl, ctrl.dropped)
    out.loss.backward()
    reference(**batch).loss.backward()
    assert_same_grads(grads(model), grads(reference))


def test_eval_and_no_grad_forwards_never_drop_nor_advance(batch):
    model = tiny_model("llama")
    plain = copy.deepcopy(model)
    ctrl = leanft.apply_dropbp(model, drop_rate=0.9)
    with torch.no_grad():
        model(**batch)
    model.eval()
    out = model(**batch)
    assert ctrl.step == 0
    plain.eval()
    out.loss.backward()
    plain(**batch).loss.backward()
    assert_same_grads(grads(model), grads(plain))


def test_patterns_are_a_function_of_seed_and_step_only():
    first = leanft.apply_dropbp(tiny_model("llama"), drop_rate=0.5, seed=7)
    second = leanft.apply_dropbp(tiny_model("gpt2"), drop_rate=0.5, seed=7)
    other_seed = leanft.apply_dropbp(tiny_model("llama"), drop_rate=0.5, seed=8)
    torch.manual_seed(123)
    patterns = [first.sample(step) for step in range(20)]
    torch.manual_seed(456)
    assert patterns == [second.sample(step) for step in range(20)]
    assert patterns != [other_seed.sample(step) for step in range(20)]
    assert len({tuple(p) for p in patterns}) > 10


def test_realised_average_drop_rate_matches_target():
    model = tiny_model("llama")
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    for rate in (0.25, 0.5, 0.75):
        ctrl.set_rates([rate] * len(ctrl.branches))
        realised = np.mean([ctrl.dropped_fraction(ctrl.sample(step)) for step in range(2000)])
        assert abs(realised - rate) < 0.02, (rate, realised)
    allocate_rates(ctrl, tiny_batch(), target=0.5)
    expected = ctrl.expected_drop_fraction()  # the budget in 0.1 steps: at or just above the target
    assert 0.5 <= expected <= 0.5 + 0.1 * max(b.flops for b in ctrl.branches) / sum(b.flops for b in ctrl.branches)
    realised = np.mean([ctrl.dropped_fraction(ctrl.sample(step)) for step in range(2000)])
    assert abs(realised - expected) < 0.02, (realised, expected)


@pytest.mark.parametrize("method", ["full", "paca"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant, method, batch):
    model = tiny_model("llama") if method == "full" else leanft.apply_paca(tiny_model("llama"), r=4)
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5, seed=1)
    ctrl_ckpt = leanft.apply_dropbp(checkpointed, drop_rate=0.5, seed=1)
    for _ in range(3):  # several steps: each recompute must see its own step's pattern
        model(**batch).loss.backward()
        checkpointed(**batch).loss.backward()
        assert ctrl.dropped == ctrl_ckpt.dropped
    assert any(ctrl.dropped) and not all(ctrl.dropped)
    assert_same_grads(grads(checkpointed), grads(model))


def lora_model() -> nn.Module:
    config = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    return peft.get_peft_model(tiny_model("llama"), config)


@pytest.mark.parametrize(
    "build", [lora_model, lambda: leanft.apply_paca(tiny_model("qwen2"), r=4)], ids=["peft-lora", "paca"]
)
def test_with_adapters_matches_detached_reference(build, batch):
    model = build()
    plain = copy.deepcopy(model)
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    pattern = mixed_pattern(len(ctrl.branches))
    reference = reference_with_detached(plain, ctrl, pattern)
    with ctrl.forced(pattern):
        model(**batch).loss.backward()
    reference(**batch).loss.backward()
    assert_same_grads(grads(model), grads(reference))


def test_backward_is_safe_when_every_trainable_path_is_dropped(batch):
    model = leanft.apply_paca(tiny_model("llama"), r=4)
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    with ctrl.forced([True] * len(ctrl.branches)):
        out = model(**batch)
    out.loss.backward()
    assert all(m.paca_weight.grad is None for m in leanft.paca_modules(model).values())


def test_dropping_half_the_branches_saves_markedly_less_for_backward():
    batch = tiny_batch(batch=4, length=32)
    model = tiny_model("llama")
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    measured = {}
    for name, pattern in (("none", [False] * 4), ("half", [True, False, False, True])):
        with ctrl.forced(pattern), SavedTensorMeter(model) as meter:
            loss = model(**batch).loss
        loss.backward()
        measured[name] = meter.bytes
    assert measured["half"] < 0.75 * measured["none"], measured


def test_remove_restores_the_model_exactly(batch):
    model = tiny_model("gpt2")
    before = {name: module.__dict__.get("forward") for name, module in model.named_modules()}
    ctrl = leanft.apply_dropbp(model, drop_rate=0.9)
    ctrl.remove()
    assert {name: module.__dict__.get("forward") for name, module in model.named_modules()} == before
    assert not model._forward_pre_hooks and not model._forward_hooks
    plain = tiny_model("gpt2")
    model(**batch).loss.backward()
    plain(**batch).loss.backward()
    assert_same_grads(grads(model), grads(plain))


def test_allocation_respects_budget_and_favours_insensitive_branches(batch):
    model = tiny_model("llama")
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    rates = allocate_rates(ctrl, batch)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_draws
    assert torch.equal(model.lm_head.weight.grad, torch.ones_like(model.lm_head.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "lm_head.weight")
    assert ctrl.step == 0 and ctrl.rates == rates
    flops = [b.flops for b in ctrl.branches]
    share = ctrl.expected_drop_fraction()
    assert 0.5 <= share <= 0.5 + 0.1 * max(flops) / sum(flops) + 1e-9
    assert all(0.0 <= rate <= 0.9 and abs(rate * 10 - round(rate * 10)) < 1e-9 for rate in rates)
    cost = [s / f for s, f in zip(ctrl.sensitivities, flops, strict=True)]
    for i in range(len(rates)):
        for j in range(len(rates)):
            if cost[i] < cost[j]:
                assert rates[i] >= rates[j], (cost, rates)
    assert len(set(rates)) > 1


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma"])
@pytest.mark.parametrize("method", ["full", "paca", "lora"])
def test_single_forward_sensitivities_equal_dropping_each_branch(arch, method):
    model = tiny_model(arch)
    if method == "paca":
        leanft.apply_paca(model, r=4, seed=0)
    elif method == "lora":
        target = ["c_attn", "c_proj", "c_fc"] if arch == "gpt2" else "all-linear"
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=target, init_lora_weights=False))
    model.train()  # GPT-2 / NeoX dropout: both measurements must see the same masks
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    batch = tiny_batch(length=10)
    by_paths = measure_sensitivities(ctrl, batch, by_paths=True)
    by_dropping = measure_sensitivities(ctrl, batch, by_paths=False)
    assert min(by_dropping) > 0
    assert by_paths == pytest.approx(by_dropping, rel=1e-4, abs=1e-7)


def test_greedy_rates_spend_the_budget_where_it_adds_the_least_noise():
    rates = greedy_rates(sensitivities=[5.0, 1.0, 3.0, 0.5], flops=[1.0, 1.0, 1.0, 1.0], target=0.5)
    assert sum(rates) == pytest.approx(2.0)
    assert rates == [0.2, 0.7, 0.4, 0.7]  # least sensitive highest, but the convex cost keeps every branch in
    assert greedy_rates([2.0] * 4, [1.0] * 4, target=0.5) == [0.5] * 4  # equal sensitivities: uniform
    # per FLOP: the same sensitivity on a branch twice as costly to run is the better one to drop
    heavy, light = greedy_rates([1.0, 1.0], [2.0, 1.0], target=0.5)
    assert heavy > light and 0.5 <= (2 * heavy + light) / 3 < 0.55
    floored = greedy_rates(sensitivities=[50.0, 1.0, 3.0, 0.5], flops=[1.0, 1.0, 1.0, 1.0], target=0.5, floor=0.2)
    assert floored[0] == 0.2 and min(floored) == 0.2
    with pytest.raises(leanft.LeanftError):
        greedy_rates([1.0], [1.0], target=0.95)


def test_flops_follow_grouped_kv_heads_gated_mlp_and_sequence_length():
    model = tiny_model("llama")  # hidden 32, 4 heads of 8, 2 KV heads, gated MLP of 48
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5)
    model(**tiny_batch(length=10))
    attn, mlp = ctrl.branches[0], ctrl.branches[1]
    assert attn.flops == 10 * 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32) + 10 * 10 * 4 * 32
    assert mlp.flops == 10 * 2 * 3 * 32 * 48
    model(**tiny_batch(length=20))
    assert mlp.flops == 20 * 2 * 3 * 32 * 48


@pytest.mark.parametrize("rate", [1.5, 1.0, -0.1, "0.5", True])
def test_bad_drop_rate_is_a_clear_error(rate):
    with pytest.raises(leanft.LeanftError, match=r"drop_rate must be a number in \[0, 1\)"):
        leanft.apply_dropbp(tiny_model("llama"), drop_rate=rate)


class UnknownBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = nn.Linear(8, 8)
        self.ff = nn.Linear(8, 8)

    def forward(self, x):
        x = x + self.mixer(x)
        return x + self.ff(x)


class UnknownModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.stack = nn.ModuleList([UnknownBlock(), UnknownBlock()])

    def forward(self, x):
        for block in self.stack:
            x = block(x)
        return x


def test_unknown_architecture_names_the_option_and_the_option_works():
    with pytest.raises(leanft.LeanftError, match="blocks="):
        leanft.apply_dropbp(UnknownModel(), drop_rate=0.5)
    model = UnknownModel()
    ctrl = leanft.apply_dropbp(model, drop_rate=0.5, blocks="stack", attn="mixer", mlp="ff")
    assert [b.name for b in ctrl.branches] == ["stack.0.mixer", "stack.0.ff", "stack.1.mixer", "stack.1.ff"]
    with ctrl.forced([True, False, True, False]):
        model(torch.randn(2, 3, 8)).sum().backward()
    assert model.stack[0].mixer.weight.grad is None and model.stack[0].ff.weight.grad is not None
    with pytest.raises(leanft.LeanftError, match="mlp="):
        leanft.apply_dropbp(UnknownModel(), blocks="stack", attn="mixer", mlp="missing")
