"""A quantized frozen base: bitsandbytes 4-bit (nf4) loading, QPaCA layers, QLoRA preparation, full-precision merge.

QPaCA keeps each targeted weight packed in 4 bits and trains its columns ``P`` in full precision. ``PacaMatmul``
gets the base weight through a provider that dequantizes it: once in forward and once more in backward, so no
dequantized copy is kept for backward; as in PaCA only ``x[..., idx]`` is saved. Merging gives a full-precision
model equal to the trained one (``dequant(W)`` with ``P`` in its columns); re-quantizing that is lossy (the trained
columns would be rounded to 4 bits), so leanft never does it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib.util
import sys
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from leanft.core.choices import QUANTIZE_CHOICES
from leanft.core.compat import unpack_4bit_for_cpu
from leanft.core.errors import LeanftError
from leanft.core.paca_layer import PacaDispatch, PacaLinear, PacaMatmul


def require_bitsandbytes() -> ModuleType:
    """The ``bitsandbytes`` module, or a LeanftError saying how to install it."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LeanftError("quantize=4bit needs bitsandbytes: run `pip install 'leanft[quant]'` (or bitsandbytes)")
    import bitsandbytes

    return bitsandbytes


def compute_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype 4-bit layers compute in: bf16 on a GPU that supports it, fp32 elsewhere."""
    cuda = torch.device(device).type == "cuda"
    return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32


def quantization_config(quantize: str, device: str | torch.device):
    """The ``transformers.BitsAndBytesConfig`` for ``quantize`` ('4bit': nf4 with double quantization)."""
    if quantize not in QUANTIZE_CHOICES:
        raise LeanftError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(device),
    )


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds bitsandbytes 4-bit linears (loaded with ``quantize=4bit``)."""
    return any(is_linear4bit(module) for module in model.modules())


def is_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (checked by name: bitsandbytes may be absent)."""
    return any(cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes") for cls in type(module).mro())


def dequantize(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense (out x in) matrix of a 4-bit ``Params4bit`` weight, in ``dtype`` (default: its original dtype)."""
    import bitsandbytes.functional as bnbf

    dense = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    return dense if dtype is None else dense.to(dtype)


