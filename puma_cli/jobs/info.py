"""`puma info`: a checkpoint's metadata, with the state of each file it records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from puma_cli.io import checkpoint as ckpt
from puma_cli.io import recorded


def describe(model: Path) -> dict[str, Any]:
    """The checkpoint's metadata, with the state of each recorded data file."""
    checkpoint = ckpt.load_checkpoint(model)
    info = checkpoint.metadata()
    info["model"] = str(model)
    info["data_status"] = recorded.data_status(checkpoint)
    return info
