"""Amnesiac ML (Graves et al. 2021): subtract the recorded updates of the batches that held
marked points.

`train --record-updates` keeps every optimiser step's parameter update and the rows of
its batch in a sidecar, `<model stem>.updates.safetensors`: `updates` (steps, P) float32
and `batch_rows` (steps, batch size) int32 positions in the training file, -1 padded.
Its size is steps x P x 4 bytes: epochs x ceil(N / batch size) x parameters x 4.

A batch is all or nothing: removing one point removes its whole batch's step, which is
why the method needs the marked points grouped into few batches at training time
(`train --group-ids`, the paper's ordered scenario) to keep the model usable.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from puma_cli.errors import PumaError
from puma_cli.io.checkpoint import Checkpoint, single_model, stacked_tensor_pieces
from puma_cli.io.recorded import load_sidecar
from puma_cli.models.architectures import Classifier
from puma_cli.unlearn import RemovalRequest, RemovalResult, register

SIDECAR = "updates"


# The share of the machine's memory the recorded updates may take: they are held until
# training ends, beside the data, the model and its optimiser.
MEMORY_SHARE = 0.5


class UpdateRecorder:
    """A `train_classifier` step hook: keeps each batch (as training-file rows) and update.

    With `steps` (how many the training takes) it refuses at the first step, before the
    rest of training, a record that would take more than MEMORY_SHARE of `memory` (the
    machine's) or more than `disk` (free beside the output) bytes."""

    def __init__(
        self,
        file_rows: np.ndarray,
        batch_size: int,
        steps: int = 0,
        memory: int | None = None,
        disk: int | None = None,
    ) -> None:
        self.file_rows = torch.as_tensor(file_rows, dtype=torch.int32)
        self.batch_size = batch_size
        self.steps, self.memory, self.disk = steps, memory, disk
        self.updates: list[torch.Tensor] = []
        self.batches: list[torch.Tensor] = []

    def __call__(self, batch: torch.Tensor, update: torch.Tensor) -> None:
        if not self.updates:
            self._check_room(update.numel())
        rows = torch.full((self.batch_size,), -1, dtype=torch.int32)
        rows[: batch.numel()] = self.file_rows[batch.cpu()]
        self.batches.append(rows)
        self.updates.append(update.detach().float().cpu())

    def _check_room(self, parameters: int) -> None:
        need = self.steps * (parameters + self.batch_size) * 4
        short = []
        if self.memory is not None and need > MEMORY_SHARE * self.memory:
            short.append(f"half of this machine's {_gb(self.memory)} of memory")
        if self.disk is not None and need > self.disk:
            short.append(f"the {_gb(self.disk)} free on the output's disk")
        if short:
            raise PumaError(
                f"--record-updates would keep {self.steps:,} steps' updates of "
                f"{parameters:,} parameters, {_gb(need)}, held in memory until training "
                f"ends and written beside the model: more than {' and '.join(short)}; "
                "record fewer steps (a larger --batch-size or fewer --epochs), or compare "
                "with a baseline that records nothing (--method ssd, finetune or neggrad)"
            )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"updates": torch.stack(self.updates), "batch_rows": torch.stack(self.batches)}

    def pieces(self) -> Iterator[bytes | memoryview]:
        """The sidecar file, `tensor_bytes(self.tensors())` byte for byte, a piece at a
        time: never a second copy of the updates in memory."""
        return stacked_tensor_pieces({"updates": self.updates, "batch_rows": self.batches})


def _gb(size: int) -> str:
    return f"{size / 1e9:,.1f} GB"


def subtract_batches(
    model: Classifier, updates: torch.Tensor, batch_rows: np.ndarray, rows: np.ndarray
) -> tuple[Classifier, np.ndarray]:
    """A copy of `model` less the updates of every step whose batch holds one of `rows`;
    and the mask of those steps. With no such step the weights are the model's own."""
    hit = np.asarray(np.isin(batch_rows, rows).any(axis=1))
    new = copy.deepcopy(model)
    if hit.any():
        with torch.no_grad():
            theta = parameters_to_vector(new.parameters()).double()
            removed = torch.zeros_like(theta, device="cpu")
            for steps in torch.from_numpy(np.flatnonzero(hit)).split(256):  # not all in float64
                removed += updates[steps].double().sum(dim=0)
            removed = removed.to(theta.device)
            vector_to_parameters((theta - removed).float(), new.parameters())
    return new.eval(), hit


def _recorded_updates(checkpoint: Checkpoint, model: Classifier) -> tuple[torch.Tensor, np.ndarray]:
    """The sidecar's (steps, P) updates and (steps, B) batch rows, checked against the model
    and the training file: a sidecar of another model, or a damaged one, is refused."""
    tensors = load_sidecar(checkpoint, SIDECAR)
    path = checkpoint.sidecars[SIDECAR].path
    expected = sum(p.numel() for p in model.parameters())
    updates, batch_rows = tensors.get("updates"), tensors.get("batch_rows")
    fix = "retrain with --record-updates"
    if updates is None or batch_rows is None:
        raise PumaError(f"{path} lacks its 'updates' or 'batch_rows' tensor; {fix}")
    if (
        updates.dtype != torch.float32
        or batch_rows.dtype != torch.int32
        or updates.ndim != 2
        or batch_rows.ndim != 2
        or updates.shape[1] != expected
        or batch_rows.shape[0] != updates.shape[0]
    ):
        raise PumaError(
            f"{path} holds updates {tuple(updates.shape)} and batch rows "
            f"{tuple(batch_rows.shape)}, not (steps, {expected}) float32 and (steps, batch) "
            f"int32 for this model: it belongs to another model; {fix}"
        )
    rows = batch_rows.numpy()
    n = checkpoint.roles.size
    if rows.size and (int(rows.min()) < -1 or int(rows.max()) >= n):
        raise PumaError(f"{path} names rows outside the {n} of the training file; {fix}")
    if not bool(torch.isfinite(updates).all()):
        raise PumaError(f"{path} holds NaN or inf updates; it was damaged: {fix}")
    return updates, rows


@register("amnesiac")
def amnesiac(request: RemovalRequest) -> RemovalResult:
    checkpoint = request.checkpoint
    model = single_model(checkpoint, "--method amnesiac")
    if SIDECAR not in checkpoint.sidecars:
        raise PumaError(
            f"--method amnesiac subtracts the updates recorded at training, and "
            f"{checkpoint.path} was trained without them: retrain with `puma train "
            "--record-updates` (add --group-ids IDS for the ordered scenario), or use "
            "--method puma"
        )
    if checkpoint.provenance:
        done = ", ".join(str(p.get("op")) for p in checkpoint.provenance)
        raise PumaError(
            f"--method amnesiac needs the model as trained, but {checkpoint.path} has been "
            f"changed since ({done}): run amnesiac on the original checkpoint with every id "
            "to remove in one file"
        )
    updates, batch_rows = _recorded_updates(checkpoint, model)
    new, hit = subtract_batches(model, updates, batch_rows, request.marked)
    in_hit = np.unique(batch_rows[hit])
    in_hit = in_hit[in_hit >= 0]
    collateral = int(np.setdiff1d(in_hit, request.marked).size)
    warnings = []
    if collateral:
        warnings.append(
            f"amnesiac removed {int(hit.sum())} of {hit.size} training steps; their batches "
            f"also held {collateral} unmarked rows, whose updates went with them"
        )
    return RemovalResult(
        model=new,
        method="amnesiac",
        parameters={
            "steps_removed": int(hit.sum()),
            "steps": int(hit.size),
            "unmarked_rows_in_removed_batches": collateral,
        },
        warnings=warnings,
    )
