"""Datasets and ids files: CSV/NPZ/IDX in, `Dataset` out, and back.

CSV: a header; one label column (`label` unless told), an optional id column, every
other column a numeric feature. NPZ: arrays `X` (n, d), (n, C, H, W) or any (n, ...) of up
to five axes a row (sequences (n, T, F), volumes), `y` (n,),
optional `ids` (n,), `feature_names`, `class_names`; never pickled objects. IDX:
MNIST's format, the images file with its labels file beside it.

Labels are whole numbers 0..K-1, or names: a label column with no numbers at all is
read as class names and mapped to 0..K-1 in sorted order (or through the names a
checkpoint recorded), and the names travel with the model.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from puma_cli.data.dataset import MAX_ROW_AXES, Dataset
from puma_cli.errors import DataError
from puma_cli.io.atomic import sha256_file
from puma_cli.io.files import require_file
from puma_cli.io.npz import read_npz_arrays

if TYPE_CHECKING:
    from puma_cli.models.predict import Phases


def load_dataset(
    path: Path,
    label_col: str = "label",
    id_col: str = "id",
    class_names: Sequence[str] | None = None,
    known_sha256: str | None = None,
    phases: Phases | None = None,
) -> Dataset:
    """Read a CSV, NPZ or IDX file, or a folder of images (`root/<class>/*.png`);
    `class_names` maps named labels as a model recorded them. `known_sha256`: the file's
    sha256 where the caller has just taken it (a recorded file's check), so that the file
    is not hashed twice (a folder's images are hashed as they are read). `phases` is told
    of a folder's read, image by image (a file's read is not told)."""
    path = Path(path)
    if path.is_dir():
        from puma_cli.io.image_folder import read_image_folder

        return read_image_folder(path, class_names, phases)  # hashed as it is read
    require_file(path, "file", "a CSV, NPZ or IDX file, or a folder of images")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if _is_safetensors(head, path.stat().st_size):
        raise DataError(
            f"{path} is a safetensors file (a model or a network's weights), not data: give "
            "a CSV, NPZ or IDX file, or a folder of images"
        )
    if head[:2] == b"PK":
        dataset = _read_npz(path, class_names)
    elif _is_idx(head) or path.suffix == ".gz":
        dataset = _read_idx_pair(path)
    else:
        raw = path.read_bytes()
        if not raw.strip():
            raise DataError(f"{path} is empty; expected a header line and one row per point")
        dataset = _read_csv(path, raw, label_col, id_col, class_names)
    _check_finite(dataset, path)
    return replace(dataset, path=path, sha256=known_sha256 or sha256_file(path))


def _is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file opens with its JSON header's length (8 bytes, little-endian)
    and then the header's opening brace."""
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size


# --- CSV ---------------------------------------------------------------------------------


def _read_csv(
    path: Path, raw: bytes, label_col: str, id_col: str, class_names: Sequence[str] | None
) -> Dataset:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV"
        ) from exc
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError(
            f"{path} line {line} holds a NUL byte, which text CSV never does; the file is "
            "binary or damaged: save it as UTF-8 CSV"
        )
    table = _plain_table(text, label_col, id_col) or _csv_table(path, text)
    header, lines = table.header, table.lines
    if not lines:
        raise DataError(f"{path} has a header but no rows")
    if label_col not in header:
        # Quoted where a name holds a comma, so the list reads as the file's columns.
        shown = ", ".join(repr(h) if "," in h else h for h in header)
        raise DataError(
            f"{path} has no '{label_col}' column (columns: {shown}); "
            "name the label column with --label-col"
        )
    if len(set(header)) != len(header):
        twice = sorted({h for h in header if header.count(h) > 1})
        raise DataError(f"{path}: column name {twice[0]!r} appears twice; column names must differ")
    features = [c for c in header if c not in (label_col, id_col)]
    if not features:
        raise DataError(f"{path} has no feature columns besides '{label_col}'")
    if table.features is not None:
        X = table.features
    else:
        X = np.stack(
            [_numeric_column(path, name, table.columns[name], lines) for name in features],
            axis=1,
        )
    labels = [cell.strip() for cell in table.columns[label_col]]
    y, names = _parse_labels(path, labels, lines, class_names)
    if id_col in header:
        ids = _parse_ids(path, [c.strip() for c in table.columns[id_col]], lines)
    else:
        ids = np.array([str(i) for i in range(len(lines))])
    return Dataset(X=X, y=y, ids=ids, feature_names=tuple(features), class_names=names)


@dataclass
class _Table:
    """A CSV's header, the file's line number of each row, its cells by column name, and
    (from the plain reader) the feature columns already parsed as float64."""

    header: list[str]
    lines: list[int]
    columns: dict[str, Sequence[str]]
    features: np.ndarray | None = None


