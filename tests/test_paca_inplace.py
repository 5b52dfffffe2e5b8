"""PaCA writes trained columns into the frozen weight in place on the CPU: still exact, never into tied weights."""

from __future__ import annotations

import copy

import torch
import transformers
from conftest import DECODER, tiny_batch, tiny_model

import leanft
from leanft.core.paca_layer import PacaMatmul


def sgd_steps(model: torch.nn.Module, steps: int = 3) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(steps):
        model(**tiny_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_gradients_after_updates_match_a_plain_model_with_merged_weights():
    model = leanft.apply_paca(tiny_model("llama"), r=4, seed=2)
    sgd_steps(model)
    reference = leanft.merge_paca(copy.deepcopy(model)).requires_grad_(True)
    batch = tiny_batch(seed=7)
    loss, ref_loss = model(**batch).loss, reference(**batch).loss
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    loss.backward()
    ref_loss.backward()
    for name, layer in leanft.paca_modules(model).items():
        assert torch.equal(layer.weight[:, layer.paca_index], layer.paca_weight)  # written in place
        expected = reference.get_submodule(name).weight.grad[:, layer.paca_index]
        torch.testing.assert_close(layer.paca_weight.grad, expected, rtol=1e-5, atol=1e-7)


def test_backward_rebuilds_w_eff_when_the_weight_lost_the_columns_after_forward():
    """FSDP2 re-gathers a frozen weight from its shards (original columns) between forward and backward."""
    torch.manual_seed(0)
    weight, index = torch.randn(6, 10), torch.tensor([2, 7])
    original = weight.clone()
    paca = (weight[:, index] + 1).requires_grad_(True)
    weight.index_copy_(1, index, paca.detach())  # as PacaLinear leaves it on the CPU
    x = torch.randn(3, 10, requires_grad=True)
    out = PacaMatmul.apply(x, paca, weight, index, None)
    weight.data.copy_(original)  # bypasses the version counter, like a re-gather
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 6) @ original.index_copy(1, index, paca.detach()))


def test_tied_lm_head_never_writes_into_the_embeddings():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **DECODER)
    ).train()
    embeddings = model.get_input_embeddings().weight.detach().clone()
    leanft.apply_paca(model, r=4, target_modules=["lm_head"])
    sgd_steps(model)
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert not torch.equal(model.lm_head.paca_weight, embeddings[:, model.lm_head.paca_index])


def test_loading_other_columns_restores_the_original_ones_first(tmp_path):
    base = tiny_model("llama")
    trained = leanft.apply_paca(copy.deepcopy(base), r=4, seed=1)
    sgd_steps(trained)
    leanft.save_paca(trained, tmp_path)
    other = leanft.apply_paca(copy.deepcopy(base), r=4, seed=2)
    sgd_steps(other)  # its own (different) columns are written into its weights
    leanft.load_paca(other, tmp_path)
    batch = tiny_batch(seed=4)
    torch.testing.assert_close(other(**batch).logits, trained(**batch).logits, rtol=0, atol=0)
    leanft.remove_paca(other)
    torch.testing.assert_close(other(**batch).logits, base(**batch).logits, rtol=0, atol=0)


def _layer_and_reference(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = leanft.apply_paca(torch.nn.Sequential(torch.nn.Linear(10, 6)), r=3, seed=seed)
    return model, torch.randn(4, 10)


def _expected(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.merged_weight().t() + layer.bias


def test_columns_changed_behind_the_version_counter_still_take_effect():
    """Optimizers such as apollo-torch write ``p.data``, which no version counter sees."""
    model, x = _layer_and_reference()
    layer = model[0]
    model(x)
    layer.paca_weight.data.add_(0.5)  # invisible to _version
    torch.testing.assert_close(model(x), _expected(layer, x), rtol=0, atol=0)
    assert torch.equal(layer.weight[:, layer.paca_index], layer.paca_weight)


def test_new_columns_without_new_values_take_effect():
    """Only ``paca_index`` changes: the weight already holds the untrained columns, so re-indexing writes nothing."""
    model, x = _layer_and_reference()
    layer = model[0]
    model(x)
    layer.set_index(torch.tensor([0, 4, 9]))  # paca_weight keeps its values, now for other columns
    torch.testing.assert_close(model(x), _expected(layer, x), rtol=0, atol=0)
    untouched = [c for c in range(10) if c not in (0, 4, 9)]
    original = leanft.remove_paca(copy.deepcopy(model))[0].weight
    assert torch.equal(layer.weight[:, untouched], original[:, untouched])


def test_a_steady_training_step_never_compares_the_weight_with_its_columns(monkeypatch):
    from leanft.core import paca_layer

    model = leanft.apply_paca(tiny_model("llama"), r=4, seed=2)
    sgd_steps(model, steps=1)
    calls = []
    original = paca_layer.effective_weight
    monkeypatch.setattr(paca_layer, "effective_weight", lambda *a: calls.append(1) or original(*a))
    sgd_steps(model, steps=2)  # a step after an optimizer update writes the new columns, compares nothing
    assert calls == []
