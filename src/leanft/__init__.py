"""leanft: faster, lighter fine-tuning of Hugging Face causal LMs with DropBP and PaCA."""

import logging

# bitsandbytes warns at import that an optional CPU kernel package is missing; its fallback works.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from leanft.callback import DropBPCallback
from leanft.chunked_loss import chunked_causal_lm_loss, linear_cross_entropy
from leanft.dropbp import DropBP, apply_dropbp
from leanft.errors import LeanftError
from leanft.paca import (
    PacaLinear,
    apply_paca,
    load_paca,
    merge_paca,
    paca_disabled,
    paca_modules,
    remove_paca,
    save_paca,
)
from leanft.quant import QPacaLinear

__version__ = "0.1.0"

__all__ = [
    "DropBP",
    "DropBPCallback",
    "LeanftError",
    "PacaLinear",
    "QPacaLinear",
    "apply_dropbp",
    "apply_paca",
    "chunked_causal_lm_loss",
    "linear_cross_entropy",
    "load_paca",
    "merge_paca",
    "paca_disabled",
    "paca_modules",
    "remove_paca",
    "save_paca",
]
