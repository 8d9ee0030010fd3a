"""IDX files in: MNIST's format, the images file with its labels file beside it."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

from puma_cli.data.dataset import Dataset
from puma_cli.errors import DataError
from puma_cli.io.files import require_file

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def is_idx(raw: bytes) -> bool:
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
    if not is_idx(raw):
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


def read_idx_pair(path: Path) -> Dataset:
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
