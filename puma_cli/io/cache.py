"""Cache files beside a model: trusted only when they validate, written only on success.

A cache (the solved `H^-1 grad C`, the shadow models' predictions) saves time and
nothing else, so nothing about it may fail a command or leak into its outputs:
- one that is missing, stale (its key differs), damaged, or fails the caller's check
  (wrong shape, NaN) is recomputed; a damaged or failing one is reported in `notes`;
- what a command computes is staged, and written only by `commit()`, which the job
  calls after its outputs are in place, so a failing command leaves no cache behind;
- a cache that cannot be written (read-only folder, full disk) adds a note instead of
  an error; it is written atomically, with the mode any new file gets under the umask.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from puma_cli.errors import PumaError
from puma_cli.io.atomic import sweep_stale_temporaries, write_atomically
from puma_cli.io.files import is_regular_file

Tensors = dict[str, torch.Tensor]
Check = Callable[[Tensors, dict[str, str]], str | None]
"""Given a cache's tensors and metadata: None when usable, else what is wrong with it."""


class Cache:
    """One cache file at `path`, keyed by string metadata."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.notes: list[str] = []
        self._staged: bytes | None = None

    def load(self, key: dict[str, str], check: Check) -> tuple[Tensors, dict[str, str]] | None:
        """The cached tensors and metadata when the file exists, matches `key` and passes
        `check`; None otherwise (a damaged or failing file is noted). Temporaries that a
        killed run left for this cache are swept first, hit or miss."""
        sweep_stale_temporaries(self.path)
        if not self.path.exists():
            return None
        if not is_regular_file(self.path):
            self._note("is not a regular file")
            return None
        try:
            with safe_open(self.path, framework="pt", backend="pread") as handle:
                meta = dict(handle.metadata() or {})
                tensors = handle.get_tensors()  # read once, into the tensors
        except (SafetensorError, OSError, ValueError, RecursionError) as exc:
            self._note(f"is unreadable ({type(exc).__name__})")
            return None
        if any(meta.get(k) != v for k, v in key.items()):
            return None  # made for another model or other settings: not an error
        problem = check(tensors, meta)
        if problem is not None:
            self._note(problem)
            return None
        return tensors, meta

    def stage(self, tensors: Tensors, meta: dict[str, str]) -> None:
        """Keep what to write; `commit` writes it."""
        plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        self._staged = save_safetensors(plain, metadata=meta)

    def commit(self) -> None:
        """Write what was staged; a failure to write is a note, never an error."""
        if self._staged is None:
            return
        blob, self._staged = self._staged, None

        def write(tmp: Path) -> None:
            tmp.write_bytes(blob)

        try:
            write_atomically({self.path: write}, overwrite=True)
        except (OSError, PumaError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.notes.append(
                f"could not write the cache {self.path} ({reason}); the result is unaffected, "
                "and the next run recomputes it"
            )

    def _note(self, problem: str) -> None:
        self.notes.append(f"the cache {self.path} {problem}; recomputed it")


def commit_all(caches: list[Cache | None]) -> list[str]:
    """Write every staged cache; the notes of all of them (what was rebuilt or not written)."""
    notes: list[str] = []
    for cache in caches:
        if cache is not None:
            cache.commit()
            notes.extend(cache.notes)
    return notes
