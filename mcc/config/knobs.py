"""How a config key is told to people: its flag, help text and unit, declared once.

Theory of operation: every leaf key of :class:`~mcc.config.model.Config` is an attrs
field made with :func:`knob`, which stores a :class:`Knob` in the field's metadata.
A field holding a table (``[timeouts]``) or an array of tables (``[[drives]]``) is made
with :func:`section` instead, and its class's fields are knobs in turn. :func:`entries`
walks them in declaration order. Everything that names keys is derived from that walk:
the command-line flags and their help (:mod:`mcc.cli.flags`), how sizes and durations
are read and written (:mod:`mcc.config.convert`), and the README's reference table
(:mod:`mcc.config.reference`); ``tests/test_knobs.py`` checks the README and
``fixtures/mcc.example.toml`` against it.
"""

from __future__ import annotations

import functools
import json
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import attrs

from ..units import format_duration, format_size

__all__ = ["Entry", "FlagKind", "Knob", "Unit", "entries", "knob", "section", "shown_default"]

KNOB = "mcc.knob"
SECTION = "mcc.section"

# "size": bytes, or a string like "1MiB"; "duration": seconds, or a string like "10s"
Unit = Literal["size", "duration"]

# How a flag's text becomes the key's value (see mcc.cli.flags):
#   value       one value (``--block-size 4MiB``)
#   append      repeatable, the list of every value given (``--listen A --listen B``)
#   off         a switch that sets the key to false (``--no-origin-fallback``)
#   pairs       repeatable ``KEY=VALUE``, a table (``--canonical-host a=b``)
#   rules       repeatable ``PATTERN=SPEC``, refresh rules (``--refresh-pattern``)
#   drive_dirs  repeatable; one drive per folder, replacing the configured drives
#   each_drive  sets this key of every drive (``--max-size``)
_UNIT_METAVARS = {"size": "SIZE", "duration": "DURATION"}

FlagKind = Literal["value", "append", "off", "pairs", "rules", "drive_dirs", "each_drive"]


@attrs.frozen
class Knob:
    """What people see of one key.

    Args:
      flag: the command-line flag (``--block-size``).
      help: the flag's one-line ``--help`` text (plain text: ``%`` needs no escaping).
      unit: how the value is read and written, when it is a size or a duration.
      kind: how the flag's text becomes the value.
      metavar: the flag's placeholder; by default from the unit (``SIZE``), none for
        a choice among fixed words.
      doc: the README reference table's "meaning", when it says more than ``help``.
      default_doc: the README's default, when the value itself says too little.
    """

    flag: str
    help: str
    unit: Unit | None = None
    kind: FlagKind = "value"
    metavar: str | None = None
    doc: str | None = None
    default_doc: str | None = None


def knob(
    default: Any = attrs.NOTHING,
    *,
    flag: str,
    help: str,
    unit: Unit | None = None,
    kind: FlagKind = "value",
    metavar: str | None = None,
    doc: str | None = None,
    default_doc: str | None = None,
    factory: Any = None,
) -> Any:
    """An attrs field that is a config key, with its :class:`Knob` as metadata."""
    meta = {KNOB: Knob(flag, help, unit, kind, metavar, doc, default_doc)}
    if factory is not None:
        return attrs.field(factory=factory, metadata=meta)
    return attrs.field(default=default, metadata=meta)


def section(cls: type, default: Any, *, array: bool = False) -> Any:
    """An attrs field holding a table (``[timeouts]``) or, with ``array``, an array of
    tables (``[[drives]]``) of class ``cls``, whose own fields are knobs."""
    return attrs.field(default=default, metadata={SECTION: (cls, array)})


@attrs.frozen
class Entry:
    """One key as :func:`entries` finds it."""

    path: tuple[str, ...]  # ("block_size",), ("limits", "max_ranges"), ("drives", "path")
    knob: Knob
    type: Any  # the field's type, resolved (``int``, ``Literal["text", "json"]`` ...)
    default: Any  # attrs.NOTHING when there is none
    array: bool = False  # the key is in each table of an array of tables

    @property
    def metavar(self) -> str | None:
        """The flag's placeholder (``SIZE``, ``HOST:PORT``), None for a switch or a choice."""
        if self.knob.kind == "off" or self.choices:
            return None
        return self.knob.metavar or _UNIT_METAVARS.get(self.knob.unit or "", "VALUE")

    @property
    def choices(self) -> tuple[str, ...]:
        """The words the key takes when its type is a Literal, else ()."""
        if typing.get_origin(self.type) is Literal:
            return tuple(str(c) for c in typing.get_args(self.type))
        return ()

    @property
    def key(self) -> str:
        """The dotted key: ``limits.max_ranges``."""
        return ".".join(self.path)

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def table(self) -> str | None:
        """The table the key is in, or None for a top-level key."""
        return self.path[0] if len(self.path) > 1 else None


def entries(config_cls: type) -> tuple[Entry, ...]:
    """Every key of ``config_cls`` with its knob, in declaration order.

    Raises:
      TypeError: a field is neither a knob nor a section (it would have no flag).
    """
    return _entries(config_cls)


@functools.cache
def _entries(config_cls: type) -> tuple[Entry, ...]:
    return tuple(_walk(config_cls))


def _walk(config_cls: type) -> Iterator[Entry]:
    hints = typing.get_type_hints(config_cls)
    for field in attrs.fields(config_cls):
        if SECTION in field.metadata:
            cls, array = field.metadata[SECTION]
            sub_hints = typing.get_type_hints(cls)
            for sub in attrs.fields(cls):
                path = (field.name, sub.name)
                yield Entry(path, _knob_of(sub), sub_hints[sub.name], _default(sub), array)
        else:
            yield Entry((field.name,), _knob_of(field), hints[field.name], _default(field))


def _knob_of(field: attrs.Attribute[Any]) -> Knob:
    found = field.metadata.get(KNOB)
    if not isinstance(found, Knob):
        raise TypeError(f"config field {field.name!r} is declared without knob()")
    return found


def _default(field: attrs.Attribute[Any]) -> Any:
    default: Any = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        # a default made from the other fields has no value of its own: say it in default_doc
        return attrs.NOTHING if default.takes_self else default.factory()
    return default


def sized_fields(cls: type) -> list[str]:
    """The fields of ``cls`` whose unit is a size."""
    out = []
    for field in attrs.fields(cls):
        found = field.metadata.get(KNOB)
        if isinstance(found, Knob) and found.unit == "size":
            out.append(field.name)
    return out


def sections(config_cls: type) -> dict[str, tuple[type, bool]]:
    """The fields of ``config_cls`` that hold tables: name -> (class, array)."""
    return {f.name: f.metadata[SECTION] for f in attrs.fields(config_cls) if SECTION in f.metadata}


def shown_default(entry: Entry) -> str:
    """The default as people read it: ``1MiB``, ``10s``, ``["127.0.0.1:8080"]``, ``unset``."""
    if entry.knob.default_doc is not None:
        return entry.knob.default_doc.replace("`", "")
    value = entry.default
    if value is attrs.NOTHING or value is None:
        return "unset"
    if entry.knob.unit == "size":
        return format_size(value)
    if entry.knob.unit == "duration":
        return format_duration(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return json.dumps([str(v) for v in value])
    if isinstance(value, Mapping):
        return json.dumps({str(k): str(v) for k, v in value.items()})
    if isinstance(value, str) and not value:
        return '""'
    return str(value)
