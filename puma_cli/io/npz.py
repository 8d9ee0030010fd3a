"""NPZ arrays without copies: memory-mapped where the archive stores them as they are.

`np.savez` stores each array uncompressed, so its bytes lie in the file as an `.npy`
member: puma maps them (`np.memmap`, read-only) instead of reading them, and a 50,000 x
3 x 32 x 32 uint8 set costs no memory until rows are used. Members of
`np.savez_compressed` archives are read (decompressed) as usual. Object arrays, which
only pickle could restore, are refused, never loaded.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from puma_cli.errors import DataError

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
