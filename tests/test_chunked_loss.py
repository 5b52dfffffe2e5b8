"""Chunked linear cross-entropy: exact loss and gradients vs the model's own head + loss, no full logits, Trainer."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import peft
import pytest
import torch
import transformers
from conftest import DECODER, VOCAB, tiny_batch, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import ForCausalLMLoss

import leanft
from leanft.core.chunked_loss import chunked_causal_lm_loss, chunked_loss_problem, linear_cross_entropy
from leanft.run.trainer import LeanftTrainer, TrainerSettings

pytestmark = pytest.mark.usefixtures("one_thread")


def trainable(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter trained (so the tied head / embedding gradient is checked too)."""
    return model.requires_grad_(True)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma", "qwen3"])
def test_fp32_loss_and_gradients_equal_the_plain_head(arch):
    reference = trainable(tiny_model(arch))
    model = copy.deepcopy(reference)
    batch = tiny_batch()
    expected = reference(**batch).loss
    expected.backward()
    loss = chunked_causal_lm_loss(model, batch, chunk_size=5)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    actual, wanted = grads(model), grads(reference)
    assert actual.keys() == wanted.keys()
    for name in wanted:
        torch.testing.assert_close(actual[name], wanted[name], rtol=1e-5, atol=1e-6, msg=name)


def test_peft_lora_model_gives_the_same_loss_and_gradients():
    reference = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules="all-linear"))
    for name, param in reference.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model = copy.deepcopy(reference)
    batch = tiny_batch()
    expected = reference(**batch).loss
    expected.backward()
    loss = leanft.chunked_causal_lm_loss(model, batch)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    wanted = grads(reference)
    assert wanted
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, wanted[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_loss_and_gradients_match_the_plain_head_within_bf16_precision():
    reference = trainable(tiny_model("llama")).to(torch.bfloat16)
    model = copy.deepcopy(reference)
    batch = tiny_batch(batch=4, length=16)
    expected = reference(**batch).loss
    expected.backward()
    loss = chunked_causal_lm_loss(model, batch, chunk_size=7)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected.float(), rtol=1e-3, atol=1e-3)
    wanted = grads(reference)
    for name, grad in grads(model).items():
        scale = wanted[name].float().abs().max().item()
        torch.testing.assert_close(grad.float(), wanted[name].float(), rtol=0.05, atol=0.02 * scale, msg=name)


def test_autocast_runs_the_head_in_the_autocast_dtype():
    reference = tiny_model("llama")
    model = copy.deepcopy(reference)
    batch = tiny_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(**batch).loss
        loss = chunked_causal_lm_loss(model, batch)
    torch.testing.assert_close(loss, expected.float(), rtol=1e-3, atol=1e-3)


def test_sum_over_num_items_in_batch_like_transformers():
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 16, requires_grad=True)
    weight, bias = torch.randn(50, 16, requires_grad=True), torch.randn(50, requires_grad=True)
    labels = torch.randint(0, 50, (3, 10))
    labels[0, :4] = -100
    labels[2] = -100
    for items in (None, torch.tensor(37)):
        expected = ForCausalLMLoss(torch.nn.functional.linear(hidden, weight, bias), labels, 50, items)
        wanted = torch.autograd.grad(expected, (hidden, weight, bias))
        head = SimpleNamespace(weight=weight, bias=bias)  # any module holding the head's weight and bias
        loss = linear_cross_entropy(hidden, head, labels, num_items_in_batch=items, chunk_size=4)
        torch.testing.assert_close(loss, expected)
        for actual, want in zip(torch.autograd.grad(loss, (hidden, weight, bias)), wanted, strict=True):
            torch.testing.assert_close(actual, want, rtol=1e-5, atol=1e-6)
    everything_masked = torch.full_like(labels, -100)
    assert linear_cross_entropy(hidden, SimpleNamespace(weight=weight), everything_masked).isnan()  # mean of none


