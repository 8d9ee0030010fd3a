"""`puma relink`: point a model at its training file once the rows removed from the model
have been deleted from the file too.

A deletion request is honoured twice: in the model (`puma remove`) and in the data. A
checkpoint records its training file's sha256 and refuses a changed file, and its row
roles (and a SISA plan) are by position in that file, so deleting rows would end every
later command. Each removal records the sha256 of the rows the model still holds, their
values and labels in order (`held_rows_sha256`); a file that holds exactly those rows is
the recorded file less the removed ones, whatever its ids, column order or path. Relink
checks that, and writes a checkpoint that records the new file, with the row roles and
the SISA plan taken to its rows. Nothing of the deleted rows is needed, and nothing of
them is kept beyond what the removal kept (a count and a hash of their ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from puma_cli.data.dataset import rows_digest
from puma_cli.errors import PumaError
from puma_cli.io import checkpoint as ckpt
from puma_cli.io import recorded
from puma_cli.io.atomic import check_outputs
from puma_cli.io.datasets import load_dataset
from puma_cli.models.predict import Phases
from puma_cli.models.shards import SisaPlan


@dataclass
class RelinkReport:
    output: Path
    model: Path
    data: Path
    rows: int  # rows of the new file: those the model holds
    dropped: int  # rows of the recorded file the model had removed
    warnings: list[str] = field(default_factory=list)


def relink(
    model: Path,
    data: Path,
    output: Path,
    *,
    overwrite: bool = False,
    phases: Phases | None = None,
) -> RelinkReport:
    """Write `output`: `model` recording `data`, the recorded training file less the rows
    the model has removed, as its training file."""
    check_outputs([output], [model, data], overwrite)
    checkpoint = ckpt.load_checkpoint(model)
    recorded.protect_recorded([output], checkpoint)
    held = np.flatnonzero(~np.isin(checkpoint.roles, ckpt.GONE))
    dropped = int(checkpoint.roles.size - held.size)
    last = _last_removal(checkpoint, model, dropped)
    previous = checkpoint.data["train"]
    assert previous is not None  # every checkpoint records its training file
    columns = (previous.label_col, previous.id_col)  # read as the recorded file was
    loaded = load_dataset(data, *columns, class_names=checkpoint.class_names, phases=phases)
    dataset = recorded.fit_to_model(checkpoint, loaded)
    if len(dataset) != held.size:
        raise PumaError(
            f"{data} has {len(dataset)} rows, and {model} holds {held.size} of the "
            f"{checkpoint.roles.size} rows of its training file ({dropped} removed): delete "
            "exactly the removed rows from that file, keeping the others in their order"
        )
    if rows_digest(dataset, np.arange(len(dataset))) != last["held_rows_sha256"]:
        raise PumaError(
            f"{data} has the {held.size} rows {model} holds, but not their values and labels "
            "in their order (a row changed, or rows moved; a CSV written again with its "
            "numbers rounded changes them): relink takes the recorded training file "
            "less the removed rows, every other row as it was, so delete those lines alone"
        )
    extra = dict(checkpoint.extra)
    if checkpoint.arch.shards > 1:  # the SISA plan, one shard and slice a row of the file
        plan = SisaPlan.from_tensors(extra)
        extra.update(SisaPlan(plan.shard[held], plan.slice[held], plan.states).to_tensors())
    warnings = []
    if checkpoint.sidecars:
        warnings.append(
            f"the recorded {', '.join(sorted(checkpoint.sidecars))} file is not carried over: "
            "it indexes the old file's rows, and --method amnesiac needs the model as trained"
        )
    entry = {
        "op": "relink",
        "rows": int(held.size),
        "dropped": dropped,
        "previous_sha256": previous.sha256,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    new = replace(
        checkpoint,
        data={**checkpoint.data, "train": ckpt.DataRecord.of(dataset, *columns)},
        roles=checkpoint.roles[held].copy(),
        extra=extra,
        sidecars={},
        provenance=[*checkpoint.provenance, entry],
    )
    ckpt.save_checkpoint(output, new, overwrite)
    return RelinkReport(output, model, data, int(held.size), dropped, warnings)


def _last_removal(checkpoint: ckpt.Checkpoint, model: Path, dropped: int) -> dict[str, Any]:
    """The latest removal's record, which says what the file must hold now (`dropped`:
    the rows the model has removed)."""
    removals = [e for e in checkpoint.provenance if e.get("op") == "remove"]
    if not removals or not dropped:
        raise PumaError(
            f"{model} has removed no rows since its training file was recorded, so that "
            "file is still the one it needs: restore it, or retrain on the new file"
        )
    last = removals[-1]
    if not isinstance(last.get("held_rows_sha256"), str):
        raise PumaError(
            f"{model}'s last removal was made by a puma older than relink and records no "
            "digest of the rows it kept: with the original file back in place, make that "
            "removal again with this version (from the model it was made from), then relink"
        )
    return last
