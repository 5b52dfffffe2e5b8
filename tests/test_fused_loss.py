"""The maintained fused loss kernels: which one runs where, and the same loss and gradients as leanft's own."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_batch, tiny_model

import leanft
from leanft.core.choices import select_loss_kernel
from leanft.core.chunked_loss import ChunkedLoss, chunked_causal_lm_loss
from leanft.core.errors import LeanftError
from leanft.run.config import load_config


def only(*names: str):
    return lambda package: package in names


@pytest.mark.parametrize(("requested", "device", "packages", "chosen"), [
    ("auto", "cuda", ("cut-cross-entropy", "liger-kernel"), "cut-cross-entropy"),
    ("auto", "cuda", ("liger-kernel",), "liger-kernel"),
    ("auto", "cuda", (), "leanft"),
    ("auto", "cpu", ("cut-cross-entropy", "liger-kernel"), "leanft"),  # its CPU path materialises the logits
    ("leanft", "cuda", ("cut-cross-entropy",), "leanft"),
    ("cut-cross-entropy", "cpu", ("cut-cross-entropy",), "cut-cross-entropy"),
    ("liger-kernel", "cuda", ("liger-kernel",), "liger-kernel"),
])  # fmt: skip
def test_the_kernel_is_chosen_by_device_and_what_is_installed(requested, device, packages, chosen):
    assert select_loss_kernel(requested, device, only(*packages)) == chosen


@pytest.mark.parametrize(("requested", "device", "packages", "message"), [
    ("cut-cross-entropy", "cuda", (), "pip install cut-cross-entropy"),
    ("liger-kernel", "cpu", ("liger-kernel",), "runs on CUDA only"),
    ("triton", "cuda", (), "loss_kernel must be one of auto, leanft, cut-cross-entropy, liger-kernel"),
])  # fmt: skip
def test_a_kernel_that_cannot_run_is_refused_in_one_line(requested, device, packages, message):
    with pytest.raises(LeanftError, match=message):
        select_loss_kernel(requested, device, only(*packages))


def test_a_head_with_a_bias_skips_cut_cross_entropy():
    both = only("cut-cross-entropy", "liger-kernel")
    assert select_loss_kernel("auto", "cuda", both, head_bias=True) == "liger-kernel"
    assert select_loss_kernel("auto", "cuda", only("cut-cross-entropy"), head_bias=True) == "leanft"
    with pytest.raises(LeanftError, match="does not take the output head's bias"):
        select_loss_kernel("cut-cross-entropy", "cuda", both, head_bias=True)


def test_the_train_config_checks_the_kernel_before_anything_loads():
    with pytest.raises(LeanftError, match="runs on CUDA only"):
        load_config(None, ["loss_kernel=liger-kernel"])
    assert load_config(None, []).loss_kernel == "auto"


def test_auto_on_this_cpu_keeps_leanfts_chunked_loss():
    assert ChunkedLoss(tiny_model("llama")).kernel == "leanft"


def test_cut_cross_entropy_gives_leanfts_loss_and_gradients_where_both_run():
    """On CPU cut-cross-entropy runs its torch.compile path; the loss and every gradient must match leanft's."""
    reference = leanft.apply_paca(tiny_model("llama"), r=4)
    model = copy.deepcopy(reference)
    batch = tiny_batch(batch=2, length=12)
    batch["labels"][0, :5] = -100  # a masked prompt
    expected = chunked_causal_lm_loss(reference, batch, num_items_in_batch=17)
    expected.backward()
    loss = chunked_causal_lm_loss(model, batch, num_items_in_batch=17, kernel="cut-cross-entropy")
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    wanted = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    actual = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert actual.keys() == wanted.keys() and wanted
    for name in wanted:
        torch.testing.assert_close(actual[name], wanted[name], rtol=1e-4, atol=1e-6, msg=name)
