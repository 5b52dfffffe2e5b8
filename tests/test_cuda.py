"""The CUDA paths against their references: PaCA, S2FT, QPaCA, DropBP, the fused loss kernels, compiled
branches, a bf16 run with resume, and the bench's memory probes. Collected everywhere, run only with CUDA
(``pytest -m cuda``); ``make gpu-check`` runs them on a GPU machine."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
from conftest import full_weight_grad, tiny_batch, tiny_model
from safetensors.torch import load_file
from test_cli import InterruptAt, run_args
from test_compiled import counting_backend

import leanft
from leanft.cli import main
from leanft.core.choices import installed
from leanft.core.chunked_loss import ChunkedLoss, chunked_causal_lm_loss
from leanft.core.compiled import compile_branches
from leanft.core.packed import flatten_examples, packed_attention_mode
from leanft.run.config import load_config
from leanft.run.train import train
from leanft.studies.bench_worker import current_bytes, peak_bytes, reset_peak

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
MIB = 1 << 20
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # None: no autocast
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}  # relative (norm) error allowed against the reference


def on_cuda(batch: dict) -> dict:
    return {key: value.to(CUDA) for key, value in batch.items()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12))


def forward_backward(model: torch.nn.Module, batch: dict, dtype: torch.dtype | None) -> torch.Tensor:
    """The logits of one forward (under bf16 autocast when ``dtype`` is given), after its backward."""
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        output = model(**batch)
    output.loss.backward()
    return output.logits.detach()


def assert_columns_match_reference(model, reference, precision: str) -> None:
    """``model``'s trained columns (PaCA / S2FT, on CUDA) get the full-weight gradients of ``reference`` at those
    columns, and the same logits, within the precision's tolerance."""
    batch, dtype, tolerance = on_cuda(tiny_batch()), PRECISIONS[precision], TOLERANCE[precision]
    assert relative_error(forward_backward(model, batch, dtype), forward_backward(reference, batch, dtype)) < tolerance
    layers = leanft.paca_modules(model)
    assert layers
    for name, layer in layers.items():
        assert layer.paca_weight.device.type == "cuda" and layer.paca_weight.dtype == torch.float32
        expected = full_weight_grad(reference.get_submodule(name))[:, layer.paca_index]
        assert relative_error(layer.paca_weight.grad, expected) < tolerance, name


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_paca_on_cuda_gives_plain_autograds_logits_and_column_gradients(arch, precision):
    reference = tiny_model(arch).to(CUDA)
    model = leanft.apply_paca(copy.deepcopy(reference), r=4, seed=1)
    on_cpu = leanft.paca_modules(leanft.apply_paca(tiny_model(arch), r=4, seed=1))
    on_cuda_layers = leanft.paca_modules(model)
    assert on_cuda_layers.keys() == on_cpu.keys()  # the same columns as on the CPU for the same seed
    assert all(torch.equal(on_cuda_layers[name].paca_index.cpu(), layer.paca_index) for name, layer in on_cpu.items())
    assert_columns_match_reference(model, reference, precision)


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_s2ft_on_cuda_gives_plain_autograds_gradients(precision):
    reference = tiny_model("llama").to(CUDA)
    model = leanft.apply_s2ft(copy.deepcopy(reference), ffn=0.25, heads=0.5, seed=1)
    assert_columns_match_reference(model, reference, precision)


