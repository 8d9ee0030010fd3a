"""The only module that imports rich: stderr console, progress bars, tables, the error line."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from puma_cli.engine.derivatives import Phases as PhasesCallback
    from puma_cli.models.training import Progress as ProgressCallback


def _stdout() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def _stderr() -> Console:
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def error(message: str) -> None:
    """One line: `Error: ...` on stderr, never wrapped or styled."""
    print(f"Error: {message}", file=sys.stderr)


def warn(message: str) -> None:
    print(f"Warning: {message}", file=sys.stderr)


def emit_json(payload: dict[str, Any]) -> None:
    """The whole of stdout under --json: one JSON object."""
    text = json.dumps(_finite(payload), allow_nan=False, sort_keys=False, default=str)
    sys.stdout.write(text + "\n")


def _finite(value: Any) -> Any:
    """Standard JSON has no NaN or Infinity: such a figure is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def say(message: str) -> None:
    """A human line on stdout (never under --json)."""
    _stdout().print(message, markup=False)


def table(title: str, rows: list[tuple[str, Any]]) -> None:
    view = Table(title=title, show_header=False, title_justify="left", box=None)
    view.add_column(style="bold")
    view.add_column()
    for key, value in rows:
        view.add_row(key, _fmt(value))
    _stdout().print(view)


def grid(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """A table with a header row (numbers to 3 decimals, None as -) on stdout."""
    view = Table(title=title, title_justify="left", box=None)
    for name in header:
        first = name == header[0]
        view.add_column(name, justify="left" if first else "right", no_wrap=first)
    cells = [[f"{v:.3f}" if isinstance(v, float) else _fmt(v) for v in row] for row in rows]
    for row in cells:
        view.add_row(*row)
    # Never squeeze the figures into ellipses: as wide as the widest cell of each column.
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    console = _stdout()
    console.print(view, width=max(console.width, sum(widths) + 2 * len(widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if value is None:
        return "-"
    return str(value)


@contextmanager
def _bars(enabled: bool, *counts: TextColumn) -> Iterator[Progress | None]:
    """Rich bars on stderr (label, bar, `counts`, elapsed), or None when not enabled or
    stderr is no terminal."""
    console = _stderr()
    if not enabled or not console.is_terminal:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), *counts, TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        yield bar


@contextmanager
def epoch_progress(label: str, enabled: bool) -> Iterator[ProgressCallback | None]:
    """A progress bar on stderr while training, shown only on a terminal."""
    counts = (
        TextColumn("epoch {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
    )
    with _bars(enabled, *counts) as bar:
        if bar is None:
            yield None
            return
        task = bar.add_task(label, total=None, loss=float("nan"))

        def update(epoch: int, epochs: int, loss: float) -> None:
            bar.update(task, completed=epoch, total=epochs, loss=loss)

        yield update


@contextmanager
def phase_progress(enabled: bool) -> Iterator[PhasesCallback | None]:
    """One bar per phase of the engine (factor fitting, scores, each solve) on stderr, shown
    only on a terminal and never under --json."""
    with _bars(enabled, TextColumn("{task.completed}/{task.total}")) as bar:
        if bar is None:
            yield None
            return
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks or (done <= 1 and bar.tasks[tasks[phase]].finished):
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield update
