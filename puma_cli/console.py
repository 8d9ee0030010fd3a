"""The only module that imports rich: stderr console, progress bars, tables, the error line."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from puma_cli.models.predict import Phases as PhasesCallback
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
    view.add_column(overflow="fold")  # a path or digest wider than the column: never cut
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


class Bars:
    """The bars of one command on one rich Progress (rich draws one live display at a
    time): a bar per training run (`epochs`) and a bar per phase of a pass (`phases`).
    Without a Progress (not a terminal, --json) both are None: nothing is drawn."""

    def __init__(self, bar: Progress | None) -> None:
        self._bar = bar
        self._phases: dict[str, TaskID] = {}

    def epochs(self, label: str) -> ProgressCallback | None:
        """A callback for a training loop; its bar appears with the first epoch done."""
        bar = self._bar
        if bar is None:
            return None
        task: list[TaskID] = []

        def update(epoch: int, epochs: int, loss: float) -> None:
            if not task:
                task.append(bar.add_task(label, total=epochs, count=""))
            count = f"epoch {epoch}/{epochs} loss {loss:.4f}"
            bar.update(task[0], completed=epoch, total=epochs, count=count)

        return update

    def models(self, label: str) -> ProgressCallback | None:
        """A training-shaped callback that counts models (attack's shadows): drawn as
        `done/total`, as a phase, with no loss."""
        if self._bar is None:
            return None
        return lambda done, total, _loss: self._phase(label, done, total)

    @property
    def phases(self) -> PhasesCallback | None:
        return None if self._bar is None else self._phase

    def _phase(self, phase: str, done: int, total: int) -> None:
        """A phase that starts again after it finished (a new solve; compare's next method
        measuring its figures) gets a new bar."""
        assert self._bar is not None
        known = self._phases.get(phase)
        last = None if known is None else self._bar.tasks[known]
        if known is None or (last and last.finished and (done <= 1 or done < last.completed)):
            known = self._phases[phase] = self._bar.add_task(phase, total=total, count="")
        self._bar.update(known, completed=done, total=total, count=f"{done}/{total}")


@contextmanager
def bars(enabled: bool) -> Iterator[Bars]:
    """Rich bars on stderr (label, bar, count, elapsed) while the block runs; none drawn
    when not enabled (--json, a process other than rank 0) or stderr is no terminal."""
    console = _stderr()
    if not enabled or not console.is_terminal:
        yield Bars(None)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[count]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        yield Bars(bar)


@contextmanager
def phase_progress(enabled: bool) -> Iterator[PhasesCallback | None]:
    """One bar per phase (factor fitting, scores, each solve, the model's figures) on
    stderr, shown only on a terminal and never under --json."""
    with bars(enabled) as shown:
        yield shown.phases
