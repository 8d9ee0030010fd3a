"""Reading files safely: only regular files are opened.

A FIFO, a device such as /dev/zero or a socket given where a file is expected would
block or never end; each reader refuses them before opening anything.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from puma_cli.errors import DataError, PumaError


def is_regular_file(path: Path) -> bool:
    """True for an existing regular file (links followed); False for anything else."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def require_file(path: Path, missing: str, give: str, error: type[PumaError] = DataError) -> None:
    """Refuse, with `error`, a path that is missing, a directory, or not a regular file.

    missing: what it should be, for "PATH: no such <missing>"; give: what to give
    instead, for "...; give <give>" (e.g. "a CSV, NPZ or IDX file").
    """
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: no such {missing}")
    if path.is_dir():
        raise error(f"{path} is a directory; give {give}")
    if not is_regular_file(path):
        raise error(f"{path} is not a regular file (a FIFO, device or socket); give {give}")
    if not os.access(path, os.R_OK):
        raise error(
            f"{path} is not readable (permission denied); give yourself read permission "
            "(chmod u+r) or run as a user who may read it"
        )


def is_text(raw: bytes) -> bool:
    """Whether a file's bytes read as text (UTF-8, no NUL in its first 4 KiB): a CSV, an
    ids file, a script. No safetensors file does: its first 8 bytes are its header's
    length, which holds NUL bytes for any header under 72 PB."""
    head = raw[:4096]
    if not head or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at 4 KiB is still text
        return exc.start >= len(head) - 3
    return True
