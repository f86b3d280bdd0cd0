"""The leaf every module that checks input imports: :class:`ConfigError` and the value checker of the field specs.

A field spec is ``name → (kind, default, one-line doc)``; kinds are ``int``, ``float``, ``str``, ``bool``, ``"int?"``,
``"float?"``, ``"str?"`` (None allowed), ``"list[str]"`` (a comma-separated string is split), ``"list[str]?"`` and
``"int|str"``. It imports nothing of peftbench's, so ``config`` (the study's specs) and ``methods`` (each method's
parameter specs) can both use it without importing each other.

Example::

    >>> from peftbench.fields import check_value
    >>> check_value("train.epochs", int, 3)
    3
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A study, flag or data file is not what peftbench expects. The message is one line naming the field."""


def type_name(kind: Any) -> str:
    """How a field's kind is written in the README's reference tables (``int``, ``int?``, ``list[str]``)."""
    return kind.__name__ if isinstance(kind, type) else str(kind)


def check_value(where: str, kind: Any, value: Any) -> Any:
    """Return ``value`` converted to ``kind`` or raise a one-line ConfigError naming ``where``."""
    if isinstance(kind, str) and kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    if kind in (int, "int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind in (float, "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind in (str, "str"):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if kind in (bool, "bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind == "list[str]":
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return list(value)
    if kind == "int|str":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer or a string, got {value!r}")
        return value
    raise AssertionError(f"unknown kind {kind}")
