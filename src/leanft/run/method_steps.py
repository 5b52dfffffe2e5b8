"""What each registered method does to a model (attach, check, save, load, merge), on peft and leanft's core.

``leanft.run.methods`` names these functions in its registry and imports this module on first use, so the
registry, the config and the command line's help stay free of torch, transformers and peft.
"""

from __future__ import annotations

import logging
from pathlib import Path

import peft
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from leanft.core.errors import LeanftError
from leanft.core.paca import apply_paca, check_paca_targets, merge_paca, narrowest_input, target_names
from leanft.core.quant import dequantize_model, is_quantized, merge_qlora
from leanft.core.s2ft import apply_s2ft, s2ft_columns
from leanft.run.methods import LoraKeys, MethodSettings, S2ftKeys, parse_target_modules

logger = logging.getLogger(__name__)


def paca_columns_per_layer(model: PreTrainedModel, settings: MethodSettings) -> int:
    """PaCA's r on ``model``: the given r, or the default shrunk to the narrowest targeted layer's input width (a
    given r wider than a layer is refused by ``check_paca_targets``)."""
    if not settings.fit_r:
        return settings.r
    narrowest = narrowest_input(model, parse_target_modules(settings.target_modules))
    if narrowest is not None and narrowest < settings.r:
        logger.info("PaCA: the default r %d exceeds the narrowest targeted input width %d: %d columns per layer",
                    settings.r, narrowest, narrowest)
        return narrowest
    return settings.r


def attach_paca(model: PreTrainedModel, settings: MethodSettings) -> nn.Module:
    """PaCA layers on the targeted linears, each training r random input columns (the paper's choice)."""
    targets = parse_target_modules(settings.target_modules)
    return apply_paca(model, r=paca_columns_per_layer(model, settings), target_modules=targets, seed=settings.seed)


def check_paca(model: PreTrainedModel, settings: MethodSettings) -> None:
    """Raise what ``attach_paca`` would (targets, r), leaving the model unchanged."""
    check_paca_targets(model, paca_columns_per_layer(model, settings), parse_target_modules(settings.target_modules))


def attach_s2ft(model: PreTrainedModel, settings: MethodSettings) -> nn.Module:
    """S2FT's heads and FFN channels, trained as PaCA column layers."""
    keys = settings.own(S2ftKeys)
    return apply_s2ft(model, ffn=keys.ffn, heads=keys.heads, seed=settings.seed)


def check_s2ft(model: PreTrainedModel, settings: MethodSettings) -> None:
    """Raise what ``attach_s2ft`` would, leaving the model unchanged."""
    keys = settings.own(S2ftKeys)
    s2ft_columns(model, ffn=keys.ffn, heads=keys.heads, seed=settings.seed)


def check_lora(model: PreTrainedModel, settings: MethodSettings) -> None:
    """Raise for target modules that match nothing (peft matches names the same way)."""
    target_names(model, parse_target_modules(settings.target_modules))


def check_nothing(model: PreTrainedModel, settings: MethodSettings) -> None:
    """Full fine-tuning attaches nothing that could fail."""


def attach_lora(model: PreTrainedModel, settings: MethodSettings) -> nn.Module:
    """A peft LoRA model with ``settings``' rank, alpha and target modules."""
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.own(LoraKeys).alpha,
        target_modules=parse_target_modules(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:
        raise LeanftError(f"peft could not apply LoRA with target_modules={settings.target_modules!r}: {exc}") from exc


def attach_full(model: PreTrainedModel, settings: MethodSettings) -> nn.Module:
    """Every parameter trainable."""
    return model.requires_grad_(True)


def save_pretrained(model: nn.Module, folder: Path) -> Path:
    """``model.save_pretrained(folder)``; returns the folder."""
    model.save_pretrained(folder)
    return folder


def load_lora(base: PreTrainedModel, folder: Path) -> nn.Module:
    """``base`` with the peft adapter saved in ``folder``."""
    return peft.PeftModel.from_pretrained(base, str(folder))


def load_full(base: PreTrainedModel, folder: Path) -> nn.Module:
    """The fully fine-tuned model saved in ``folder``, in ``base``'s dtype and on its device."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=base.dtype).to(base.device)


def merge_columns(model: nn.Module) -> PreTrainedModel:
    """PaCA's (or S2FT's) columns written into the weights; a 4-bit base comes back in full precision, never
    re-quantized."""
    model = merge_paca(model)
    return dequantize_model(model) if is_quantized(model) or getattr(model, "hf_quantizer", None) else model


def merge_lora(model: nn.Module) -> PreTrainedModel:
    """LoRA merged into the weights (a 4-bit base dequantized first)."""
    return merge_qlora(model) if is_quantized(model) else model.merge_and_unload()
