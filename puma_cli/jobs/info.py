"""`puma info`: a checkpoint's metadata, with the state of each file it records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from puma_cli.io import checkpoint as ckpt
from puma_cli.io import recorded
from puma_cli.models.architectures import OPTIONAL_FIELDS, SHAPED_BY

# The recipe's names for the architecture's fields (`train` records both).
RECIPE_NAMES = {"args": "arch_args", "source": "arch_source"}


def describe(model: Path) -> dict[str, Any]:
    """The checkpoint's metadata, with the state of each recorded data file. The
    architecture and the recipe leave out the settings the net is not built from (a
    ResNet-18 or a user's class has no `--hidden` widths): every checkpoint records
    them, at their defaults where they do not apply."""
    checkpoint = ckpt.load_checkpoint(model)
    info = checkpoint.metadata()
    used = SHAPED_BY.get(checkpoint.arch.name, OPTIONAL_FIELDS)
    for name in set(OPTIONAL_FIELDS) - set(used):
        info["architecture"].pop(name, None)
        info["recipe"].pop(RECIPE_NAMES.get(name, name), None)
    info["model"] = str(model)
    info["data_status"] = recorded.data_status(checkpoint)
    return info