def _csv_table(path: Path, text: str) -> _Table:
    """Any CSV, by the csv module: quoted fields, blank lines skipped, and every row's
    length checked against the header's."""
    # newline=None: bare CR (old Mac) and CRLF line endings read like LF.
    reader = csv.reader(io.StringIO(text, newline=None))
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise DataError(
            f"{path} line {reader.line_num}: not readable as CSV ({exc}); features must be "
            "numbers of ordinary length, one row per line"
        ) from None
    lines = [i + 1 for i, row in enumerate(rows) if any(cell.strip() for cell in row)]
    rows = [rows[i - 1] for i in lines]
    header = [name.strip() for name in rows[0]]
    body, body_lines = rows[1:], lines[1:]
    for sep, called in ((";", "semicolons"), ("\t", "tabs")):
        if len(header) == 1 and sep in header[0]:
            raise DataError(
                f"{path} separates its columns with {called}; puma reads comma-separated "
                "values: save it as CSV with commas"
            )
    for row, line in zip(body, body_lines, strict=True):
        if len(row) != len(header):
            raise DataError(
                f"{path} line {line}: {len(row)} values, but the header has {len(header)}"
            )
    cells = list(zip(*body, strict=True)) if body else [() for _ in header]
    return _Table(header, body_lines, dict(zip(header, cells, strict=True)))


def _plain_table(text: str, label_col: str, id_col: str) -> _Table | None:
    """The common CSV, read by numpy's C parser, several times faster than the csv module
    and without a Python string per cell (200,000 rows of 30 features: 0.8 s against 4.6 s,
    a few hundred MB less): no quotes, no blank lines, as many commas on every line, no
    line past the csv module's field limit, the label column named, each feature a plain
    number. None where any of that fails; the csv module then reads the file as before and
    says what, if anything, is wrong."""
    if '"' in text:
        return None
    rows = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # as newline=None
    if rows[-1] == "":
        rows.pop()  # the last line's newline
    if len(rows) < 2 or any(not row.strip() for row in rows):
        return None
    if max(map(len, rows)) > csv.field_size_limit():  # a cell may be past the csv limit
        return None
    commas = rows[0].count(",")
    if any(row.count(",") != commas for row in rows):
        return None
    header = [name.strip() for name in rows[0].split(",")]
    if label_col not in header or len(set(header)) != len(header):
        return None
    wanted = [i for i, name in enumerate(header) if name not in (label_col, id_col)]
    text_cols = [i for i, name in enumerate(header) if name in (label_col, id_col)]
    if not wanted:
        return None
    try:
        X = np.loadtxt(rows[1:], delimiter=",", usecols=wanted, dtype=np.float64,
                       comments=None, ndmin=2)  # fmt: skip
        strings = np.loadtxt(rows[1:], delimiter=",", usecols=text_cols, dtype=str,
                             comments=None, ndmin=2)  # fmt: skip
    except ValueError:
        return None
    columns = {header[i]: strings[:, k] for k, i in enumerate(text_cols)}
    return _Table(header, list(range(2, len(rows) + 1)), columns, X)  # type: ignore[arg-type]


def _numeric_column(path: Path, name: str, cells: Sequence[str], lines: list[int]) -> np.ndarray:
    try:
        return np.array(cells, dtype=str).astype(np.float64)
    except ValueError:
        pass
    for cell, line in zip(cells, lines, strict=True):
        if not cell.strip():
            raise DataError(f"{path} line {line}, column '{name}' is empty; fill or drop that row")
        try:
            float(cell)
        except ValueError:
            raise DataError(
                f"{path} line {line}, column '{name}': {cell.strip()!r} is not a number; "
                "features must be numeric (encode categories as numbers)"
            ) from None
    raise DataError(f"{path}: column '{name}' could not be read as numbers")


def _parse_labels(
    path: Path, cells: list[str], lines: list[int], class_names: Sequence[str] | None
) -> tuple[np.ndarray, tuple[str, ...] | None]:
    numbers = [_as_number(cell) for cell in cells]
    if all(n is None for n in numbers):
        names = tuple(class_names) if class_names is not None else tuple(sorted(set(cells)))
        index = {name: i for i, name in enumerate(names)}
        for cell, line in zip(cells, lines, strict=True):
            if cell not in index:
                raise DataError(
                    f"{path} line {line}: label {cell!r} is not one of the model's classes "
                    f"({', '.join(names)})"
                )
        return np.array([index[c] for c in cells], dtype=np.int64), names
    y = np.empty(len(cells), dtype=np.int64)
    for i, (cell, number, line) in enumerate(zip(cells, numbers, lines, strict=True)):
        if number is None:
            if not cell:
                raise DataError(f"{path} line {line}: the label is empty; fill or drop that row")
            raise DataError(
                f"{path} line {line}: label {cell!r} is not a number, but other labels are; "
                "use class names throughout or whole numbers 0..K-1 throughout"
            )
        if not math.isfinite(number) or number != int(number) or number < 0:
            raise DataError(
                f"{path} line {line}: label {cell!r} is not a class; labels are whole numbers "
                "0..K-1 (or class names)"
            )
        y[i] = int(number)
    return y, None


