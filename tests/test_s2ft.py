"""S2FT against plain autograd: the selection, exact gradients on three architectures, merge, save and load."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_batch, tiny_model

import leanft
from leanft.core.errors import LeanftError
from leanft.core.s2ft import apply_s2ft, s2ft_columns

OUTPUT_PROJECTIONS = {  # what S2FT trains in each architecture: the attention output and the MLP down projection
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "phi3": ("self_attn.o_proj", "mlp.down_proj"),  # registers o_proj before qkv_proj
    "opt": ("self_attn.out_proj", "fc2"),  # q, k, v and out_proj all write the hidden size
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
}


def _weight_grad(module: torch.nn.Module) -> torch.Tensor:
    """The gradient of a plain linear's weight as out x in (GPT-2's Conv1D stores in x out)."""
    grad = module.weight.grad
    return grad.t() if type(module).__name__ == "Conv1D" else grad


@pytest.mark.parametrize("arch", sorted(OUTPUT_PROJECTIONS))
def test_selection_trains_the_output_projections_in_head_blocks_and_channels(arch):
    model = tiny_model(arch)
    columns = s2ft_columns(model, ffn=0.25, heads=0.5, seed=3)
    attn_suffix, mlp_suffix = OUTPUT_PROJECTIONS[arch]
    attn = {n: c for n, c in columns.items() if n.endswith(attn_suffix)}
    mlp = {n: c for n, c in columns.items() if n.endswith(mlp_suffix)}
    assert set(columns) == set(attn) | set(mlp) and attn and mlp
    head_dim = 32 // 4  # tiny models: hidden 32, 4 heads
    assert sum(c.numel() for c in attn.values()) == int(0.5 * 2 * 4) * head_dim  # int(ratio * pool) heads
    for index in attn.values():  # whole heads: blocks of head_dim consecutive columns starting at a head boundary
        blocks = index.view(-1, head_dim)
        assert torch.equal(blocks - blocks[:, :1], torch.arange(head_dim).expand_as(blocks))
        assert (blocks[:, 0] % head_dim == 0).all()
    width = model.get_submodule(next(iter(mlp))).weight.shape  # the down projection's input width
    channels = width[0] if arch == "gpt2" else width[1]
    assert sum(c.numel() for c in mlp.values()) == int(0.25 * 2 * channels)
    again = s2ft_columns(tiny_model(arch), ffn=0.25, heads=0.5, seed=3)
    assert all(torch.equal(again[n], columns[n]) for n in columns)  # the seed fixes the selection
    other = s2ft_columns(model, ffn=0.25, heads=0.5, seed=4)
    assert any(n not in other or not torch.equal(other[n], columns[n]) for n in columns)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_s2ft_gradients_equal_the_selected_slices_of_the_full_gradients(arch, batch):
    reference = tiny_model(arch).requires_grad_(True)
    model = apply_s2ft(copy.deepcopy(reference), ffn=0.2, heads=0.5, seed=1)
    columns = {name: layer.paca_index for name, layer in leanft.paca_modules(model).items()}
    loss = model(**batch).loss
    expected_loss = reference(**batch).loss
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)  # untrained S2FT is the base model exactly
    loss.backward()
    expected_loss.backward()
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert sorted(trainable) == sorted(f"{name}.paca_weight" for name in columns)
    for name, index in columns.items():
        wanted = _weight_grad(reference.get_submodule(name))[:, index]
        got = model.get_submodule(name).paca_weight.grad
        torch.testing.assert_close(got, wanted, rtol=1e-5, atol=1e-6, msg=name)


def _train(model: torch.nn.Module, steps: int = 3) -> torch.nn.Module:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        model(**tiny_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_merge_is_exact_and_changes_only_the_selected_columns(batch):
    base = tiny_model("llama")
    trained = _train(apply_s2ft(copy.deepcopy(base), ffn=0.2, heads=0.25, seed=0))
    columns = {name: layer.paca_index.clone() for name, layer in leanft.paca_modules(trained).items()}
    with torch.no_grad():
        expected = trained(**batch).logits
    merged = leanft.merge_paca(trained)
    assert not leanft.paca_modules(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=0)
    for name, index in columns.items():
        new, old = merged.get_submodule(name).weight, base.get_submodule(name).weight
        kept = torch.ones(new.shape[1], dtype=torch.bool)
        kept[index] = False
        assert torch.equal(new[:, kept], old[:, kept]) and not torch.equal(new[:, index], old[:, index])


def test_save_and_load_give_the_trained_model_back_with_per_layer_column_counts(batch, tmp_path):
    trained = _train(apply_s2ft(tiny_model("qwen2"), ffn=0.3, heads=0.25, seed=2))
    counts = {layer.r for layer in leanft.paca_modules(trained).values()}
    assert len(counts) > 1  # layers train different numbers of columns: what load must restore
    leanft.save_paca(trained, tmp_path / "adapter")
    loaded = leanft.load_paca(tiny_model("qwen2"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trained(**batch).logits, rtol=0, atol=0)


def test_bad_ratios_are_refused_before_the_model_changes():
    model = tiny_model("llama")
    with pytest.raises(LeanftError, match="s2ft.ffn must be in"):
        apply_s2ft(model, ffn=1.5)
    with pytest.raises(LeanftError, match="select no channel or head"):
        apply_s2ft(model, ffn=0.001, heads=0.0)
    assert all(p.requires_grad for p in model.parameters()) and not leanft.paca_modules(model)
