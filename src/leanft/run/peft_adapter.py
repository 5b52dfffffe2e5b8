"""A trained run as a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

PaCA and S2FT runs are converted exactly (``leanft.core.paca_lora``); a LoRA run's adapter is taken as trained.
``leanft.run.methods`` names these functions (``MethodSpec.lora_form``) and imports this module on first use.
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import torch
from safetensors.torch import save_file
from torch import nn

from leanft.core.paca_lora import paca_as_lora

ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's names: PeftModel.from_pretrained reads these two files
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def paca_lora_form(model: nn.Module, uniform_rank: bool = False) -> tuple[peft.LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig, peft-named tensors) equal to the PaCA layers of ``model`` (PaCA, S2FT, QPaCA): ``lora_alpha``
    equals the rank, so the scale is 1; layers of another rank than the largest get it in ``rank_pattern`` and
    ``alpha_pattern`` (none with ``uniform_rank``, which pads every layer to the largest)."""
    factors = paca_as_lora(model, uniform_rank=uniform_rank)
    rank = max(layer.rank for layer in factors.values())
    others = {name: layer.rank for name, layer in factors.items() if layer.rank != rank}
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(factors),
        rank_pattern=others,
        alpha_pattern=dict(others),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=all(layer.transposed for layer in factors.values()),
        task_type="CAUSAL_LM",
        inference_mode=True,  # as peft's own save_pretrained writes it
        base_model_name_or_path=_base_name(model),
    )
    tensors = {}
    for name, layer in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.a
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.b
    return config, tensors


def _base_name(model: nn.Module) -> str | None:
    """Where the base came from: a hub id as it is, a local folder as an absolute path (None when unknown)."""
    name = getattr(model, "name_or_path", None) or None
    return str(Path(name).resolve()) if name and Path(name).is_dir() else name


def trained_lora_form(model: nn.Module, uniform_rank: bool = False) -> tuple[peft.LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig, tensors) of a peft LoRA model as it was trained (one rank already: ``uniform_rank`` changes
    nothing)."""
    name = model.active_adapter
    return copy.deepcopy(model.peft_config[name]), peft.get_peft_model_state_dict(model, adapter_name=name)


def write_adapter(folder: Path, config: peft.LoraConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Write ``config`` and ``tensors`` (cast to ``dtype``) into ``folder`` as peft writes an adapter."""
    config.save_pretrained(str(folder))
    weights = {key: tensor.detach().to(device="cpu", dtype=dtype).contiguous() for key, tensor in tensors.items()}
    save_file(weights, str(folder / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
