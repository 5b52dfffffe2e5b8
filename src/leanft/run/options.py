"""Options declared as documented dataclass fields, set from YAML or ``key=value`` items, with help from the fields.

``leanft train``'s config, and the keys that ``leanft compare``, ``leanft fidelity`` and ``leanft bench`` add, are
all declared and parsed this way, so each command takes the same style of options and rejects a bad one with one
line before any work starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import types
import typing
from collections.abc import Sequence
from dataclasses import field

import yaml

from leanft.core.errors import LeanftError

logger = logging.getLogger(__name__)


def doc(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    """A dataclass field carrying its help text."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _field_types(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if not f.metadata.get("hidden")}


def coerce(value: object, kind: object, key: str) -> object:
    """Convert a YAML / command-line value to the field's type."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
        if type(None) in options:
            return None
        raise LeanftError(f"{key} cannot be null")
    for option in (o for o in options if o is not type(None)):
        if option is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return str(value).lower() in ("true", "1", "yes", "on")
        elif option is int and not isinstance(value, bool):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            with contextlib.suppress(TypeError, ValueError):
                return int(str(value))
        elif option is float and not isinstance(value, bool):
            with contextlib.suppress(TypeError, ValueError):
                return float(value)
        elif option is str:
            return str(value).lower() if isinstance(value, bool) else str(value)
    raise LeanftError(f"{key}={value!r} is not a valid {' or '.join(getattr(o, '__name__', str(o)) for o in options)}")


def assign(target: object, key: str, value: object, command: str, prefix: str = "") -> None:
    """Set the (dotted) option ``key`` of the dataclass ``target`` to ``value`` converted to its type.

    A target may offer more groups than its fields (``option_group(name)``: a dataclass, or None), the
    current spelling of an old key (``option_alias(key)``: the new key, or None), and keys it no longer has
    (``option_retired(key, value)``: True to skip the key, raising a LeanftError where its value is not today's
    behaviour).
    """
    alias = getattr(target, "option_alias", lambda _: None)(key)
    if alias is not None:
        logger.warning("%s%s is now %s%s: the old spelling is read until leanft 0.3", prefix, key, prefix, alias)
        return assign(target, alias, value, command, prefix)
    if getattr(target, "option_retired", lambda *_: False)(key, value):
        return None
    types_by_name = _field_types(type(target))
    head, _, rest = key.partition(".")
    full = prefix + head
    group = getattr(target, "option_group", lambda _: None)(head) if head not in types_by_name else None
    if head not in types_by_name and group is None:
        raise LeanftError(f"unknown key {full!r}: see `leanft {command} --help` for the keys")
    current = getattr(target, head) if group is None else group
    if dataclasses.is_dataclass(current):
        if rest:
            assign(current, rest, value, command, full + ".")
        elif isinstance(value, dict):
            for sub_key, sub_value in value.items():
                assign(current, str(sub_key), sub_value, command, full + ".")
        else:
            raise LeanftError(f"{full} is a group: set its keys, e.g. {full}.rate=0.5")
        return
    if rest:
        raise LeanftError(f"unknown key {prefix + key!r}: see `leanft {command} --help` for the keys")
    setattr(target, head, coerce(value, types_by_name[head], full))


def skip_retired(retired: dict[str, tuple[object, str]], key: str, value: object) -> bool:
    """True for a key of ``retired`` (key -> (the value that is today's behaviour, why it is gone)) set to that
    value: older run folders hold it, and it is skipped. Another value is refused with the reason. A group of
    only such keys (YAML's ``paca: {columns: random}``) is one too."""
    if isinstance(value, dict) and value and all(f"{key}.{sub}" in retired for sub in value):
        return all(skip_retired(retired, f"{key}.{sub}", item) for sub, item in value.items())
    if key not in retired:
        return False
    kept, reason = retired[key]
    if value != kept:
        raise LeanftError(f"{key} is no longer a key: {reason}; drop {key}={value}")
    return True


def apply_items(target: object, items: Sequence[str], command: str) -> object:
    """Set ``key=value`` items (YAML values; nested keys with dots) on the dataclass ``target``; returns it."""
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LeanftError(f"expected key=value, got {item!r}")
        assign(target, key.strip(), yaml.safe_load(value) if value.strip() else value, command)
    return target


def split_config_path(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """(YAML path or None, ``key=value`` items) from a command's positional arguments: a first item without
    ``=`` is the config file."""
    if items and "=" not in items[0]:
        return items[0], list(items[1:])
    return None, list(items)


def split_items(cls: type, items: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the ``key=value`` items that set a field of ``cls``, the others), in their order."""
    names = {item.name for item in dataclasses.fields(cls)}
    own = [item for item in items if item.partition("=")[0].split(".")[0].strip() in names]
    return own, [item for item in items if item not in own]


def options_help(cls: type, prefix: str = "") -> list[str]:
    """One line per field: ``key (default): help``, nested groups flattened with dots."""
    lines = []
    for item in dataclasses.fields(cls):
        if item.metadata.get("hidden"):
            continue
        default = item.default_factory() if item.default is dataclasses.MISSING else item.default
        if dataclasses.is_dataclass(default):
            lines += options_help(type(default), prefix + item.name + ".")
        else:
            lines.append(f"  {prefix + item.name} (default {default!r}): {item.metadata.get('help', '')}")
    return lines
