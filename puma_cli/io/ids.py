"""Ids files: one id per line, blank lines and `#` comments allowed; ids to row positions.

A comment starts at a `#` that begins a line or follows white space (`9  # why`); a `#`
inside an id (`img#3`, `cat/photo#1.png`) is part of it. A UTF-8 byte-order mark (as
Windows Notepad writes) is skipped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from puma_cli.data.dataset import Dataset
from puma_cli.errors import DataError
from puma_cli.io.files import require_file


def read_ids(path: Path) -> list[str]:
    """Ids in file order, each once: one per line, blank lines and `#` comments skipped."""
    path = Path(path)
    require_file(path, "ids file", "an ids file (one id per line)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not a text ids file (one id per line)") from exc
    ids: dict[str, None] = {}
    for line in text.splitlines():
        entry = _entry(line)
        if entry:
            ids.setdefault(entry, None)
    return list(ids)


_COMMENT = re.compile(r"(^|\s)#.*$", re.DOTALL)


def _entry(line: str) -> str:
    """The id on one line of an ids file ('' for none)."""
    return _COMMENT.sub("", line).strip()


def write_ids(path: Path, ids: Sequence[str], comment: str = "") -> None:
    """One id per line under `comment`; an id that would not read back as itself (white
    space at an end, a line break, a `#` after white space) is refused."""
    for ident in ids:
        if "\n" in ident or "\r" in ident or _entry(ident) != ident:
            raise DataError(
                f"id {ident!r} cannot be written to an ids file, which holds one id per line "
                "and reads a '#' after white space as a comment; give the rows ids without "
                "them (an id column, or other file names)"
            )
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for line in comment.splitlines():
            handle.write(f"# {line}\n")
        for ident in ids:
            handle.write(f"{ident}\n")


def rows_for_ids(dataset: Dataset, ids: Sequence[str], ids_path: Path | str) -> np.ndarray:
    """Positions of the given ids in the dataset; every id must be there."""
    position = {ident: i for i, ident in enumerate(dataset.ids.tolist())}
    missing = [ident for ident in ids if ident not in position]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        if len(missing) == len(ids) > 1 and "," in ids[0]:  # a table, the data itself say
            first = ids[0] if len(ids[0]) <= 60 else ids[0][:57] + "..."
            raise DataError(
                f"{ids_path} looks like a table (its first line, {first!r}, holds commas), "
                f"and no line of it is an id of {dataset.name}: an ids file holds one id "
                "per line, as `puma mark` writes it"
            )
        raise DataError(
            f"{ids_path}: {len(missing)} id(s) are not in {dataset.name}: {shown}{more} "
            f"({_describe_ids(dataset)})"
        )
    return np.array([position[ident] for ident in ids], dtype=np.int64)


def _describe_ids(dataset: Dataset) -> str:
    ids = dataset.ids.tolist()
    if ids == [str(i) for i in range(len(ids))]:
        return f"its ids are the row numbers 0..{len(ids) - 1}"
    return f"its ids run {ids[0]!r}, {ids[1] if len(ids) > 1 else ''!r}, ..."
