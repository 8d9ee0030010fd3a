"""What every benchmark script shares: its command line, the loop over cases, Markdown
tables and the results files. Each script keeps only what it measures."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "sample_data"
RESULTS = ROOT / "benchmarks" / "results"

Row = dict[str, Any]


def arguments(
    doc: str | None,
    out_name: str,
    datasets: Iterable[str],
    *,
    seeds: int | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """--datasets, --out (benchmarks/results/<out_name> by default), --seeds COUNT when
    `seeds` gives a default, and whatever `extra` adds."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="*", default=list(datasets))
    if seeds is not None:
        parser.add_argument("--seeds", type=int, default=seeds)
    if extra is not None:
        extra(parser)
    parser.add_argument("--out", type=Path, default=RESULTS / out_name)
    return parser.parse_args()


def run_cases(
    cases: Iterable[tuple[Any, ...]], run: Callable[..., list[Row]], *, fresh: bool = False
) -> list[Row]:
    """run(*case, work_folder) for every case, in one temporary folder (or a fresh one per
    case), printing each case's time as it finishes."""
    rows: list[Row] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as shared:
        for case in cases:
            t0 = time.perf_counter()
            if fresh:
                with tempfile.TemporaryDirectory() as own:
                    rows.extend(run(*case, Path(own)))
            else:
                rows.extend(run(*case, Path(shared)))
            label = " ".join(str(part) for part in case)
            print(
                f"{label}: {time.perf_counter() - t0:.0f} s "
                f"({time.perf_counter() - started:.0f} s in all)",
                flush=True,
            )
    return rows


def grouped(rows: Iterable[Row], *keys: str) -> dict[tuple[Any, ...], list[Row]]:
    """Rows by the values of `keys`, groups in the order they first appear."""
    groups: dict[tuple[Any, ...], list[Row]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    return dict(groups)


def means(rows: Sequence[Row], *fields: str) -> dict[str, float]:
    return {f: statistics.fmean(r[f] for r in rows) for f in fields}


def table(header: Sequence[str], lines: Iterable[Sequence[object]]) -> str:
    """A Markdown table; cells are written as given."""
    out = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    out += ["| " + " | ".join(str(cell) for cell in line) + " |" for line in lines]
    return "\n".join(out)


def invocation(script: str) -> str:
    """The command line that produced a result, as Markdown code."""
    return "`" + " ".join(["python", f"benchmarks/{Path(script).name}", *sys.argv[1:]]) + "`"


def write_results(out: Path, text: str, rows: list[Row] | None = None) -> None:
    """The Markdown report at `out`, the raw rows beside it as JSON, the report on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if rows is not None:
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    print(text)
