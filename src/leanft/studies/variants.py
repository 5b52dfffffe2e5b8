"""The variant grammar of ``leanft compare`` and ``leanft bench``: ``METHOD[+dropbp|+dropbp-uniform][:KEY=VALUE]...``.

``METHOD`` is a registered method; ``+dropbp`` adds DropBP with allocated per-branch rates, ``+dropbp-uniform``
with one rate for every branch. After colons a variant may set its own train keys (``VARIANT_TRAIN_KEYS``), its
method's own keys (``lora:alpha=32`` is ``lora.alpha``), dotted train keys, and DropBP's keys
(``paca+dropbp-uniform:rate=0.3:patterns_per_step=4`` sets ``dropbp.rate`` and ``dropbp.patterns_per_step``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

from leanft.core.errors import LeanftError
from leanft.run.config import TrainConfig, apply_overrides
from leanft.run.methods import METHODS

# a variant's own keys that are train keys; its method's own keys (``alpha`` of lora) and DropBP's are the others
VARIANT_TRAIN_KEYS = ("lr", "r", "target_modules", "warmup_ratio", "lr_scheduler", "bf16", "compile", "optimizer",
                      "seed", "quantize", "chunked_loss", "padding_free")  # fmt: skip
STUDY_DROP_RATE = 0.5  # DropBP variants' rate where dropbp.rate is left at train's default (0 = off)
EXAMPLES = ("paca:lr=0.01, paca:r=32:lr=0.003, lora:alpha=32, s2ft:ffn=0.1, full:optimizer=apollo, "
            "paca:quantize=4bit, paca+dropbp:warmup=0.2:rate=0.3, paca+dropbp-uniform:rate=0.5:patterns_per_step=4")


def study_variants() -> dict[str, dict]:
    """Every variant's base name: each registered method alone, with allocated DropBP, and with uniform DropBP."""
    variants = {}
    for name in METHODS:
        variants[name] = {"method": name, "dropbp_on": False, "allocate": False}
        variants[f"{name}+dropbp"] = {"method": name, "dropbp_on": True, "allocate": True}
        variants[f"{name}+dropbp-uniform"] = {"method": name, "dropbp_on": True, "allocate": False}
    return variants


def variant_base(name: str) -> str:
    """The method part of a variant name (``paca+dropbp`` of ``paca+dropbp:warmup=0.2``)."""
    return name.split(":", 1)[0]


def variant_items(name: str) -> list[str]:
    """The ``KEY=VALUE`` items after a variant's base, as written."""
    return name.split(":")[1:]


def parse_variants(text: str) -> list[str]:
    """The variant names of a comma-separated list; a LeanftError for an unknown one or a repeated one."""
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    unknown = [name for name in names if variant_base(name) not in study_variants()]
    if unknown or not names:
        raise LeanftError(f"unknown variant(s) {unknown or text!r}: choose from {', '.join(study_variants())}")
    if len(set(names)) != len(names):
        raise LeanftError(f"variants lists a method twice: {text}")
    return names


def variant_overrides(name: str) -> list[str]:
    """The variant's own keys as train overrides: one of ``VARIANT_TRAIN_KEYS``, a key of its method's own
    (``lora:alpha=32`` is ``lora.alpha``), a dotted train key, or a DropBP key."""
    method = study_variants()[variant_base(name)]["method"]
    own = METHODS[method].keys
    own_names = {item.name for item in dataclasses.fields(own)} if own else set()

    def spelled(item: str) -> str:
        key = item.partition("=")[0]
        if key in VARIANT_TRAIN_KEYS or "." in key:
            return item
        return f"{method}.{item}" if key in own_names else f"dropbp.{item}"

    return [spelled(item) for item in variant_items(name)]


def variant_train_config(base: TrainConfig, name: str) -> TrainConfig:
    """``base`` as variant ``name`` trains it: its method, DropBP on (allocated or uniform) or off, its own keys;
    validated (a LeanftError names the variant)."""
    spec = study_variants()[variant_base(name)]
    if any(item.startswith("dropbp.") for item in variant_overrides(name)) and not spec["dropbp_on"]:
        raise LeanftError(f"variant {name!r} sets DropBP keys on a method without DropBP")
    dropbp = dataclasses.replace(
        base.dropbp,
        rate=(base.dropbp.rate or STUDY_DROP_RATE) if spec["dropbp_on"] else 0.0,
        allocate_at=base.dropbp.allocate_at if spec["allocate"] else None,
    )
    config = dataclasses.replace(  # the variant's own keys must not reach the others
        base, method=spec["method"], dropbp=dropbp, method_keys=copy.deepcopy(base.method_keys)
    )
    try:
        return apply_overrides(config, variant_overrides(name)).validate()
    except LeanftError as error:
        raise LeanftError(f"variant {name!r}: {error}") from None


def variant_name(base: str, items: Sequence[str]) -> str:
    """A variant's name from its base and ``KEY=VALUE`` items, the items sorted (one name for one variant)."""
    return ":".join([base, *sorted(items)])
