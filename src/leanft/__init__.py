"""leanft: faster, lighter fine-tuning of Hugging Face causal LMs with DropBP and PaCA."""

import logging

# bitsandbytes warns at import that an optional CPU kernel package is missing; its fallback works.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import importlib

# Where each public name lives. They are imported on first use (PEP 562), so ``import leanft`` and the command
# line's help and option errors do not pay for torch, transformers and peft.
_HOMES = {
    "allocate_rates": "leanft.core.allocate",
    "AutoRate": "leanft.core.autorate",
    "DropBPCallback": "leanft.core.callback",
    "DropSchedule": "leanft.core.callback",
    "chunked_causal_lm_loss": "leanft.core.chunked_loss",
    "linear_cross_entropy": "leanft.core.chunked_loss",
    "DropBP": "leanft.core.dropbp",
    "apply_dropbp": "leanft.core.dropbp",
    "LeanftError": "leanft.core.errors",
    "gradient_fidelity": "leanft.core.fidelity",
    "apply_paca": "leanft.core.paca",
    "load_paca": "leanft.core.paca",
    "merge_paca": "leanft.core.paca",
    "paca_disabled": "leanft.core.paca",
    "paca_modules": "leanft.core.paca",
    "remove_paca": "leanft.core.paca",
    "save_paca": "leanft.core.paca",
    "PacaLinear": "leanft.core.paca_layer",
    "paca_as_lora": "leanft.core.paca_lora",
    "flatten_examples": "leanft.core.packed",
    "packed_attention_mode": "leanft.core.packed",
    "QPacaLinear": "leanft.core.quant",
    "ReferenceView": "leanft.core.reference",
    "reference_pass": "leanft.core.reference",
    "apply_s2ft": "leanft.core.s2ft",
    "s2ft_columns": "leanft.core.s2ft",
    "load_model_and_tokenizer": "leanft.run.models",
}


def __getattr__(name: str):
    """Import a public name's module on first use."""
    if name not in _HOMES:
        raise AttributeError(f"module 'leanft' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__version__ = "0.1.0"

__all__ = [
    "AutoRate",
    "DropBP",
    "DropBPCallback",
    "DropSchedule",
    "LeanftError",
    "PacaLinear",
    "QPacaLinear",
    "ReferenceView",
    "allocate_rates",
    "apply_dropbp",
    "apply_paca",
    "apply_s2ft",
    "chunked_causal_lm_loss",
    "flatten_examples",
    "gradient_fidelity",
    "linear_cross_entropy",
    "load_model_and_tokenizer",
    "load_paca",
    "merge_paca",
    "paca_as_lora",
    "paca_disabled",
    "packed_attention_mode",
    "paca_modules",
    "reference_pass",
    "remove_paca",
    "s2ft_columns",
    "save_paca",
]