def test_paca_applied_on_cpu_then_moved_trains_and_merges_exactly_on_cuda():
    model = leanft.apply_paca(tiny_model("llama"), r=4, seed=0).to(CUDA)  # columns written in place on the CPU
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        model(**on_cuda(tiny_batch(seed=step))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    batch = on_cuda(tiny_batch(seed=9))
    with torch.no_grad():
        trained = model(**batch).logits
        merged = leanft.merge_paca(model)
        assert not leanft.paca_modules(merged)
        torch.testing.assert_close(merged(**batch).logits, trained, rtol=1e-5, atol=1e-5)


def test_qpaca_on_a_cuda_nf4_base_matches_its_dequantized_reference(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from leanft.core.quant import QPacaLinear, dequantize_module, is_linear4bit, quantization_config

    tiny_model("llama").save_pretrained(tmp_path)
    config = quantization_config("4bit", "cuda")
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cuda")
    reference = tiny_model("llama").to(CUDA)
    for name, module in quantized.named_modules():
        if is_linear4bit(module):
            reference.get_submodule(name).weight.data = dequantize_module(module, torch.float32).clone()
    model = leanft.apply_paca(quantized.train(), r=4, seed=1)
    assert all(isinstance(layer, QPacaLinear) for layer in leanft.paca_modules(model).values())
    assert_columns_match_reference(model, reference, "fp32")


def test_dropbp_on_cuda_draws_the_cpu_patterns_and_remove_restores_the_model():
    cpu_model, cuda_model = tiny_model("llama"), tiny_model("llama").to(CUDA)
    cpu_ctrl = leanft.apply_dropbp(cpu_model, drop_rate=0.5, seed=3)
    cuda_ctrl = leanft.apply_dropbp(cuda_model, drop_rate=0.5, seed=3)
    assert [cuda_ctrl.sample(step) for step in range(20)] == [cpu_ctrl.sample(step) for step in range(20)]
    batch = on_cuda(tiny_batch())
    with torch.no_grad():
        before = tiny_model("llama").to(CUDA)(**batch).logits
    pattern = [True, False] * (len(cuda_ctrl.branches) // 2)
    with cuda_ctrl.forced(pattern):
        cuda_model(**batch).loss.backward()
    for dropped, branch in zip(pattern, cuda_ctrl.branches, strict=True):
        grads = [p.grad for module in branch.modules for p in module.parameters()]
        assert grads and all((grad is None) == dropped for grad in grads)
    cuda_ctrl.remove()
    assert all("forward" not in module.__dict__ for branch in cuda_ctrl.branches for module in branch.modules)
    with torch.no_grad():
        torch.testing.assert_close(cuda_model(**batch).logits, before, rtol=1e-5, atol=1e-5)


def test_the_allocation_runs_on_cuda_and_keeps_the_budget():
    model = leanft.apply_paca(tiny_model("llama"), r=4).to(CUDA)
    controller = leanft.apply_dropbp(model, drop_rate=0.5, seed=0)
    rates = leanft.allocate_rates(controller, on_cuda(tiny_batch(batch=4)))
    assert controller.rates == rates and controller.sensitivities is not None and len(set(rates)) > 1
    flops = [branch.flops for branch in controller.branches]
    assert 0.5 <= controller.expected_drop_fraction() <= 0.5 + 0.1 * max(flops) / sum(flops) + 1e-9


def test_auto_picks_cut_cross_entropy_on_cuda_else_liger():
    wanted = next((name for name in ("cut-cross-entropy", "liger-kernel") if installed(name)), None)
    if wanted is None:
        pytest.skip("neither cut-cross-entropy nor liger-kernel is installed")
    assert ChunkedLoss(tiny_model("llama").to(CUDA)).kernel == wanted


@pytest.mark.parametrize("kernel", ["cut-cross-entropy", "liger-kernel"])
def test_each_fused_kernel_gives_leanfts_loss_and_gradients_in_bf16(kernel):
    if not installed(kernel):
        pytest.skip(f"{kernel} is not installed")
    reference = leanft.apply_paca(tiny_model("llama"), r=4).to(CUDA)
    model = copy.deepcopy(reference)
    batch = on_cuda(tiny_batch(batch=2, length=12))
    batch["labels"][0, :5] = -100
    losses = []
    for candidate, name in ((reference, "leanft"), (model, kernel)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = chunked_causal_lm_loss(candidate, batch, num_items_in_batch=17, kernel=name)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-3)
    wanted = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    actual = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert actual.keys() == wanted.keys() and wanted
    for name in wanted:
        torch.testing.assert_close(actual[name], wanted[name], rtol=1e-3, atol=1e-3, msg=name)


def test_compiled_branches_on_cuda_compile_a_bounded_number_of_graphs():
    torch._dynamo.reset()
    counter = Counter()
    model = leanft.apply_paca(tiny_model("llama"), r=4).to(CUDA)
    assert compile_branches(model, backend=counting_backend(counter)) == 4
    controller = leanft.apply_dropbp(model, 0.5, seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    counts, patterns = {}, set()
    for step in range(50):
        model(**on_cuda(tiny_batch(seed=step % 3, length=10 + step % 4))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        patterns.add(tuple(controller.dropped))
        counts[step] = counter["graphs"]
    assert len(patterns) > 8 and counts[49] == counts[20] and counts[49] <= 32


def test_a_padding_free_row_keeps_examples_apart_on_cuda():
    model = tiny_model("llama").to(CUDA).eval()
    assert packed_attention_mode(model) is not None
    first, second = [5, 9, 14, 3], [7, 21, 8]
    row = on_cuda(flatten_examples([{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}]))
    row.pop("labels")
    with torch.no_grad():
        packed = model(**row, use_cache=False).logits[0, len(first) :]
        alone = model(input_ids=torch.tensor([second], device=CUDA)).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


def test_a_bf16_run_on_cuda_says_so_and_resumes_exactly(model_dir, data_file, tmp_path):
    keys = ("bf16=auto", "dropbp.rate=0.5", "dropbp.allocate_at=0.34")
    assert main(run_args(model_dir, data_file, tmp_path / "straight", *keys)) == 0
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert straight["precision"].startswith("bf16")
    interrupted = load_config(None, run_args(model_dir, data_file, tmp_path / "resumed", *keys)[1:])
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, callbacks=[InterruptAt(4)])
    assert main(run_args(model_dir, data_file, tmp_path / "resumed", *keys, "resume=true")) == 0
    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert resumed["dropbp_rates"] == straight["dropbp_rates"]
    expected = load_file(tmp_path / "straight" / "adapter" / "paca_adapter.safetensors")
    actual = load_file(tmp_path / "resumed" / "adapter" / "paca_adapter.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_the_bench_memory_probes_read_the_cuda_allocator():
    reset_peak("cuda")
    before = current_bytes("cuda")
    block = torch.ones(64 * MIB // 4, device=CUDA)
    del block
    assert peak_bytes("cuda") >= before + 64 * MIB
    reset_peak("cuda")
    assert peak_bytes("cuda") < before + 32 * MIB
