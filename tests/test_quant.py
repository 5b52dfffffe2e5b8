"""QPaCA / QLoRA on a bitsandbytes 4-bit base (CPU): gradients vs the dequantized-weight reference, merge, errors."""

from __future__ import annotations

import importlib.util
import json

import peft
import pytest
import torch
from conftest import assert_paca_matches_reference, save_tiny_llama, tiny_batch, tiny_model
from test_cli import run_args
from transformers import AutoModelForCausalLM

import leanft
from leanft.cli import main
from leanft.core.errors import LeanftError
from leanft.core.quant import (
    QPacaLinear,
    dequantize_module,
    is_linear4bit,
    is_quantized,
    keep_4bit_layout,
    quantization_config,
)
from leanft.run.config import load_config
from leanft.run.methods import METHODS, MethodSettings, attach_method
from leanft.run.models import load_model_and_tokenizer
from leanft.studies.memory import SavedTensorMeter

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("bitsandbytes")


def quantized_pair(arch: str, folder) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(tiny ``arch`` model loaded in nf4, the same model with every 4-bit weight replaced by its dequantized copy)."""
    tiny_model(arch).save_pretrained(folder)
    config = quantization_config("4bit", "cpu")
    quantized = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu").train()
    reference = tiny_model(arch)
    for name, module in quantized.named_modules():
        if is_linear4bit(module):
            reference.get_submodule(name).weight.data = dequantize_module(module, torch.float32).clone()
    return quantized, reference


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_qpaca_gradients_equal_the_dequantized_weight_reference(arch, tmp_path):
    quantized, reference = quantized_pair(arch, tmp_path)
    model = leanft.apply_paca(quantized, r=4, seed=1)
    layers = leanft.paca_modules(model)
    assert layers and all(isinstance(layer, QPacaLinear) for layer in layers.values())
    assert not any(is_linear4bit(module) for module in model.modules())
    assert all(layer.paca_weight.dtype == torch.float32 for layer in layers.values())
    reference.requires_grad_(True)
    assert_paca_matches_reference(model, reference)

def test_qpaca_saves_what_paca_saves_and_no_dequantized_weight(tmp_path):
    quantized, reference = quantized_pair("llama", tmp_path)
    model = leanft.apply_paca(quantized, r=4, seed=1)
    dense = leanft.apply_paca(reference, r=4, seed=1)
    batch = tiny_batch()
    with SavedTensorMeter(model) as q_meter:
        model(**batch).loss.backward()
    with SavedTensorMeter(dense) as d_meter:
        dense(**batch).loss.backward()
    assert q_meter.bytes == d_meter.bytes  # x[..., idx] per layer, never a dequantized copy of W


def test_qpaca_trains_then_merges_into_the_same_full_precision_model(tmp_path):
    quantized, _ = quantized_pair("llama", tmp_path)
    model = attach_method(quantized, "paca", MethodSettings(r=4))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        model(**tiny_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    batch = tiny_batch(seed=9)
    with torch.no_grad():
        trained = model(**batch).logits
        leanft.save_paca(model, tmp_path / "adapter")
        plain = METHODS["paca"].merge(model)
        torch.testing.assert_close(plain(**batch).logits, trained, rtol=1e-5, atol=1e-6)
    assert not is_quantized(plain) and getattr(plain, "hf_quantizer", None) is None
    assert all(p.dtype == torch.float32 for p in plain.parameters())

    reloaded = leanft.load_paca(quantized_pair("llama", tmp_path / "again")[0], tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained, rtol=1e-5, atol=1e-6)


def test_remove_and_disable_give_back_the_4bit_model(tmp_path):
    quantized, _ = quantized_pair("llama", tmp_path)
    batch = tiny_batch()
    with torch.no_grad():
        before = quantized(**batch).logits
        model = leanft.apply_paca(quantized, r=4)
        for layer in leanft.paca_modules(model).values():
            layer.paca_weight.add_(0.1)
        with leanft.paca_disabled(model):
            torch.testing.assert_close(model(**batch).logits, before, rtol=1e-5, atol=1e-6)
        leanft.remove_paca(model)
        assert is_quantized(model)
        torch.testing.assert_close(model(**batch).logits, before, rtol=1e-5, atol=1e-6)


def test_qpaca_with_dropbp_drops_branches(tmp_path):
    quantized, _ = quantized_pair("llama", tmp_path)
    model = leanft.apply_paca(quantized, r=4)
    controller = leanft.apply_dropbp(model, drop_rate=0.5)
    pattern = [True, False] * (len(controller.branches) // 2)
    with controller.forced(pattern):
        model(**tiny_batch()).loss.backward()
    for dropped, branch in zip(pattern, controller.branches, strict=True):
        grads = [p.grad for m in branch.modules for p in m.parameters() if p.requires_grad]
        assert grads and all((g is None) == dropped for g in grads)


def test_qlora_merge_is_full_precision_and_exact(tmp_path):
    quantized, _ = quantized_pair("llama", tmp_path)
    model = attach_method(quantized, "lora", MethodSettings(r=4))
    assert isinstance(model, peft.PeftModel)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    batch = tiny_batch()
    with torch.no_grad():
        trained = model(**batch).logits
        plain = METHODS["lora"].merge(model)
        torch.testing.assert_close(plain(**batch).logits, trained, rtol=1e-4, atol=1e-5)
    assert not is_quantized(plain) and getattr(plain, "hf_quantizer", None) is None


def test_full_fine_tuning_of_a_4bit_base_is_refused(tmp_path):
    quantized, _ = quantized_pair("llama", tmp_path)
    with pytest.raises(LeanftError, match="method=paca"):
        attach_method(quantized, "full", MethodSettings(r=4))
    with pytest.raises(LeanftError, match="method=paca"):
        load_config(None, ["quantize=4bit", "method=full"])
    with pytest.raises(LeanftError, match="quantize must be"):
        load_config(None, ["quantize=8bit"])
    assert load_config(None, ["quantize=none"]).quantize is None


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    hidden = lambda name, *args: None if name == "bitsandbytes" else real(name, *args)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    with pytest.raises(LeanftError, match="needs bitsandbytes"):
        load_config(None, ["quantize=4bit"])
    with pytest.raises(LeanftError, match="needs bitsandbytes"):
        quantization_config("4bit", "cpu")


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """A tiny Llama whose widths are multiples of 64, as bitsandbytes' CPU inference kernels need."""
    folder = tmp_path_factory.mktemp("wide_model")
    save_tiny_llama(folder, hidden_size=64, intermediate_size=128)
    return folder


