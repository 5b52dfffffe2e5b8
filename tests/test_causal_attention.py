"""leanft's bf16 CPU causal attention: the same outputs and gradients as SDPA in fp32, grouped heads included,
and the one a padding-free bf16 row uses, with the loss and gradients it gets through SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model

from leanft.core import causal_attention, packed
from leanft.core.packed import flatten_examples, varlen_sdpa

pytestmark = pytest.mark.usefixtures("one_thread")


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("heads, kv_heads, length", [(4, 4, 2), (6, 2, 17), (9, 3, 130)])
def test_outputs_and_gradients_equal_fp32_sdpa(heads, kv_heads, length):
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, n, length, 16, generator=generator) for n in (heads, kv_heads, kv_heads))
    grad = torch.randn(1, length, heads, 16, generator=generator)
    inputs = [t.clone().requires_grad_() for t in (query, key, value)]
    expected = F.scaled_dot_product_attention(*inputs, is_causal=True, enable_gqa=True, scale=0.3).transpose(1, 2)
    expected.backward(grad)
    ours = [t.bfloat16().requires_grad_() for t in (query, key, value)]
    assert causal_attention.fits(*ours)
    output = causal_attention.causal_attention(*ours, scale=0.3)
    output.backward(grad.bfloat16())
    assert output.shape == expected.shape and output.dtype == torch.bfloat16
    assert relative_error(output, expected) < 2e-2
    for mine, reference in zip(ours, inputs, strict=True):
        assert relative_error(mine.grad, reference.grad) < 2e-2


def test_serves_only_short_bf16_cpu_attention_without_dropout():
    def qkv(length=8, dtype=torch.bfloat16):
        return [torch.zeros(1, 4, length, 8, dtype=dtype), *(torch.zeros(1, 2, length, 8, dtype=dtype),) * 2]

    assert causal_attention.fits(*qkv())
    assert not causal_attention.fits(*qkv(dtype=torch.float32))
    assert not causal_attention.fits(*qkv(length=causal_attention.MAX_LENGTH + 1))
    assert not causal_attention.fits(*qkv(), dropout=0.1)
    assert not causal_attention.fits(*qkv(), softcap=30.0)


def test_a_bf16_padding_free_row_uses_it_with_sdpas_loss_and_gradients(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    features = [{"input_ids": ids, "labels": ids} for ids in
                (torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (9, 14, 6))]
    row = flatten_examples(features)

    def loss_and_grads(model):
        with varlen_sdpa(model):
            loss = model(**row, use_cache=False).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    original = causal_attention.causal_attention
    monkeypatch.setattr(causal_attention, "causal_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    loss, grads = loss_and_grads(tiny_model("llama").to(torch.bfloat16))
    layers = tiny_model("llama").config.num_hidden_layers
    assert len(calls) == layers * len(features)
    monkeypatch.setattr(packed.causal_attention, "fits", lambda *a, **k: False)  # SDPA's fused kernel instead
    expected_loss, expected_grads = loss_and_grads(tiny_model("llama").to(torch.bfloat16))
    assert len(calls) == layers * len(features)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-2, atol=1e-2)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert relative_error(grad, expected_grads[name]) < 5e-2, name
