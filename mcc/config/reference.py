"""The README's configuration reference table, made from the knobs.

``python -m mcc.config.reference README.md`` rewrites the table between the
``<!-- knobs -->`` and ``<!-- /knobs -->`` markers; ``tests/test_knobs.py`` fails when
the README's table is not what this module makes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .knobs import Entry, entries, shown_default
from .model import Config

__all__ = ["BEGIN", "END", "readme_table", "rewrite"]

BEGIN = "<!-- knobs: made by `python -m mcc.config.reference README.md` -->"
END = "<!-- /knobs -->"

_FLAG_NOTES = {
    "append": " (repeatable)",
    "pairs": " (repeatable)",
    "rules": " (repeatable)",
    "drive_dirs": " (repeatable)",
    "each_drive": " (each drive)",
}


def _key(entry: Entry) -> str:
    if entry.table is None:
        return f"`{entry.key}`"
    brackets = "[[{}]]" if entry.array else "[{}]"
    return f"`{brackets.format(entry.table)} {entry.name}`"


def _flag(entry: Entry) -> str:
    knob = entry.knob
    if entry.metavar is None:
        return f"`{knob.flag}`"
    return f"`{knob.flag} {entry.metavar}`" + _FLAG_NOTES.get(knob.kind, "")


def _default(entry: Entry) -> str:
    if entry.knob.default_doc is not None:
        return entry.knob.default_doc
    return f"`{shown_default(entry)}`" if shown_default(entry) != "unset" else "unset"


def _meaning(entry: Entry) -> str:
    text = entry.knob.doc or entry.knob.help
    if entry.choices and entry.knob.doc is None:
        text += ": " + ", ".join(f"`{c}`" for c in entry.choices)
    return text.replace("|", "\\|")


def readme_table() -> str:
    """The Markdown table of every key: key, flag, default, meaning."""
    lines = ["| key | flag | default | meaning |", "|---|---|---|---|"]
    for entry in entries(Config):
        cells = (_key(entry), _flag(entry), _default(entry), _meaning(entry))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rewrite(text: str) -> str:
    """``text`` (the README) with the table between the markers made anew.

    Raises:
      ValueError: the markers are missing.
    """
    head, begin, rest = text.partition(BEGIN + "\n")
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"the README has no {BEGIN!r} ... {END!r} markers")
    return head + begin + readme_table() + end + tail


def main(argv: list[str]) -> int:
    """Rewrite the table in each file named."""
    for name in argv:
        path = Path(name)
        path.write_text(rewrite(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