def test_loader_keeps_the_4bit_layout_and_qpaca_unpacks_a_repacked_model(wide_model_dir):
    """bitsandbytes repacks 4-bit weights (scales rounded to bf16) in eval forwards on AVX512-BF16 CPUs."""
    model, _ = load_model_and_tokenizer(wide_model_dir, device="cpu", quantize="4bit")
    batch = tiny_batch()
    with torch.no_grad():
        expected = model.train()(**batch).logits
        torch.testing.assert_close(model.eval()(**batch).logits, expected)  # not repacked: same numbers
    for module in model.modules():
        if is_linear4bit(module):
            module.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on such CPUs
    with torch.no_grad():
        model.eval()(**batch)
    states = [m.weight.quant_state for m in model.modules() if is_linear4bit(m)]
    if not any(getattr(state, "packing_format_for_cpu", False) for state in states):
        pytest.skip("bitsandbytes does not repack on this CPU")
    model = leanft.apply_paca(model.train(), r=4)
    out = model(**batch)
    torch.testing.assert_close(out.logits, expected, rtol=0.05, atol=0.01)  # scales now rounded to bf16
    out.loss.backward()
    assert all(layer.paca_weight.grad is not None for layer in leanft.paca_modules(model).values())


@pytest.mark.parametrize("method", ["paca", "lora"])
def test_train_quantize_4bit_with_dropbp(method, wide_model_dir, data_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    quick = ["max_steps=2", "save_steps=2", "num_eval=2", "max_new_tokens=2", "dropbp.allocate_at=null"]
    args = run_args(wide_model_dir, data_file, run_dir, f"method={method}", "quantize=4bit", "dropbp.rate=0.5", *quick)
    assert main(args) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == method
    losses = [
        json.loads(line)["loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert losses and all(loss == loss for loss in losses)  # finite, logged
    out_dir = tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", str(run_dir), str(out_dir)]) == 0
    assert "lossy" in capsys.readouterr().out
    plain = AutoModelForCausalLM.from_pretrained(out_dir)
    assert not any(is_linear4bit(m) for m in plain.modules()) and "quantization_config" not in plain.config.to_dict()
    # the peft LoRA adapter (QPaCA converted, QLoRA as trained) on the 4-bit base gives the merged model's logits
    assert main(["export", str(run_dir), str(tmp_path / "adapter"), "format=peft-lora"]) == 0
    assert "applies to the base loaded in 4 bits" in capsys.readouterr().out
    base = AutoModelForCausalLM.from_pretrained(wide_model_dir, quantization_config=quantization_config("4bit", "cpu"),
                                                device_map="cpu")
    loaded = peft.PeftModel.from_pretrained(keep_4bit_layout(base), str(tmp_path / "adapter")).eval()
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, plain.eval()(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_eval_of_a_base_model_honours_quantize(wide_model_dir, data_file, capsys):
    common = ["eval", f"model={wide_model_dir}", f"data={data_file}", "num_eval=2", "max_new_tokens=2"]
    assert main(common) == 0
    full = json.loads(capsys.readouterr().out)
    assert main([*common, "quantize=4bit"]) == 0
    quantized = json.loads(capsys.readouterr().out)
    assert quantized["loss"] != full["loss"] and abs(quantized["loss"] - full["loss"]) < 0.1 * full["loss"]