def dequantize_module(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense (out x in) weight of a ``Linear4bit`` in ``dtype`` (default: the dtype it was quantized from)."""
    _unpack_for_cpu(module)
    return dequantize(module.weight, dtype)


def settle_4bit_model(model: nn.Module) -> nn.Module:
    """After a 4-bit load: keep the 4-bit layout (``keep_4bit_layout``) and give back the load's memory.

    The tensors left in full precision (embeddings, norms) are copied off the memory-mapped checkpoint, so the
    mapping of the whole full-precision file, which quantizing read through, is released; on glibc the heap left
    over from quantizing is returned to the system too.
    """
    with torch.no_grad():
        for param in model.parameters():
            if not hasattr(param, "quant_state"):
                param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                setattr(module, name, buffer.clone())  # an existing buffer's name: replaces the buffer
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    return keep_4bit_layout(model)


def keep_4bit_layout(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernels in eval-mode forwards.

    That repacking rounds the quantization scales to bf16 and stays after the forward, so the weights trained
    after an evaluation would no longer be the loaded ones; leanft keeps the layout (evaluation dequantizes).
    """
    for module in model.modules():
        if is_linear4bit(module):
            module.support_avx512bf16_for_cpu = False
    return model


def _unpack_for_cpu(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference packing (done by eval-mode forwards on some CPUs) so dequantizing works."""
    state = getattr(module.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        data, state = unpack_4bit_for_cpu(module.weight.data, state)
        module.weight.data, module.weight.quant_state, module.quant_state = data, state, state


class QPacaLinear(PacaLinear):
    """PaCA on a bitsandbytes 4-bit linear: ``weight`` stays packed, ``paca_weight`` (out x r) is fp32."""

    def __init__(self, module: nn.Module, index: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        dense = dequantize_module(module, torch.float32) if dense is None else dense.float()
        bias = None if module.bias is None else module.bias.data
        super().__init__(dense, bias, index, "linear4bit")  # P and the original columns from the dense copy
        self.weight = module.weight  # the packed Params4bit (frozen), replacing the dense copy
        self.compute_dtype = module.compute_dtype

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen base weight, dequantized (a new tensor; original columns at ``paca_index``)."""
        return dequantize(self.weight, dtype or self.paca_weight.dtype)

    def write_columns(self, columns: torch.Tensor) -> None:
        """Nothing to write: the dense weight is rebuilt from the packed one at every use."""

    def set_index(self, index: torch.Tensor) -> None:
        """Train other columns: point ``paca_index`` at ``index`` (the packed weight never changes)."""
        with torch.no_grad():
            self.paca_index.copy_(index)
            self.paca_original.copy_(self.dequantized().index_select(1, self.paca_index))

    def merged_weight(self) -> torch.Tensor:
        """``dequant(W)`` with the trained columns written in, in the model's own dtype (a new tensor)."""
        dense = dequantize(self.weight)
        return dense.index_copy_(1, self.paca_index, self.paca_weight.detach().to(dense.dtype))

    def merged_module(self) -> nn.Module:
        """A full-precision ``nn.Linear`` computing what this layer computes."""
        return self.to_plain(self.merged_weight())

    def original_module(self) -> nn.Module:
        """The original 4-bit ``Linear4bit`` with its packed weight."""
        import bitsandbytes as bnb

        module = bnb.nn.Linear4bit(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            compute_dtype=self.compute_dtype,
            quant_type=self.weight.quant_type,
            quant_storage=self.weight.quant_storage,
            device="meta",
        )
        module.weight, module.bias = self.weight, self.bias
        module.weight.module, module.quant_state = module, self.weight.quant_state
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_eff^T + b``, ``W_eff`` = the dequantized base with ``P`` in its columns (without while disabled)."""
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else self.paca_weight.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.disabled:
            return F.linear(x.to(dtype), self.dequantized(dtype), bias)
        base = functools.partial(self.dequantized, dtype)
        with torch.autocast(device_type, enabled=False):
            return PacaMatmul.apply(x.to(dtype), self.paca_weight.to(dtype), base, self.paca_index, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={self.weight.quant_type}"


LINEAR_4BIT = PacaDispatch(  # QPaCA: ``apply_paca`` on a bitsandbytes 4-bit linear
    matches=is_linear4bit,
    in_features=lambda module: module.in_features,
    weight=lambda module: dequantize_module(module, torch.float32),
    build=lambda module, index, weight: QPacaLinear(module, index, weight),
)


def prepare_quantized(model: nn.Module) -> nn.Module:
    """peft's ``prepare_model_for_kbit_training`` without its gradient checkpointing (leanft sets that itself)."""
    import peft

    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace the remaining 4-bit linears by full-precision ``nn.Linear`` and drop the quantization config."""
    for name, module in list(model.named_modules()):
        if is_linear4bit(module):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight = nn.Parameter(dequantize_module(module), requires_grad=False)
            plain.bias = module.bias
            model.set_submodule(name, plain)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if getattr(model, "is_loaded_in_4bit", False):
        model.is_loaded_in_4bit = False
    return model


def merge_qlora(model: nn.Module) -> nn.Module:
    """Merge a peft LoRA model on a 4-bit base into a full-precision model: ``dequant(W) + B A``, never re-quantized.

    (peft's own ``merge_and_unload`` on a 4-bit base re-quantizes the merged weights, which is lossy.)
    """
    import peft

    name = model.active_adapter
    config, state = model.peft_config[name], peft.get_peft_model_state_dict(model, adapter_name=name)
    base = dequantize_model(model.unload())
    fresh = peft.get_peft_model(base, config)
    peft.set_peft_model_state_dict(fresh, state)
    return fresh.merge_and_unload()
