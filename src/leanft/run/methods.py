"""The method registry: one ``MethodSpec`` per fine-tuning method, used by train, eval, merge, bench and compare.

A spec says how the method makes a loaded model trainable (``attach``), writes and reads what it trained
(``save`` / ``load``), gives back a plain transformers model (``merge``), its update as a peft LoRA adapter where it
has one (``lora_form``), its default learning rate, its labels, and the name of its form on a 4-bit base. Adding a
method is one entry in ``METHODS`` plus the module that implements it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from leanft.core.errors import LeanftError
from leanft.run.options import doc

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel


STEPS = "leanft.run.method_steps"  # the functions below name what they run there, imported on first use
PACA = "leanft.core.paca"
ADAPTER = "leanft.run.peft_adapter"


@dataclass
class S2ftKeys:
    """``s2ft.*``: S2FT's own keys."""

    ffn: float = doc("share of FFN channels (down-projection input columns) S2FT trains", 0.05)
    heads: float = doc("share of attention heads (output-projection input columns) S2FT trains", 0.0)

    def validate(self, in_use: bool) -> None:
        """Raise a LeanftError for a bad value (``in_use``: the run trains with S2FT)."""
        if not (0 <= self.ffn <= 1 and 0 <= self.heads <= 1):
            raise LeanftError(f"s2ft.ffn and s2ft.heads must be in [0, 1], got {self.ffn}, {self.heads}")
        if in_use and not (self.ffn or self.heads):
            raise LeanftError("method=s2ft trains nothing with s2ft.ffn=0 and s2ft.heads=0: raise one of them")


@dataclass
class LoraKeys:
    """``lora.*``: peft LoRA's own keys."""

    alpha: int = doc("LoRA's scaling numerator (peft's lora_alpha; the update is scaled by alpha / r)", 16)


@dataclass(frozen=True)
class MethodSettings:
    """What attaching a method needs; ``TrainConfig.method_settings()`` gives a run's."""

    r: int = 8
    fit_r: bool = False  # True: r is the method's default (as recorded too), which PaCA shrinks to fit the
    # narrowest targeted layer; a given r wider than a layer is refused
    target_modules: str = "all-linear"
    seed: int = 0
    keys: object | None = None  # the method's own keys (its ``MethodSpec.keys``); None: their defaults

    def own(self, spec_keys: type):
        """The method's own keys: those given, else the defaults of ``spec_keys``."""
        return self.keys if isinstance(self.keys, spec_keys) else spec_keys()


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
    default_r: int | None = None  # r (PaCA's columns, LoRA's rank) where the config leaves it null; None: no r
    preference_defaults: tuple[int, float] | None = None  # (r, lr) of objective=dpo where they differ from the
    # supervised ones (r = default_r, lr = default_lr / DPO_LR_DIVISOR): the setting preference tuning was measured in
    keys: type | None = None  # a dataclass of the method's own keys (``NAME.KEY=...``, doc() fields; it may
    # have ``validate(in_use: bool)``, called before any model loads)
    lora_form: Callable[[nn.Module, bool], tuple] | None = None  # the trained model's update as a peft LoRA
    # adapter, (LoraConfig, tensors), given (model, uniform_rank): ``leanft export format=peft-lora``; None: none


def parse_target_modules(text: str) -> str | list[str]:
    """'all-linear' stays; 'q_proj,v_proj' becomes a list of suffixes; anything else is a regex."""
    if text == "all-linear":
        return text
    if re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)*", text):
        return [part.strip() for part in text.split(",")]
    return text


def lazy(name: str, module: str = STEPS) -> Callable:
    """A function that runs ``module.name``, importing the module on its first call."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def _unchanged(model: nn.Module) -> nn.Module:
    """Full fine-tuning's merge: the trained model is already plain."""
    return model


PACA_FILES = {"save": lazy("save_paca", PACA), "load": lazy("load_paca", PACA), "own_checkpoints": True,
              "lora_form": lazy("paca_lora_form", ADAPTER)}
PRETRAINED_FILES = {"save": lazy("save_pretrained")}
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(name="paca", label="PaCA", short_label="PaCA", default_lr=1.5e-3, default_r=64, quantized="qpaca",
                   preference_defaults=(32, 3e-4),
                   attach=lazy("attach_paca"), check=lazy("check_paca"), merge=lazy("merge_columns"),
                   **PACA_FILES),
        MethodSpec(name="s2ft", label="S2FT", short_label="S2FT", default_lr=1e-2, quantized=None,
                   attach=lazy("attach_s2ft"), check=lazy("check_s2ft"), merge=lazy("merge_columns"), keys=S2ftKeys,
                   **PACA_FILES),
        MethodSpec(name="lora", label="peft LoRA", short_label="LoRA", default_lr=3e-3, default_r=8, quantized="qlora",
                   attach=lazy("attach_lora"), check=lazy("check_lora"), merge=lazy("merge_lora"),
                   load=lazy("load_lora"), keys=LoraKeys, lora_form=lazy("trained_lora_form", ADAPTER),
                   **PRETRAINED_FILES),
        MethodSpec(name="full", label="full FT", short_label="full FT", default_lr=1e-4, quantized=None,
                   attach=lazy("attach_full"), check=lazy("check_nothing"), merge=_unchanged,
                   load=lazy("load_full"), **PRETRAINED_FILES),
    )
}  # fmt: skip
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
    from leanft.core.quant import is_quantized, prepare_quantized

    spec = method_spec(method)
    if is_quantized(model):
        if spec.quantized is None:
            raise LeanftError(f"a 4-bit base cannot be trained with method={method}: use {quantized_forms()}")
        model = prepare_quantized(model)
    return spec.attach(model, settings)


def load_trained(base: PreTrainedModel, method: str, folder: str | Path) -> nn.Module:
    """``base`` with the trained weights from ``folder`` (written by the method's ``save``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LeanftError(f"{folder} does not exist: point at a finished run folder")
    return method_spec(method).load(base, folder)
