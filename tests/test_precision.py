"""bf16 compute: a bf16 frozen base, fp32 master copies of what trains, exact against a bf16 reference."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import full_weight_grad, tiny_batch, tiny_model
from safetensors.torch import load_file
from test_cli import run_args

import leanft
from leanft.cli import main
from leanft.core.compat import cpu_has_bf16_matmul
from leanft.core.precision import bf16_supported, trainable_in_fp32


def test_cpu_detection_follows_pytorchs_own_and_no_gpu_means_no_cuda_bf16():
    assert bf16_supported("cpu") == cpu_has_bf16_matmul()
    assert bf16_supported("cuda") == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def test_paca_in_bf16_with_fp32_columns_matches_a_bf16_reference():
    """The forward equals the bf16 model's; each column's gradient equals the bf16 reference weight's gradient."""
    reference = tiny_model("llama").to(torch.bfloat16)
    model = trainable_in_fp32(leanft.apply_paca(copy.deepcopy(reference), r=4))
    layers = leanft.paca_modules(model)
    assert all(layer.weight.dtype == torch.bfloat16 and layer.paca_weight.dtype == torch.float32
               for layer in layers.values())
    for name, param in reference.named_parameters():
        param.requires_grad_(name in {f"{layer}.weight" for layer in layers})
    batch = tiny_batch()
    with torch.autocast("cpu", torch.bfloat16):
        expected, actual = reference(**batch), model(**batch)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    expected.loss.backward()
    actual.loss.backward()
    for name, layer in layers.items():
        wanted = full_weight_grad(reference.get_submodule(name))[:, layer.paca_index].float()
        assert layer.paca_weight.grad.dtype == torch.float32
        torch.testing.assert_close(layer.paca_weight.grad, wanted, rtol=1e-2, atol=1e-3, msg=name)


def test_lora_on_a_bf16_base_trains_fp32_adapters():
    base = tiny_model("llama").to(torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear"))
    trainable_in_fp32(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert all(p.dtype == torch.bfloat16 for p in frozen)


@pytest.mark.parametrize("method", ["paca", "lora"])
def test_a_bf16_run_trains_fp32_columns_on_a_bf16_base_and_saves_them(model_dir, data_file, tmp_path, method):
    run_dir = tmp_path / "run"
    assert main(run_args(model_dir, data_file, run_dir, "bf16=true", f"method={method}", "lr=0.01")) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"]
    saved = next((run_dir / "adapter").glob("*.safetensors"))
    weights = [t for t in load_file(saved).values() if t.is_floating_point()]
    assert weights and all(t.dtype == torch.float32 for t in weights)


@pytest.mark.parametrize("setting", ["false", "auto"])
def test_bf16_false_keeps_the_fp32_path_and_auto_follows_the_hardware(model_dir, data_file, tmp_path, setting):
    from leanft.run.callbacks import TrainingClock
    from leanft.run.config import load_config
    from leanft.run.train import build_trainer, load_inputs

    config = load_config(None, run_args(model_dir, data_file, tmp_path / "run", f"bf16={setting}")[1:])
    inputs = load_inputs(config, tmp_path / "run")
    trainer = build_trainer(inputs, config, [], TrainingClock()).trainer
    on = setting == "auto" and bf16_supported("cpu")
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16 if on else torch.float32}
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    assert trainer.args.bf16 is on


def test_merge_writes_the_dtype_asked_for(model_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    assert main(run_args(model_dir, data_file, run_dir, "bf16=true", "max_steps=2", "lr=0.05")) == 0
    assert main(["merge", str(run_dir), str(tmp_path / "fp32")]) == 0
    assert main(["merge", str(run_dir), str(tmp_path / "bf16"), "dtype=bfloat16"]) == 0
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype="auto")
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(full.named_parameters(), half.named_parameters(), strict=True):
        torch.testing.assert_close(b, a.to(torch.bfloat16), rtol=0, atol=0, msg=name)
    from leanft.run.rundir import load_run

    tuned, _, _ = load_run(run_dir)  # the bf16 base the run trained on, with its columns
    assert {p.dtype for p in tuned.parameters() if not p.requires_grad} == {torch.bfloat16}
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(half(input_ids=ids).logits, tuned.eval()(input_ids=ids).logits, rtol=0, atol=0)
