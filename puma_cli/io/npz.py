"""NPZ arrays without copies: memory-mapped where the archive stores them as they are.

`np.savez` stores each array uncompressed, so its bytes lie in the file as an `.npy`
member: puma maps them (`np.memmap`, read-only) instead of reading them, and a 50,000 x
3 x 32 x 32 uint8 set costs no memory until rows are used. Members of
`np.savez_compressed` archives are read (decompressed) as usual. Object arrays, which
only pickle could restore, are refused, never loaded. `read_npz_dataset` makes a
`Dataset` of an archive's `X`, `y` and optional `ids`, `feature_names`, `class_names`.
"""

from __future__ import annotations

import math
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from puma_cli.data.dataset import MAX_ROW_AXES, Dataset
from puma_cli.errors import DataError
from puma_cli.io.cells import parse_ids, parse_labels

_LOCAL_HEADER = 30  # a zip local file header's fixed part, before its name and extra field


def read_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the NPZ by name (without `.npy`): memory-mapped when stored, read
    when compressed. A damaged archive or an object array is a DataError."""
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
            arrays = {}
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if info.compress_type == zipfile.ZIP_STORED:
                    arrays[name] = _mapped(path, handle, info)
                else:
                    with archive.open(info) as member:
                        arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
            return arrays
    except ValueError as exc:
        if "pickle" in str(exc) or "object" in str(exc).lower():
            raise DataError(
                f"{path} holds pickled objects, which puma never loads; save plain numeric arrays"
            ) from exc
        raise DataError(f"{path} is not a readable NPZ file ({exc})") from exc
    except (zipfile.BadZipFile, OSError, EOFError, struct.error, KeyError) as exc:
        raise DataError(f"{path} is not a readable NPZ file ({exc})") from exc


def _mapped(path: Path, handle: BinaryIO, info: zipfile.ZipInfo) -> np.ndarray:
    handle.seek(info.header_offset)
    local = handle.read(_LOCAL_HEADER)
    if len(local) < _LOCAL_HEADER or local[:4] != b"PK\x03\x04":
        raise ValueError(f"member {info.filename} has no local header")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    handle.seek(info.header_offset + _LOCAL_HEADER + name_length + extra_length)
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    if dtype.hasobject:
        raise ValueError(f"member {info.filename} is an object array (needs pickle)")
    offset = handle.tell()
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if offset + count * dtype.itemsize > path.stat().st_size:
        raise ValueError(f"member {info.filename} is truncated")
    if count == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                     order="F" if fortran else "C")  # fmt: skip


def read_npz_dataset(path: Path, class_names: Sequence[str] | None) -> Dataset:
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
        y_int, names = parse_labels(path, labels, lines, class_names)
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
        ids = parse_ids(path, list(raw_ids), lines)
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
