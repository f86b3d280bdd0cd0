"""The leaf every module that checks input imports: :class:`ConfigError` and :class:`Field`, the typed spec of one
setting (name, kind, default, constraint, one-line doc).

Every setting peftbench reads is a Field: the study's ``[train]``, ``[datasets.NAME]`` and ``[report]`` tables
(``peftbench.config``), each method's parameters (``peftbench.methods``) and the ``llm`` arm's settings
(``peftbench.llm``). From the same Fields come the checks (:meth:`Field.check`, one-line errors naming the field), the
README's reference tables (:meth:`Field.reference_row`) and the CLI flags of ``peftbench train``.

Kinds are ``int``, ``float``, ``str``, ``bool``, ``"int?"``, ``"float?"``, ``"str?"`` (None allowed),
``"list[str]"`` (a comma-separated string is split), ``"list[str]?"`` and ``"int|str"``. This module imports nothing
of peftbench's, so ``config`` and ``methods`` can both use it without importing each other.

Example::

    >>> from peftbench.fields import Field
    >>> epochs = Field("epochs", int, 3, "maximum number of passes over the training split", minimum=1)
    >>> epochs.check("train.epochs", 2)
    2
    >>> epochs.check("train.epochs", 0)
    Traceback (most recent call last):
    ...
    peftbench.fields.ConfigError: train.epochs: expected an integer >= 1, got 0
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable


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


@dataclass(frozen=True)
class Field:
    """One setting: its name, kind (see the module docstring), default, one-line doc and constraint.

    The constraint is ``choices`` (allowed values) or bounds (``minimum`` / ``maximum``, exclusive where said);
    ``expected`` words it in the error message when the generated wording ("an integer >= 1", "a number in [0, 1)",
    "one of a, b") would not say enough. ``parse(where, value) -> value`` replaces kind and constraint for the few
    settings whose rule is neither (a LoRA ``lora_alpha`` of ``"2r"``, a head policy or list of modules).
    """

    name: str
    kind: Any
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    expected: str | None = None
    parse: Callable[[str, Any], Any] | None = None

    @property
    def list_valued(self) -> bool:
        """A single value is a list of names (``target_modules``): a list of lists is then its grid."""
        return isinstance(self.kind, str) and self.kind.startswith("list[str]")

    def check(self, where: str, value: Any) -> Any:
        """``value`` converted to the field's kind, or a one-line ConfigError ``"<where>: expected ..., got ..."``."""
        if self.parse is not None:
            return self.parse(where, value)
        value = check_value(where, self.kind, value)
        if value is None:
            return None
        if self.choices is not None:  # a list-valued field: each of its items
            bad = [v for v in (value if self.list_valued else [value]) if v not in self.choices]
            if bad:
                raise ConfigError(f"{where}: expected {self.expected or 'one of ' + ', '.join(self.choices)}, "
                                  f"got {bad[0]!r}")
        low_bad = self.minimum is not None and (value <= self.minimum if self.exclusive_minimum
                                                else value < self.minimum)
        high_bad = self.maximum is not None and (value >= self.maximum if self.exclusive_maximum
                                                 else value > self.maximum)
        if low_bad or high_bad:
            raise ConfigError(f"{where}: expected {self.expected or self._bounds()}, got {value!r}")
        return value

    def _bounds(self) -> str:
        """The bounds in words: ``an integer >= 1``, ``a number > 0``, ``a number in [0, 1)``."""
        if self.minimum is not None and self.maximum is not None:
            return (f"a number in {'(' if self.exclusive_minimum else '['}{self.minimum:g}, "
                    f"{self.maximum:g}{')' if self.exclusive_maximum else ']'}")
        what = "an integer" if self.kind in (int, "int", "int?") else "a number"
        if self.minimum is not None:
            return f"{what} {'>' if self.exclusive_minimum else '>='} {self.minimum:g}"
        return f"{what} {'<' if self.exclusive_maximum else '<='} {self.maximum:g}"

    def reference_row(self) -> str:
        """The field's row of the README's reference tables: key, type, default, meaning."""
        shown = "—" if self.default is None else f"`{json.dumps(self.default)}`"
        return f"| `{self.name}` | {type_name(self.kind)} | {shown} | {self.doc} |"


def by_name(*fields: Field) -> dict[str, Field]:
    """A table's fields keyed by name, in the order given (the order of the reference tables and the CLI flags)."""
    return {f.name: f for f in fields}


def reference_table(title: str, fields: dict[str, Field]) -> str:
    """A markdown reference table of ``fields`` under a bold ``title`` (the README's config reference)."""
    return "\n".join([f"**{title}**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
                     + [f.reference_row() for f in fields.values()])
