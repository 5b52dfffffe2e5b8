"""leanft: faster, lighter fine-tuning of Hugging Face causal LMs with DropBP and PaCA."""

import logging

# bitsandbytes warns at import that an optional CPU kernel package is missing; its fallback works.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from leanft.core.allocate import allocate_rates
from leanft.core.callback import DropBPCallback
from leanft.core.chunked_loss import chunked_causal_lm_loss, linear_cross_entropy
from leanft.core.dropbp import DropBP, apply_dropbp
from leanft.core.errors import LeanftError
from leanft.core.fidelity import gradient_fidelity
from leanft.core.paca import (
    apply_paca,
    load_paca,
    merge_paca,
    paca_disabled,
    paca_modules,
    remove_paca,
    save_paca,
)
from leanft.core.paca_layer import PacaLinear
from leanft.core.packed import flatten_examples, packed_attention_mode
from leanft.core.quant import QPacaLinear
from leanft.core.s2ft import apply_s2ft, s2ft_columns
from leanft.run.models import load_model_and_tokenizer

__version__ = "0.1.0"

__all__ = [
    "DropBP",
    "DropBPCallback",
    "LeanftError",
    "PacaLinear",
    "QPacaLinear",
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
    "paca_disabled",
    "packed_attention_mode",
    "paca_modules",
    "remove_paca",
    "s2ft_columns",
    "save_paca",
]
