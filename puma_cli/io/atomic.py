"""Atomic output: write to a temporary file beside the target, then rename.

A command that writes several files stages them all first and renames them only
when every one was written, so a failure leaves none of them behind. A temporary file
is named `.NAME.<pid>.<random>.tmp`; one whose process was killed (SIGKILL cannot be
caught) is swept away by the next write of NAME.
"""

from __future__ import annotations

import glob
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from puma_cli.errors import OutputExistsError, PumaError
from puma_cli.io.files import is_regular_file, require_file

Writer = Callable[[Path], None]


def check_writable(paths: list[Path], overwrite: bool) -> None:
    """Refuse early, before any work is done, when an output exists or cannot be made."""
    seen: set[Path] = set()
    for path in paths:
        resolved = path.resolve()
        if resolved in seen:
            raise PumaError(f"{path} is named as two outputs; give each output its own path")
        seen.add(resolved)
        if path.is_dir():
            raise PumaError(f"{path} is a directory; give a file path for the output")
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
        if not path.parent.exists():
            raise PumaError(f"directory {path.parent} does not exist; create it first")


def check_not_input(output: Path, inputs: list[Path]) -> None:
    """An input is never modified: refuse an output that would replace one."""
    for path in inputs:
        if path.exists() and output.exists() and os.path.samefile(output, path):
            raise PumaError(f"{output} is also an input; write the output to another path")


def check_outputs(outputs: list[Path | None], inputs: list[Path | None], overwrite: bool) -> None:
    """Before any work: every output (None: not asked for) may be written and is no input."""
    wanted = [path for path in outputs if path is not None]
    check_writable(wanted, overwrite)
    given = [path for path in inputs if path is not None]
    for path in wanted:
        check_not_input(path, given)


@contextmanager
def _staged(path: Path) -> Iterator[Path]:
    sweep_stale_temporaries(path)
    prefix = f".{path.name}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); give it the mode any new file would get.
    os.chmod(tmp, 0o666 & ~_umask())
    tmp_path = Path(tmp)
    try:
        yield tmp_path
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def sweep_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files a killed puma left for `path` (`.NAME.<pid>.*.tmp`
    whose process is gone); those of a live process are left to it. Returns what went."""
    gone: list[Path] = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and is_regular_file(tmp):
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a pid: leave its file alone
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(writers: Mapping[Path, Writer], overwrite: bool) -> None:
    """Run each writer on a temporary path, then rename all of them into place.

    A writer receives the temporary path and must write the whole file there.
    """
    check_writable(list(writers), overwrite)
    staged: list[tuple[Path, Path]] = []
    try:
        for path, writer in writers.items():
            with _staged(path) as tmp:
                writer(tmp)
                with open(tmp, "rb") as handle:
                    os.fsync(handle.fileno())
                staged.append((tmp, path))
        check_writable(list(writers), overwrite)
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    require_file(Path(path), "file", "a data file")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a folder of images: over each image's path relative to it
    and its own sha256 (`io.image_folder.folder_sha256`), so that renaming, adding or
    changing an image changes it and a file the reader skips does not."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    from puma_cli.io.image_folder import folder_sha256

    return folder_sha256(path)
