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


def require_regular_file(path: Path, what: str, error: type[PumaError] = DataError) -> None:
    """Refuse, with `error`, a path that exists but is not a regular file."""
    if Path(path).exists() and not Path(path).is_dir() and not is_regular_file(path):
        raise error(f"{path} is not a regular file (a FIFO, device or socket); give a {what} file")
