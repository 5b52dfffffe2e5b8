"""leanft: faster, lighter fine-tuning of Hugging Face causal LMs with DropBP and PaCA."""

from leanft.callback import DropBPCallback
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

__version__ = "0.1.0"

__all__ = [
    "DropBP",
    "DropBPCallback",
    "LeanftError",
    "PacaLinear",
    "apply_dropbp",
    "apply_paca",
    "load_paca",
    "merge_paca",
    "paca_disabled",
    "paca_modules",
    "remove_paca",
    "save_paca",
]
