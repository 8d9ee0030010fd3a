"""A folder of images in the layout users already have: `root/<class>/<image>`.

Each sub-folder of the root is a class (named by the folder, sorted, or mapped through
the names a model recorded); each image in it (.png, .jpg, .jpeg, .bmp, .gif, .tif,
.tiff, .webp, in sorted order) is one row, its id its path relative to the root
(`cat/0001.png`). Grey-scale images give 1 channel, the rest 3 (RGB); every image must
have the same size and channel count. The rows are kept as uint8 (n, C, H, W), the same
as an NPZ of images, and the folder is recorded by a sha256 over its files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from puma_cli.data.dataset import Dataset
from puma_cli.errors import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
GREY = ("1", "L", "LA", "I", "I;16", "F")


def read_image_folder(root: Path, class_names: Sequence[str] | None = None) -> Dataset:
    """The images under `root`, one class per sub-folder."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(
            f"{root} is a folder with no class folders; lay images out as "
            f"{root}/<class>/<image>.png"
        )
    names = tuple(class_names) if class_names is not None else tuple(f.name for f in folders)
    index = {name: i for i, name in enumerate(names)}
    files: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        if folder.name not in index:
            raise DataError(
                f"{folder}: class {folder.name!r} is not one of the model's classes "
                f"({', '.join(names)})"
            )
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
        if not images:
            raise DataError(
                f"{folder} holds no images ({', '.join(EXTENSIONS)}); remove the empty class "
                "folder or fill it"
            )
        files.extend(images)
        labels.extend([index[folder.name]] * len(images))
    X = _read_all(files)
    ids = np.array([f.relative_to(root).as_posix() for f in files])
    width = int(np.prod(X.shape[1:]))
    return Dataset(
        X=X,
        y=np.array(labels, dtype=np.int64),
        ids=ids,
        feature_names=tuple(f"px{i}" for i in range(width)),
        class_names=names,
        named_features=False,
    )


def _read_all(files: list[Path]) -> np.ndarray:
    """(n, C, H, W) uint8, filled image by image; the first image sets the shape."""
    from PIL import Image, UnidentifiedImageError

    first = _pixels(files[0], Image, UnidentifiedImageError)
    out = np.empty((len(files), *first.shape), dtype=np.uint8)
    out[0] = first
    for i, path in enumerate(files[1:], start=1):
        pixels = _pixels(path, Image, UnidentifiedImageError)
        if pixels.shape != first.shape:
            raise DataError(
                f"{path} is {_describe(pixels.shape)}, but {files[0]} is "
                f"{_describe(first.shape)}; every image must have one size and channel count "
                "(resize them first)"
            )
        out[i] = pixels
    return out


def _pixels(path: Path, image_module: Any, unidentified: type[Exception]) -> np.ndarray:
    try:
        with image_module.open(path) as image:
            grey = image.mode in GREY
            converted = image.convert("L" if grey else "RGB")
            pixels = np.asarray(converted, dtype=np.uint8)
    except (unidentified, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path} is not a readable image ({exc}); replace or remove it") from exc
    return pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, 2, 0)


def _describe(shape: tuple[int, ...]) -> str:
    channels, height, width = shape
    return f"{width}x{height} with {channels} channel{'s' if channels > 1 else ''}"
