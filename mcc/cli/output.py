"""What the commands print: progress in bytes and plain tables, on a terminal or not."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence

from ..units import human_size

__all__ = ["pct", "print_table", "progress"]


# Without a terminal, progress is one plain line this often (a log stays readable).
_PLAIN_PROGRESS_SECONDS = 2.0


@contextlib.contextmanager
def progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar in bytes, with rate and time left, on standard error; when that
    is not a terminal, a plain line every few seconds instead. Yields
    ``update(bytes_done, bytes_total)``."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    if console.is_terminal:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(label, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total or None)
        return
    started = time.monotonic()
    shown = -math.inf

    def plain(done: int, total: int) -> None:
        nonlocal shown
        now = time.monotonic()
        if now - shown < _PLAIN_PROGRESS_SECONDS and done < total:
            return
        shown = now
        sys.stderr.write(_progress_line(label, done, total, now - started) + "\n")
        sys.stderr.flush()

    yield plain


def _progress_line(label: str, done: int, total: int, seconds: float) -> str:
    pct = f" ({100 * done // total} %)" if total else ""
    line = f"{label}: {human_size(done)} of {human_size(total)}{pct}"
    if seconds > 0 and done:
        rate = done / seconds
        line += f", {human_size(rate)}/s"
        if done < total:
            line += f", about {math.ceil((total - done) / rate)} s left"
    return line


def print_table(rows: Sequence[tuple[str, str]]) -> None:
    """Two columns on standard output (no borders, no wrapping of long values)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(no_wrap=True, overflow="ignore")
    for k, v in rows:
        table.add_row(Text(k), Text(v))  # Text: "[::1]:8080" is not markup
    console = Console()
    if not console.is_terminal:  # a pipe or a file: as wide as the table needs
        console = Console(width=max(map(len, dict(rows))) + max(len(v) for _, v in rows) + 4)
    console.print(table)


def pct(x: float | None) -> str:
    """A ratio as a percentage, ``-`` when there is none."""
    return "-" if x is None else f"{100 * x:.1f} %"
