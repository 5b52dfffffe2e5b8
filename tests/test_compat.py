"""The private APIs ``leanft.core.compat`` relies on, as the installed versions have them.

Each test fails when an upgrade of transformers, bitsandbytes or torch changes one of them.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_model
from transformers import Trainer

from leanft.core import compat

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_trainer_checkpoint_methods_keep_their_signatures():
    assert parameters(Trainer._save) == ["self", "output_dir", "state_dict"]
    assert parameters(Trainer._load_from_checkpoint) == ["self", "resume_from_checkpoint", "model"]
    assert parameters(Trainer._save_checkpoint) == ["self", "model", "trial"]
    assert parameters(Trainer._get_output_dir) == ["self", "trial"]
    source = inspect.getsource(Trainer)
    assert "self._save_checkpoint(" in source and "self._load_from_checkpoint(" in source
    assert "self._save(" in inspect.getsource(Trainer.save_model)


def test_trainer_checks_the_adapter_flag_of_a_quantized_model():
    source = inspect.getsource(transformers.trainer)
    assert "_hf_peft_config_loaded" in source or "_hf_peft_config_loaded" in inspect.getsource(
        transformers.integrations.peft
    )


def test_adapter_flag_is_set_inside_the_block_only():
    model = tiny_model()
    model.hf_quantizer = object()  # looks quantized
    with compat.accepted_as_adapter(model, has_adapter=True):
        assert model._hf_peft_config_loaded is True
    assert "_hf_peft_config_loaded" not in model.__dict__
    with compat.accepted_as_adapter(model, has_adapter=False):
        assert "_hf_peft_config_loaded" not in model.__dict__


def test_transformers_reads_the_distributed_loading_flag():
    model = tiny_model()
    assert model.is_distributed_loading_by_transformers is False  # the public property the Trainer reads
    compat.mark_distributed_loading(model)
    assert model.is_distributed_loading_by_transformers is True


def test_gradient_checkpointing_keeps_its_function_attribute():
    model = tiny_model()
    assert not list(compat.checkpointing_functions(model))
    model.gradient_checkpointing_enable()
    found = list(compat.checkpointing_functions(model))
    assert found and all(module.gradient_checkpointing for module, _ in found)
    module, function = found[0]
    compat.set_checkpointing_function(module, function)
    assert module._gradient_checkpointing_func is function


def test_bitsandbytes_cpu_unpacking_exists():
    functional = pytest.importorskip("bitsandbytes.functional")
    assert parameters(functional._convert_weight_packed_for_cpu_inverse)[:2] == ["packed_weight", "quant_state"]
    assert compat.unpack_4bit_for_cpu.__module__ == "leanft.core.compat"


def test_compiled_modules_keep_the_original():
    linear = torch.nn.Linear(2, 2)
    assert compat.uncompiled(torch.compile(linear)) is linear
    assert compat.uncompiled(linear) is linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_backward_is_what_autograd_gives_a_softmax(dtype):
    scores = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    grad = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1)).to(dtype)
    output = torch.softmax(scores, -1)
    output.backward(grad)
    torch.testing.assert_close(compat.softmax_backward(grad, output.detach(), -1), scores.grad)


def test_tensor_version_counts_in_place_writes_only():
    tensor = torch.zeros(3, 4)
    before = compat.tensor_version(tensor)
    tensor[:, 1:2].add_(1)  # through a view
    tensor.index_copy_(1, torch.tensor([0]), torch.ones(3, 1))
    assert compat.tensor_version(tensor) == before + 2
    tensor.clone().add_(1)
    assert compat.tensor_version(tensor) == before + 2


def test_cpu_bf16_detection_and_the_donated_buffer_switch_exist():
    import torch._functorch.config

    assert isinstance(compat.cpu_has_bf16_matmul(), bool) and isinstance(compat.cpu_has_amx_tiles(), bool)
    assert isinstance(torch._functorch.config.donated_buffer, bool)
    compat.allow_retained_graphs_in_compiled_code()
    assert torch._functorch.config.donated_buffer is False


def test_dpo_trainer_prepares_its_datasets_through_one_private_method():
    trl = pytest.importorskip("trl")
    assert parameters(trl.DPOTrainer._prepare_dataset) == ["self", "dataset", "processing_class", "args",
                                                            "dataset_name"]
    assert parameters(compat.PretokenizedPreferences._prepare_dataset) == parameters(trl.DPOTrainer._prepare_dataset)
    assert "self._prepare_dataset(" in inspect.getsource(trl.DPOTrainer.__init__)
    collator = trl.trainer.dpo_trainer.DataCollatorForPreference(pad_token_id=0)  # reads leanft's columns
    batch = collator([{"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 6, 8, 9]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 0], [0, 0, 1, 1]]


def test_pyproject_lower_bounds_are_the_tested_versions():
    """Each pinned dependency's lower bound is the installed (tested) version's major.minor."""
    text = PYPROJECT.read_text()
    for package in ("torch", "transformers", "peft", "accelerate", "safetensors"):
        bound = re.search(rf'"{package}>=([0-9.]+)"', text)
        assert bound, package
        installed = importlib.metadata.version(package).split("+")[0]
        assert installed.split(".")[:2] == bound.group(1).split(".")[:2], (package, installed, bound.group(1))


def _fused_log_probs_and_grad(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], labels=batch["labels"], fused_lm_head=True)
    (out.log_probs.sum() + out.entropy.sum()).backward()
    return out.log_probs.detach(), model.lm_head.weight.grad.clone()


def test_smaller_trl_logprob_tiles_give_the_same_log_probs_and_gradients(batch):
    trl = pytest.importorskip("trl")
    from trl.kernels import chunked_logprob
    from trl.trainer import utils

    model = tiny_model("llama")
    trl.trainer.utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    expected, expected_grad = _fused_log_probs_and_grad(model, batch)
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    plain = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None].clamp(min=0))[..., 0]
    mask = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(expected[mask], plain[mask].detach(), rtol=1e-5, atol=1e-5)
    defaults = (chunked_logprob.TOKEN_CHUNK_SIZE, utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    with compat.trl_logprob_tiles(tokens=5, vocab=7):  # many tiles, ragged at both edges
        assert (chunked_logprob.TOKEN_CHUNK_SIZE, utils._CHUNKED_LOGPROB_CHUNK_SIZE) == (5, 7)
        tiled, tiled_grad = _fused_log_probs_and_grad(model, batch)
    assert defaults == (chunked_logprob.TOKEN_CHUNK_SIZE, utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    torch.testing.assert_close(tiled, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiled_grad, expected_grad, rtol=1e-5, atol=1e-6)
