"""bf16 compute where the hardware has it: a bf16 frozen base, fp32 master copies of what is trained.

With bf16 on, the base model is loaded in bf16 (its frozen weights are never cast per step) and every
trainable parameter (PaCA columns, LoRA matrices, fully trained weights) is kept in fp32, so the optimizer
steps and its state are fp32; under autocast the matmuls run in bf16.
"""

from __future__ import annotations

import torch
from torch import nn

from leanft.core.compat import cpu_has_amx_tiles, cpu_has_bf16_matmul


def bf16_supported(device_type: str) -> bool:
    """Whether ``device_type`` (``"cuda"`` or ``"cpu"``) computes in bf16 natively."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device_type == "cpu" and cpu_has_bf16_matmul()


def precision_choice(device_type: str, setting: str) -> str:
    """The compute precision a ``bf16`` setting (``auto | true | false``) gives on ``device_type``, and why.

    For example ``"fp32: this CPU has no native bf16 (AVX2)"`` or ``"bf16: AVX-512 BF16"``.
    """
    native = bf16_supported(device_type)
    if device_type == "cuda":
        hardware = f"{torch.cuda.get_device_name()} computes bf16" if native else "this GPU has no native bf16"
    elif cpu_has_amx_tiles():
        hardware = "AMX"
    elif native:
        hardware = "AVX-512 BF16"
    else:
        hardware = f"this CPU has no native bf16 ({torch.backends.cpu.get_cpu_capability()})"
    if setting == "false":
        return "fp32: bf16=false"
    if setting == "true":
        return "bf16: bf16=true" + ("" if native else f", emulated ({hardware})")
    return f"{'bf16' if native else 'fp32'}: {hardware}"


def trainable_in_fp32(model: nn.Module) -> nn.Module:
    """Give every trainable floating-point parameter of ``model`` an fp32 master copy (in place); returns it."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return model