class LargestLogits(TorchDispatchMode):
    """Records the largest tensor whose last dimension is the vocabulary that any op produces (views of the head's
    weight, such as its transpose, left out)."""

    def __init__(self, head: torch.Tensor) -> None:
        super().__init__()
        self.head = head.untyped_storage().data_ptr()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.dim() >= 2
                and tensor.shape[-1] == VOCAB
                and tensor.untyped_storage().data_ptr() != self.head
            ):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_never_materialises_more_than_one_chunk_of_logits():
    model = leanft.apply_paca(tiny_model("llama"), r=4)
    batch = tiny_batch(batch=4, length=30)  # 120 tokens: no other tensor of the step ends in VOCAB (128) values
    head = model.get_output_embeddings().weight
    with LargestLogits(head) as plain:
        model(**batch).loss.backward()
    assert plain.largest >= 4 * 30 * VOCAB
    with LargestLogits(head) as chunked:
        chunked_causal_lm_loss(model, batch, chunk_size=8).backward()
    assert 0 < chunked.largest <= 8 * VOCAB


def test_dropbp_patterns_and_gradients_are_kept():
    reference = leanft.apply_paca(tiny_model("llama"), r=4, seed=3)
    model = copy.deepcopy(reference)
    ref_controller = leanft.apply_dropbp(reference, drop_rate=0.5, seed=7)
    controller = leanft.apply_dropbp(model, drop_rate=0.5, seed=7)
    for step in range(3):
        batch = tiny_batch(seed=step)
        expected = reference(**batch).loss
        expected.backward()
        loss = chunked_causal_lm_loss(model, batch, chunk_size=6)
        loss.backward()
        assert controller.step == ref_controller.step == step + 1
        assert controller.dropped == ref_controller.dropped
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    wanted = grads(reference)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, wanted[name], rtol=1e-5, atol=1e-6, msg=name)


def test_every_branch_dropped_still_gives_a_loss_to_call_backward_on():
    model = leanft.apply_paca(tiny_model("llama"), r=4)
    controller = leanft.apply_dropbp(model, drop_rate=0.5)
    with controller.forced([True] * len(controller.branches)):
        loss = chunked_causal_lm_loss(model, tiny_batch())
    loss.backward()
    assert all(p.grad is None for p in model.parameters())


def test_models_that_transform_their_logits_are_refused():
    assert chunked_loss_problem(tiny_model("llama")) is None
    config = transformers.Gemma2Config(num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0, **DECODER)
    softcapped = transformers.AutoModelForCausalLM.from_config(config)
    assert "after the head" in chunked_loss_problem(softcapped)


def test_trainer_with_chunked_loss_and_grad_accumulation_matches_the_plain_loss(tmp_path):
    features = [{key: value[0] for key, value in tiny_batch(batch=1, length=10 + i, seed=i).items()} for i in range(8)]

    def collate(rows):
        width = max(len(row["input_ids"]) for row in rows)
        pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}
        return {
            key: torch.stack(
                [torch.nn.functional.pad(row[key], (0, width - len(row[key])), value=fill) for row in rows]
            )
            for key, fill in pad.items()
        }

    def run(chunked: bool) -> tuple[list[float], torch.nn.Module]:
        model = leanft.apply_paca(tiny_model("llama"), r=4)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(chunked)),
            max_steps=2,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            remove_unused_columns=False,
            disable_tqdm=True,
            use_cpu=True,
        )
        trainer = LeanftTrainer(
            model=model, args=args, train_dataset=features, data_collator=collate,
            settings=TrainerSettings(chunked_loss=chunked),
        )
        assert (trainer.chunked is not None) == chunked
        trainer.train()
        return [log["loss"] for log in trainer.state.log_history if "loss" in log], model

    plain_losses, plain = run(False)
    chunked_losses, chunked = run(True)
    assert chunked_losses == pytest.approx(plain_losses, rel=1e-5)
    for (name, a), (_, b) in zip(plain.named_parameters(), chunked.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
