"""PaCA against plain-PyTorch autograd on identical models, and against peft LoRA for memory."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import ARCHITECTURES, assert_paca_matches_reference, tiny_batch, tiny_model
from torch import nn

import leanft
from leanft.core.paca_layer import PacaLinear, PacaMatmul
from leanft.studies.memory import SavedTensorMeter

PACA_ARCHS = ["llama", "gpt2", "opt", "gpt_neox", "qwen3"]


def train_a_little(model: nn.Module, steps: int = 3, lr: float = 0.05) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        model(**tiny_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("arch", PACA_ARCHS)
def test_gradients_equal_full_weight_columns(arch):
    reference = tiny_model(arch)
    model = leanft.apply_paca(copy.deepcopy(reference), r=4, seed=1)
    layers = assert_paca_matches_reference(model, reference)
    assert all(isinstance(m, PacaLinear) for m in layers.values())


def test_all_linear_skips_lm_head_and_indices_are_r_distinct_columns():
    model = leanft.apply_paca(tiny_model("llama"), r=5)
    names = set(leanft.paca_modules(model))
    assert "lm_head" not in names and len(names) == 2 * 7
    for layer in leanft.paca_modules(model).values():
        assert layer.paca_index.dtype == torch.long and layer.paca_index.unique().numel() == 5
        assert layer.paca_weight.shape == (layer.out_features, 5)


def test_target_modules_suffixes_and_regex():
    by_suffix = leanft.apply_paca(tiny_model("llama"), r=2, target_modules=["q_proj", "v_proj"])
    assert sorted({n.rsplit(".", 1)[1] for n in leanft.paca_modules(by_suffix)}) == ["q_proj", "v_proj"]
    by_regex = leanft.apply_paca(tiny_model("llama"), r=2, target_modules=r".*\.0\.mlp\..*")
    assert sorted(leanft.paca_modules(by_regex)) == [
        f"model.layers.0.mlp.{n}" for n in ("down_proj", "gate_proj", "up_proj")
    ]


def test_saves_only_selected_input_columns_for_backward():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = PacaLinear(linear.weight.data, linear.bias.data, torch.arange(0, 64, 8), "linear")
    x = torch.randn(3, 5, 7, 64, requires_grad=True)
    with SavedTensorMeter(layer) as meter:
        layer(x)
    assert meter.bytes == 3 * 5 * 7 * 8 * 4  # x[..., idx] in fp32, nothing else


def test_custom_function_matches_autograd_with_leading_dims_and_bias():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 16, dtype=torch.float64)
    index = torch.tensor([1, 5, 9])
    paca = weight[:, index].clone().requires_grad_(True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, p, b: PacaMatmul.apply(a, p, weight, index, b), (x, paca, bias))


def test_merge_matches_trained_model_and_gives_plain_modules():
    for arch in ("llama", "gpt2"):
        model = leanft.apply_paca(tiny_model(arch), r=4)
        train_a_little(model)
        batch = tiny_batch(seed=9)
        expected = model(**batch).logits
        original_type = type(tiny_model(arch).get_submodule(next(iter(leanft.paca_modules(model)))))
        leanft.merge_paca(model)
        assert not leanft.paca_modules(model)
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-6)
        first = next(m for m in model.modules() if type(m) is original_type)
        assert type(first) in (nn.Linear, original_type)


def test_save_load_on_fresh_model_gives_same_logits(tmp_path):
    model = leanft.apply_paca(tiny_model("llama"), r=4, seed=3)
    train_a_little(model)
    batch = tiny_batch(seed=5)
    expected = model(**batch).logits
    leanft.save_paca(model, tmp_path / "adapter")
    fresh = leanft.load_paca(tiny_model("llama"), tmp_path / "adapter")
    torch.testing.assert_close(fresh(**batch).logits, expected, rtol=0, atol=0)
    for name, layer in leanft.paca_modules(fresh).items():
        assert torch.equal(layer.paca_index, leanft.paca_modules(model)[name].paca_index)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["paca_adapter.safetensors", "paca_config.json"]


def test_original_weights_kept_exact_for_disable_and_remove():
    base = tiny_model("gpt2")
    batch = tiny_batch()
    base_logits = base(**batch).logits
    model = leanft.apply_paca(copy.deepcopy(base), r=4)
    train_a_little(model)
    assert not torch.equal(model(**batch).logits, base_logits)
    with leanft.paca_disabled(model):
        torch.testing.assert_close(model(**batch).logits, base_logits, rtol=0, atol=0)
    leanft.remove_paca(model)
    torch.testing.assert_close(model(**batch).logits, base_logits, rtol=0, atol=0)
    assert model.state_dict().keys() == base.state_dict().keys()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_match_reference(dtype):
    reference = tiny_model("llama").to(dtype)
    model = leanft.apply_paca(copy.deepcopy(reference), r=4)
    batch = tiny_batch()
    ref_loss, loss = reference(**batch).loss, model(**batch).loss
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    ref_loss.backward()
    loss.backward()
    for name, layer in leanft.paca_modules(model).items():
        assert layer.paca_weight.dtype == dtype
        expected = reference.get_submodule(name).weight.grad[:, layer.paca_index]
        torch.testing.assert_close(layer.paca_weight.grad, expected, rtol=2e-2, atol=1e-3)


def test_autocast_bf16_on_cpu_trains_fp32_columns():
    model = leanft.apply_paca(tiny_model("llama"), r=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**tiny_batch()).loss
    loss.backward()
    layer = next(iter(leanft.paca_modules(model).values()))
    assert layer.paca_weight.dtype == torch.float32 and layer.paca_weight.grad.abs().sum() > 0


def test_saves_less_for_backward_than_peft_lora_of_same_rank():
    batch = tiny_batch(batch=4, length=32)
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules="all-linear"))
    paca = leanft.apply_paca(tiny_model("llama"), r=4)
    measured = {}
    for name, model in (("lora", lora), ("paca", paca)):
        with SavedTensorMeter(model) as meter:
            loss = model(**batch).loss
        loss.backward()
        measured[name] = meter.bytes
    assert measured["paca"] < 0.9 * measured["lora"], measured


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "positive integer"),
        ({"r": 33}, "exceeds the input width"),
        ({"r": 2.5}, "positive integer"),
        ({"target_modules": ["nonexistent"]}, "matched no linear layer"),
        ({"target_modules": "([unclosed"}, "not a valid regex"),
        ({"target_modules": 7}, "target_modules must be"),
        ({"columns": "magic"}, "columns must be"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    with pytest.raises(leanft.LeanftError, match=message):
        leanft.apply_paca(tiny_model("llama"), **({"r": 4} | kwargs))


def test_load_rejects_a_folder_without_adapter(tmp_path):
    with pytest.raises(leanft.LeanftError, match="no paca_adapter"):
        leanft.load_paca(tiny_model("llama"), tmp_path)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_applies_to_every_supported_architecture(arch):
    model = leanft.apply_paca(tiny_model(arch), r=2)
    model(**tiny_batch()).loss.backward()
    grads = [m.paca_weight.grad for m in leanft.paca_modules(model).values()]
    assert grads and all(g is not None for g in grads)


def test_the_default_r_shrinks_to_a_narrow_model_and_a_given_wider_r_is_refused():
    from leanft.core.paca import paca_modules
    from leanft.run.config import load_config
    from leanft.run.methods import attach_method

    model = tiny_model("llama")  # input widths 32 (hidden) and 64 (MLP)
    default = load_config(overrides=["method=paca"])
    assert default.rank() > 32
    attach_method(model, "paca", default.method_settings())
    assert {module.r for module in paca_modules(model).values()} == {32}
    with pytest.raises(leanft.LeanftError, match="exceeds the input width 32"):
        attach_method(tiny_model("llama"), "paca", load_config(overrides=["method=paca", "r=48"]).method_settings())


def test_a_recorded_default_r_still_fits_and_a_given_r_does_not():
    from leanft.core.paca import paca_modules
    from leanft.run.config import load_config
    from leanft.run.methods import attach_method

    recorded = load_config(overrides=["method=paca"]).resolved()  # r written in, as a run folder records it
    assert recorded.r is not None and recorded.method_settings().fit_r
    attach_method(model := tiny_model("llama"), "paca", recorded.method_settings())
    assert {module.r for module in paca_modules(model).values()} == {32}
    preference = ("objective=dpo", "data=builtin:prefs-arith")  # its own default r, recorded the same way
    assert load_config(overrides=["method=paca", *preference]).resolved().method_settings().fit_r
    assert not load_config(overrides=["method=paca", "r=48"]).method_settings().fit_r
