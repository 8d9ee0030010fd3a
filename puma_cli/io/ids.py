"""Ids files: one id per line, blank lines and `#` comments allowed; ids to row positions."""

from __future__ import annotations

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
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not a text ids file (one id per line)") from exc
    ids: dict[str, None] = {}
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            ids.setdefault(entry, None)
    return list(ids)


def write_ids(path: Path, ids: Sequence[str], comment: str = "") -> None:
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
