"""A folder of images in the layout users already have: `root/<class>/.../<image>`.

Read as torchvision's `ImageFolder` reads it. Each sub-folder of the root is a class (named
by the folder, sorted, or mapped through the names a model recorded); each image under it,
at any depth (.png, .jpg, .jpeg, .bmp, .gif, .tif, .tiff, .webp, any case, in sorted
order; names starting with a dot are skipped), is one row, its id its path relative to the
root (`cat/0001.png`). Grey images give 1 channel and colour ones 3 (RGB, alpha dropped);
a folder that mixes them is read in colour, a grey image's channel repeated, as JPEG
collections often hold a few grey pictures. Every image must have the same size. The rows
are kept as uint8 (n, C, H, W), the same as an NPZ of images; 16-bit images are kept as
float32 on the same 0..255 scale (value / 257), as converting them to 8 bits saturates
them. The folder is recorded by a sha256 over the images it reads, so a file the reader
skips (`.DS_Store`, notes) does not count as a change.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from puma_cli.data.dataset import Dataset
from puma_cli.errors import DataError

if TYPE_CHECKING:  # types only: reading a folder needs no torch
    from puma_cli.models.predict import Phases, Tell

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
GREY = ("1", "L", "LA", "La")
DEEP = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey (older Pillow reads it as I)
TOLD_EVERY = 500  # images between two reports of a folder's read (about 0.1 s of it)


def read_image_folder(
    root: Path, class_names: Sequence[str] | None = None, phases: Phases | None = None
) -> Dataset:
    """The images under `root`, one class per sub-folder; `phases` is told of the read
    as `reading <root>/`, every TOLD_EVERY images."""
    files, ids, labels, names = _listed(root, class_names)
    X, digest = _read_all(files, ids, _teller(root, phases))
    width = int(np.prod(X.shape[1:]))
    return Dataset(
        X=X,
        y=np.array(labels, dtype=np.int64),
        ids=np.array(ids),
        feature_names=tuple(f"px{i}" for i in range(width)),
        class_names=names,
        named_features=False,
        path=root,
        sha256=digest,
    )


def index_image_folder(root: Path, phases: Phases | None = None) -> tuple[list[str], str]:
    """The ids of the images under `root` in the reader's order and the folder's digest
    (`read_image_folder`'s), every image read and hashed but none decoded: what `mark
    --random` needs (50,000 CIFAR-size PNGs take 13.9 s decoded, most of it decoding).
    The layout is checked as a read checks it; the images' contents are not."""
    files, ids, _, _ = _listed(root, None)
    return ids, _digest(files, ids, _teller(root, phases))


def _digest(files: list[str], ids: list[str], tell: Tell | None = None) -> str:
    """sha256 over each image's id and its own sha256, in the order given (`tell`ed every
    TOLD_EVERY images): the folder's digest, without decoding anything."""
    digest = hashlib.sha256()
    for i, path in enumerate(files):
        _add_image(digest, ids[i], hashlib.sha256(_bytes(path)).hexdigest())
        if tell is not None and ((i + 1) % TOLD_EVERY == 0 or i + 1 == len(files)):
            tell(i + 1, len(files))
    return digest.hexdigest()


def _listed(
    root: Path, class_names: Sequence[str] | None
) -> tuple[list[str], list[str], list[int], tuple[str, ...]]:
    """Every image under `root` in the reader's order (its path and its id), its class
    number, and the class names; a root without class folders, a class the model does not
    know and an empty class folder are refused."""
    listing = image_files(root)
    if not listing:
        raise DataError(
            f"{root} is a folder with no class folders; lay images out as "
            f"{root}/<class>/<image>.png"
        )
    names = tuple(class_names) if class_names is not None else tuple(listing)
    index = {name: i for i, name in enumerate(names)}
    files: list[str] = []
    ids: list[str] = []
    labels: list[int] = []
    for name, images in listing.items():
        if name not in index:
            raise DataError(
                f"{root / name}: class {name!r} is not one of the model's classes "
                f"({', '.join(names)})"
            )
        if not images:
            raise DataError(
                f"{root / name} holds no images ({', '.join(EXTENSIONS)}); remove the empty "
                "class folder or fill it"
            )
        files.extend(path for path, _ in images)
        ids.extend(image_id for _, image_id in images)
        labels.extend([index[name]] * len(images))
    return files, ids, labels, names


def _teller(root: Path, phases: Phases | None) -> Tell | None:
    phase = f"reading {Path(root).name}/"
    return None if phases is None else lambda done, total: phases(phase, done, total)


def _bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc}); check its permissions") from exc


def image_files(root: Path) -> dict[str, list[tuple[str, str]]]:
    """Class folder name -> its images at any depth as (path, id), the id the path
    relative to `root` with `/` between its parts; both in sorted order. Hidden names (a
    leading dot) are skipped, folders and files alike, and so is anything that is not an
    image by its suffix. Strings, not Paths: building 50,000 Paths took 1.7 s."""
    base = os.fspath(Path(root))
    listing: dict[str, list[tuple[str, str]]] = {}
    for folder in sorted(p for p in Path(base).iterdir() if p.is_dir() and not _hidden(p.name)):
        images: list[tuple[str, str]] = []
        seen: set[str] = set()  # real paths: a link back up the tree is walked once
        for at, dirs, names in os.walk(os.path.join(base, folder.name), followlinks=True):
            real = os.path.realpath(at)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = sorted(d for d in dirs if not _hidden(d))
            within = os.path.relpath(at, base).replace(os.sep, "/")  # once a folder
            images.extend(
                (os.path.join(at, n), f"{within}/{n}")
                for n in sorted(names)
                if not _hidden(n) and os.path.splitext(n)[1].lower() in EXTENSIONS
            )
        listing[folder.name] = images
    return listing


def folder_sha256(root: Path) -> str:
    """sha256 over each image's path relative to `root` and its own sha256, in the
    reader's order: renaming, adding, removing or changing an image changes it.
    `read_image_folder` takes the same digest from the bytes it decodes. The layout is
    not checked (a folder that changed so as not to read any more still has a digest)."""
    images = [image for listed in image_files(root).values() for image in listed]
    return _digest([path for path, _ in images], [image_id for _, image_id in images])


def _add_image(digest: Any, image_id: str, image_sha256: str) -> None:
    digest.update(f"{image_id}\0{image_sha256}\n".encode())


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _read_all(files: list[str], ids: list[str], tell: Tell | None) -> tuple[np.ndarray, str]:
    """(n, C, H, W), filled image by image, and `folder_sha256`'s digest: each file is
    read once, its bytes hashed and decoded (two thirds of the time of a pass to hash and
    another to decode: 50,000 CIFAR-size PNGs in 8.3 s on 2 cores, against 12.4). The first
    image sets the size; the array is widened to 3 channels at the first colour image of
    a grey one (and the other way round), to float32 at the first 16-bit image."""
    from PIL import Image, UnidentifiedImageError

    digest = hashlib.sha256()

    def pixels_of(i: int) -> np.ndarray:
        data = _bytes(files[i])
        _add_image(digest, ids[i], hashlib.sha256(data).hexdigest())
        return _pixels(files[i], data, Image, UnidentifiedImageError)

    first = pixels_of(0)
    out = np.empty((len(files), *first.shape), dtype=first.dtype)
    out[0] = first
    for i, path in enumerate(files[1:], start=1):
        pixels = pixels_of(i)
        if pixels.shape[1:] != first.shape[1:]:
            raise DataError(
                f"{path} is {_size(pixels.shape)}, but {files[0]} is {_size(first.shape)}; "
                "every image must have one size (resize them first)"
            )
        if pixels.shape[0] > out.shape[1]:  # the first colour image after grey ones
            out = np.repeat(out, pixels.shape[0], axis=1)
        if pixels.dtype != out.dtype and pixels.dtype == np.float32:
            out = out.astype(np.float32)
        out[i] = pixels  # a grey image broadcasts into 3 channels
        if tell is not None and (i + 1) % TOLD_EVERY == 0:
            tell(i + 1, len(files))
    if tell is not None:
        tell(len(files), len(files))
    return out, digest.hexdigest()


def _pixels(path: str, data: bytes, image_module: Any, unidentified: type[Exception]) -> np.ndarray:
    """(C, H, W) of the image file `path` holding `data`: uint8, or float32 on the 0..255
    scale for a 16-bit image."""
    try:
        with image_module.open(io.BytesIO(data)) as image:
            mode = image.mode
            if mode == "F":
                raise DataError(
                    f"{path} is a floating-point image, whose range puma cannot know; save "
                    "it as 8- or 16-bit, or give the data as an NPZ of arrays"
                )
            if mode in DEEP:
                pixels = _deep(path, np.asarray(image))
            else:
                converted = image.convert("L" if mode in GREY else "RGB")
                pixels = np.asarray(converted, dtype=np.uint8)
    except (unidentified, OSError, ValueError, SyntaxError) as exc:
        # Pillow names the buffer it read from, not the file: say what it means instead
        why = "no image format Pillow reads" if isinstance(exc, unidentified) else str(exc)
        raise DataError(f"{path} is not a readable image ({why}); replace or remove it") from exc
    return pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, 2, 0)


def _deep(path: str, values: np.ndarray) -> np.ndarray:
    if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
        raise DataError(
            f"{path} is a 32-bit image with values outside 0..65535, whose range puma cannot "
            "know; save it as 8- or 16-bit, or give the data as an NPZ of arrays"
        )
    return (values.astype(np.float32) / np.float32(257.0)).astype(np.float32)


def _size(shape: tuple[int, ...]) -> str:
    _, height, width = shape
    return f"{width}x{height}"
