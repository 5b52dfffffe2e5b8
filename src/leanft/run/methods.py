"""The method registry: one ``MethodSpec`` per fine-tuning method, used by train, eval, merge, bench and compare.

A spec says how the method makes a loaded model trainable (``attach``), writes and reads what it trained
(``save`` / ``load``), gives back a plain transformers model (``merge``), its default learning rate, its labels,
and the name of its form on a 4-bit base. Adding a method is one entry in ``METHODS`` plus the module that
implements it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import peft
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from leanft.core.dropbp import DropBP, apply_dropbp
from leanft.core.errors import LeanftError
from leanft.core.paca import apply_paca, check_paca_targets, load_paca, merge_paca, save_paca, target_names
from leanft.core.paca_columns import check_column_choice, column_scores
from leanft.core.quant import dequantize_model, is_quantized, merge_qlora, prepare_quantized
from leanft.core.s2ft import apply_s2ft, s2ft_columns


@dataclass(frozen=True)
class MethodSettings:
    """What attaching a method needs; ``TrainConfig.method_settings()`` gives a run's."""

    r: int = 8
    target_modules: str = "all-linear"
    seed: int = 0
    lora_alpha: int = 16  # these defaults are also ``TrainConfig``'s
    s2ft_ffn: float = 0.05
    s2ft_heads: float = 0.0
    paca_columns: str = "random"  # or a data-aware choice of leanft.core.paca_columns, scored on ``calibration``
    calibration: dict | None = None  # a training batch (tensors on the model's device)


@dataclass(frozen=True)
class MethodSpec:
    """One fine-tuning method, everything leanft needs to run, save, load, merge and label it."""

    name: str
    label: str  # in tables: "peft LoRA"
    short_label: str  # in compound labels: "LoRA + DropBP 0.5"
    default_lr: float
    quantized: str | None  # its name on a bitsandbytes 4-bit base (qlora), None where it has no such form
    attach: Callable[[PreTrainedModel, MethodSettings], nn.Module]
    save: Callable[[nn.Module, Path], Path]
    load: Callable[[PreTrainedModel, Path], nn.Module]
    merge: Callable[[nn.Module], PreTrainedModel]
    check: Callable[[PreTrainedModel, MethodSettings], None]  # raises what attach would, without changing the model
    own_checkpoints: bool = False  # True: Trainer checkpoints hold what ``save`` writes, not the whole model


def parse_target_modules(text: str) -> str | list[str]:
    """'all-linear' stays; 'q_proj,v_proj' becomes a list of suffixes; anything else is a regex."""
    if text == "all-linear":
        return text
    if re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)*", text):
        return [part.strip() for part in text.split(",")]
    return text


def _attach_paca(model: PreTrainedModel, settings: MethodSettings) -> nn.Module:
    targets = parse_target_modules(settings.target_modules)
    names = check_paca_targets(model, settings.r, targets)
    scores = column_scores(model, names, settings.calibration, settings.paca_columns)
    return apply_paca(model, r=settings.r, target_modules=targets, seed=settings.seed, scores=scores)


def _check_paca(model: PreTrainedModel, settings: MethodSettings) -> None:
    check_paca_targets(model, settings.r, parse_target_modules(settings.target_modules))
    check_column_choice(settings.paca_columns)


def _attach_s2ft(model: PreTrainedModel, settings: MethodSettings) -> nn.Module:
    return apply_s2ft(model, ffn=settings.s2ft_ffn, heads=settings.s2ft_heads, seed=settings.seed)


def _check_s2ft(model: PreTrainedModel, settings: MethodSettings) -> None:
    s2ft_columns(model, ffn=settings.s2ft_ffn, heads=settings.s2ft_heads, seed=settings.seed)


def _check_lora(model: PreTrainedModel, settings: MethodSettings) -> None:
    target_names(model, parse_target_modules(settings.target_modules))  # peft matches names the same way


def _check_nothing(model: PreTrainedModel, settings: MethodSettings) -> None:
    """Full fine-tuning attaches nothing that could fail."""


def _attach_lora(model: PreTrainedModel, settings: MethodSettings) -> nn.Module:
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        target_modules=parse_target_modules(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:
        raise LeanftError(f"peft could not apply LoRA with target_modules={settings.target_modules!r}: {exc}") from exc


def _attach_full(model: PreTrainedModel, settings: MethodSettings) -> nn.Module:
    return model.requires_grad_(True)


def _save_pretrained(model: nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def _load_lora(base: PreTrainedModel, folder: Path) -> nn.Module:
    return peft.PeftModel.from_pretrained(base, str(folder))


def _load_full(base: PreTrainedModel, folder: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=base.dtype).to(base.device)


def _merge_paca(model: nn.Module) -> PreTrainedModel:
    """PaCA's columns written into the weights; a 4-bit base comes back in full precision, never re-quantized."""
    model = merge_paca(model)
    return dequantize_model(model) if is_quantized(model) or getattr(model, "hf_quantizer", None) else model


def _merge_lora(model: nn.Module) -> PreTrainedModel:
    return merge_qlora(model) if is_quantized(model) else model.merge_and_unload()


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("paca", "PaCA", "PaCA", 1e-2, "qpaca", _attach_paca, save_paca, load_paca, _merge_paca,
                   _check_paca, own_checkpoints=True),
        MethodSpec("s2ft", "S2FT", "S2FT", 1e-2, None, _attach_s2ft, save_paca, load_paca, _merge_paca,
                   _check_s2ft, own_checkpoints=True),
        MethodSpec("lora", "peft LoRA", "LoRA", 3e-3, "qlora", _attach_lora, _save_pretrained, _load_lora,
                   _merge_lora, _check_lora),
        MethodSpec("full", "full FT", "full FT", 1e-4, None, _attach_full, _save_pretrained, _load_full,
                   lambda model: model, _check_nothing),
    )
}
QUANTIZED_FORMS = {spec.quantized: spec.name for spec in METHODS.values() if spec.quantized}  # qpaca -> paca


def method_spec(name: str) -> MethodSpec:
    """The registered method ``name``; one clear error naming the choices otherwise."""
    if name not in METHODS:
        raise LeanftError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def quantized_forms() -> str:
    """The methods that train on a 4-bit base, for error messages: 'method=paca (qpaca) or method=lora (qlora)'."""
    return " or ".join(f"method={spec.name} ({spec.quantized})" for spec in METHODS.values() if spec.quantized)


def attach_method(model: PreTrainedModel, method: str, settings: MethodSettings) -> nn.Module:
    """Make ``model`` trainable by ``method``; returns the model to train.

    On a 4-bit model (``quantize=4bit``) 'paca' is QPaCA and 'lora' is QLoRA, both after peft's
    ``prepare_model_for_kbit_training``; a method without a 4-bit form is refused.
    """
    spec = method_spec(method)
    if is_quantized(model):
        if spec.quantized is None:
            raise LeanftError(f"a 4-bit base cannot be trained with method={method}: use {quantized_forms()}")
        model = prepare_quantized(model)
    return spec.attach(model, settings)


def attach_dropbp(model: nn.Module, rate: float, seed: int, sampler: str = "bernoulli") -> DropBP | None:
    """DropBP on ``model`` at ``rate`` with ``sampler`` (None when the rate is 0)."""
    return apply_dropbp(model, drop_rate=rate, seed=seed, sampler=sampler) if rate > 0 else None


def load_trained(base: PreTrainedModel, method: str, folder: str | Path) -> nn.Module:
    """``base`` with the trained weights from ``folder`` (written by the method's ``save``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LeanftError(f"{folder} does not exist: point at a finished run folder")
    return method_spec(method).load(base, folder)