def _as_number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _parse_ids(path: Path, cells: list[str], lines: list[int]) -> np.ndarray:
    first: dict[str, int] = {}
    for cell, line in zip(cells, lines, strict=True):
        if not cell:
            raise DataError(f"{path} line {line}: the id is empty; every row needs an id")
        if cell in first:
            raise DataError(
                f"{path} line {line}: id {cell!r} repeats line {first[cell]}; ids must be unique"
            )
        first[cell] = line
    return np.array(cells)


def _check_finite(dataset: Dataset, path: Path) -> None:
    if not np.issubdtype(dataset.X.dtype, np.floating):
        return  # whole numbers are always finite
    flat = dataset.X.reshape(len(dataset), -1)
    chunk = max(1, (1 << 24) // max(flat.shape[1], 1))  # some 16 M values at a time
    for start in range(0, len(dataset), chunk):
        bad = ~np.isfinite(flat[start : start + chunk])
        if not bad.any():
            continue
        row, col = (int(v) for v in np.argwhere(bad)[0])
        row += start
        value = flat[row, col]
        if dataset.X.ndim > 2:  # images, sequences: a position in the row, not a column
            at = ", ".join(str(int(i)) for i in np.unravel_index(col, dataset.X.shape[1:]))
            what = f"the value at [{at}]"
        elif col < len(dataset.feature_names):
            what = f"column '{dataset.feature_names[col]}'"
        else:
            what = f"feature {col}"
        raise DataError(
            f"{path}: id {dataset.ids[row]}, {what} is {value}; "
            f"{int(bad.any(axis=1).sum())} row(s) hold NaN or inf: fill or drop them"
        )


# --- NPZ ---------------------------------------------------------------------------------


def _read_npz(path: Path, class_names: Sequence[str] | None) -> Dataset:
    arrays = read_npz_arrays(path)
    for key in ("X", "y"):
        if key not in arrays:
            how = "np.savez(path, X=..., y=...)"
            if {"x_train", "y_train"} <= set(arrays):  # keras.datasets' archives (mnist.npz)
                how = (
                    "one split a file, d = np.load(path); "
                    "np.savez('train.npz', X=d['x_train'], y=d['y_train'])"
                )
            raise DataError(
                f"{path} has no array '{key}' (arrays: {', '.join(arrays) or 'none'}); save "
                f"the features as X and the labels as y: {how}"
            )
    X, y = arrays["X"], arrays["y"]
    if not 2 <= X.ndim <= 1 + MAX_ROW_AXES:
        raise DataError(
            f"{path}: X has shape {X.shape}; expected (n, d), (n, C, H, W) or (n, ...) with "
            f"1 to {MAX_ROW_AXES} axes per row"
        )
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise DataError(f"{path}: y has shape {y.shape}; expected ({X.shape[0]},) to match X")
    if X.shape[0] == 0:
        raise DataError(f"{path} holds no rows")
    if math.prod(X.shape[1:]) == 0:
        raise DataError(f"{path}: X has shape {X.shape}, no features; give at least one")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise DataError(f"{path}: X has dtype {X.dtype}; features must be real numbers")
    lines = list(range(X.shape[0]))
    if np.issubdtype(y.dtype, np.number):
        labels = [repr(v) for v in y.tolist()]
    else:
        labels = [str(v) for v in y.tolist()]
    try:
        y_int, names = _parse_labels(path, labels, lines, class_names)
    except DataError as exc:
        raise DataError(str(exc).replace(" line ", " row ")) from None
    if "class_names" in arrays and names is None:
        names = _npz_names(path, arrays["class_names"], "class_names")
        if len(names) <= int(y_int.max()):
            raise DataError(
                f"{path}: class_names has {len(names)} names but y holds label "
                f"{int(y_int.max())}; give one name per class 0..{int(y_int.max())}"
            )
    if "ids" in arrays:
        raw_ids = _npz_names(path, arrays["ids"], "ids")
        if len(raw_ids) != X.shape[0]:
            raise DataError(f"{path}: ids has {len(raw_ids)} entries but X has {X.shape[0]} rows")
        ids = _parse_ids(path, list(raw_ids), lines)
    else:
        ids = np.array([str(i) for i in range(X.shape[0])])
    width = math.prod(X.shape[1:])
    if "feature_names" in arrays:
        feature_names = _npz_names(path, arrays["feature_names"], "feature_names")
        if len(feature_names) != width:
            raise DataError(
                f"{path}: feature_names has {len(feature_names)} names for {width} features; "
                "give one name per feature or leave the array out"
            )
    else:
        feature_names = tuple(f"x{i}" for i in range(width))
    return Dataset(
        X=_compact(X),
        y=y_int,
        ids=ids,
        feature_names=feature_names,
        class_names=names,
        named_features="feature_names" in arrays,
    )


def _compact(X: np.ndarray) -> np.ndarray:
    """Features as stored (a memory map stays one; uint8 images stay uint8: 50,000 CIFAR
    images are 150 MB, not 1.2 GB as float64), widened only from types torch lacks."""
    if X.dtype in (np.bool_, np.uint16, np.uint32, np.uint64):
        return X.astype(np.int64)
    if X.dtype == np.float16:
        return X.astype(np.float32)
    if not X.dtype.isnative:
        return X.astype(X.dtype.newbyteorder("="))
    return X


def _npz_names(path: Path, array: np.ndarray, key: str) -> tuple[str, ...]:
    if array.ndim != 1:
        raise DataError(f"{path}: {key} has shape {array.shape}; expected one name per entry")
    return tuple(str(v) for v in array.tolist())


# --- IDX (MNIST) -------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _is_idx(raw: bytes) -> bool:
    return len(raw) >= 4 and raw[:2] == b"\x00\x00" and raw[2] in _IDX_DTYPES


def read_idx(path: Path) -> np.ndarray:
    """One IDX array (MNIST's format), gzipped or not."""
    require_file(path, "file", "an IDX file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path} is a damaged gzip file ({exc})") from exc
    if not _is_idx(raw):
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(
            f"{path}: IDX header declares {ndim} dimensions but the file is {len(raw)} bytes; "
            "the file is truncated or damaged"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow on absurd sizes
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: header promises {shape} ({expected} bytes) but the file holds "
            f"{len(raw) - header}; the file is truncated or damaged"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def idx_labels_path(images: Path) -> Path:
    """MNIST's naming: train-images-idx3-ubyte pairs with train-labels-idx1-ubyte."""
    return images.with_name(images.name.replace("images-idx3", "labels-idx1"))


def _read_idx_pair(path: Path) -> Dataset:
    if "images-idx3" not in path.name:
        raise DataError(
            f"{path}: an IDX dataset is given by its images file, named like "
            "'train-images-idx3-ubyte', with 'train-labels-idx1-ubyte' beside it"
        )
    labels_path = idx_labels_path(path)
    if not labels_path.exists():
        raise DataError(f"{path}: its labels file {labels_path} is missing; put it beside it")
    images, labels = read_idx(path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{path}: images {images.shape} and labels {labels.shape} do not pair up "
            "(expected (n, H, W) and (n,))"
        )
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and int(labels.min()) < 0):
        raise DataError(
            f"{labels_path}: labels are {labels.dtype} from {labels.min()} to {labels.max()}; "
            "IDX labels must be whole numbers 0..K-1 (ubyte)"
        )
    if images.shape[0] == 0:
        raise DataError(f"{path} holds no images")
    n = images.shape[0]
    return Dataset(
        X=images.astype(np.float64)[:, None, :, :],
        y=labels.astype(np.int64),
        ids=np.array([str(i) for i in range(n)]),
        feature_names=tuple(f"px{i}" for i in range(images.shape[1] * images.shape[2])),
        named_features=False,
    )


# --- writing -----------------------------------------------------------------------------


def save_dataset(path: Path, dataset: Dataset) -> None:
    """Write CSV (`id`, features, `label`) or, for a .npz path, NPZ. Floats round-trip exactly."""
    if Path(path).suffix == ".npz":
        with open(path, "wb") as handle:
            arrays: dict[str, np.ndarray] = {
                "X": dataset.X,
                "y": dataset.y,
                "ids": dataset.ids.astype(str),
                "feature_names": np.array(dataset.feature_names, dtype=str),
            }
            if dataset.class_names is not None:
                arrays["class_names"] = np.array(dataset.class_names, dtype=str)
            np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]
        return
    if dataset.X.ndim != 2:
        raise DataError(
            f"{path}: data of shape {dataset.X.shape} (not a table) can only be saved as .npz"
        )
    labels = (
        [dataset.class_names[i] for i in dataset.y]
        if dataset.class_names is not None
        else [str(int(v)) for v in dataset.y]
    )
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["id", *dataset.feature_names, "label"])
        for ident, row, label in zip(dataset.ids, dataset.X.tolist(), labels, strict=True):
            writer.writerow([ident, *(repr(v) for v in row), label])


@dataclass(frozen=True)
class DataOptions:
    label_col: str = "label"
    id_col: str = "id"
