"""What leanft takes for a Hugging Face hub id (of a model or a dataset)."""

from __future__ import annotations

import re

HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is shaped like a hub id: ``name`` or ``org/name`` of letters, digits, ``_``, ``.``, ``-``."""
    return HUB_ID.match(text) is not None
