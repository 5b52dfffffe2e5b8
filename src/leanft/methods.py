"""Attach a fine-tuning method (PaCA, peft LoRA or full) and DropBP to a model; save and reload the result."""

from __future__ import annotations

import re
from pathlib import Path

import peft
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from leanft.dropbp import DropBP, apply_dropbp
from leanft.errors import LeanftError
from leanft.paca import apply_paca, load_paca, merge_paca, paca_modules, save_paca
from leanft.quant import dequantize_model, is_quantized, merge_qlora, prepare_quantized

ADAPTER_DIR = "adapter"


def parse_target_modules(text: str) -> str | list[str]:
    """'all-linear' stays; 'q_proj,v_proj' becomes a list of suffixes; anything else is a regex."""
    if text == "all-linear":
        return text
    if re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)*", text):
        return [part.strip() for part in text.split(",")]
    return text


def attach_method(
    model: PreTrainedModel, method: str, r: int, target_modules: str, seed: int, lora_alpha: int = 16
) -> nn.Module:
    """Make ``model`` trainable by ``method`` ('paca', 'lora' or 'full'); returns the model to train.

    On a 4-bit model (``quantize=4bit``) 'paca' is QPaCA and 'lora' is QLoRA, both after peft's
    ``prepare_model_for_kbit_training``; 'full' is refused.
    """
    targets = parse_target_modules(target_modules)
    if is_quantized(model):
        if method == "full":
            raise LeanftError("a 4-bit base cannot be fully fine-tuned: use method=paca (QPaCA) or method=lora (QLoRA)")
        model = prepare_quantized(model)
    if method == "paca":
        return apply_paca(model, r=r, target_modules=targets, seed=seed)
    if method == "lora":
        config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, task_type="CAUSAL_LM")
        try:
            return peft.get_peft_model(model, config)
        except ValueError as exc:
            raise LeanftError(f"peft could not apply LoRA with target_modules={target_modules!r}: {exc}") from exc
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    raise LeanftError(f"method must be paca, lora or full, got {method!r}")


def attach_dropbp(model: nn.Module, rate: float, seed: int, sampler: str = "bernoulli") -> DropBP | None:
    """DropBP on ``model`` at ``rate`` with ``sampler`` (None when the rate is 0)."""
    return apply_dropbp(model, drop_rate=rate, seed=seed, sampler=sampler) if rate > 0 else None


def save_trained(model: nn.Module, method: str, folder: str | Path) -> Path:
    """Write what was trained: a PaCA or LoRA adapter folder, or the full model."""
    folder = Path(folder)
    if method == "paca" or paca_modules(model):
        return save_paca(model, folder)
    model.save_pretrained(folder)
    return folder


def load_trained(base: PreTrainedModel, method: str, folder: str | Path) -> nn.Module:
    """``base`` with the trained weights from ``folder`` (written by ``save_trained``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LeanftError(f"{folder} does not exist: point at a finished run folder")
    if method == "paca":
        return load_paca(base, folder)
    if method == "lora":
        return peft.PeftModel.from_pretrained(base, str(folder))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=base.dtype).to(base.device)


def merged(model: nn.Module) -> PreTrainedModel:
    """A plain transformers model with the adapter (PaCA or LoRA) written into its weights.

    A 4-bit base comes back in full precision (``dequant(W)`` plus the adapter, exactly the trained model); it is
    never re-quantized, which would round the trained weights to 4 bits (lossy).
    """
    if isinstance(model, peft.PeftModel):
        return merge_qlora(model) if is_quantized(model) else model.merge_and_unload()
    model = merge_paca(model)
    return dequantize_model(model) if is_quantized(model) or getattr(model, "hf_quantizer", None) else model
