"""`puma import`: weights trained elsewhere, wrapped into a puma checkpoint.

The user declares what puma cannot see: the architecture (built-in or FILE.py:Class),
the data the weights were trained on (every row counts as trained on, since puma does
not know which rows were held out: give held-out data with --val), and the recipe they
were trained with (epochs, lr, optimiser, batch size, weight decay), which
`remove --method retrain`, SISA-free baselines and shadow models re-run. Imported
weights take the inputs as they are, or behind the transform the user declares
(--input-divisor, --normalize-mean/std: torchvision's ToTensor and Normalize): no
standardisation is fitted, and the recorded recipe says so, so a retrained model sees
the data the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from puma_cli.data.dataset import Dataset, trained_rows_warning
from puma_cli.errors import PumaError
from puma_cli.io import checkpoint as ckpt
from puma_cli.io.atomic import check_outputs
from puma_cli.io.datasets import DataOptions, load_dataset
from puma_cli.io.weights import exported_record, load_into, read_state_dict
from puma_cli.jobs.train import class_count, figures, load_for
from puma_cli.models.architectures import Classifier, frozen_parameters
from puma_cli.models.predict import Phases, as_tensor, phase_teller
from puma_cli.models.recipe import (
    NO_TRANSFORM,
    TrainRecipe,
    architecture_for,
    check_trainable,
    mixing_warnings,
)
from puma_cli.models.user import check_logits
from puma_cli.quality.evaluation import evaluate_each, near_chance


@dataclass(frozen=True)
class ImportReport:
    model: Path
    weights: Path
    train_accuracy: float
    val_accuracy: float | None
    test_accuracy: float | None
    n_train: int
    n_parameters: int
    frozen_parameters: int | None  # of n_parameters, where some are (requires_grad False)
    seconds: float
    names_from: str | None  # whose tensor names the file used, where not the network's own
    inputs_from: str | None  # where the inputs transform came from, where not declared
    warnings: list[str]


def import_weights(
    weights: Path,
    output: Path,
    recipe: TrainRecipe,
    *,
    data: Path,
    val: Path | None = None,
    test: Path | None = None,
    options: DataOptions = DataOptions(),
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    phases: Phases | None = None,
    class_weight: str = "",
) -> ImportReport:
    """Fit `weights` to the declared architecture, measure them on the data, and save."""
    started = time.perf_counter()
    recipe = replace(recipe, standardize=False)
    recipe.validate()
    if recipe.shards > 1:
        raise PumaError("puma import wraps one network; a SISA ensemble is made by `puma train`")
    check_outputs([output], [weights, data, val, test], overwrite)
    weights_file = read_state_dict(weights)
    exported = exported_record(weights_file.header)
    if exported is not None and exported.get("ensemble"):
        raise PumaError(
            f"{weights} is a SISA ensemble written by `puma export` (one network a shard, "
            "under shard<k>.), and puma import wraps one network: give puma's commands the "
            f"ensemble's checkpoint ({exported.get('model')}) instead"
        )
    dataset = load_dataset(data, options.label_col, options.id_col, phases=phases)
    check_trainable(dataset, recipe)  # the recipe must run on it: retrain re-runs it
    n_classes = class_count(dataset)
    recipe = recipe.with_class_weights(class_weight, dataset.y, n_classes)
    val_set = load_for(val, dataset, options, n_classes, phases) if val is not None else None
    test_set = load_for(test, dataset, options, n_classes, phases) if test is not None else None
    model = Classifier(architecture_for(recipe, dataset, n_classes))
    names_from = load_into(model.net, weights_file.tensors, weights, model.arch.label)
    recipe, inputs_from, said = _recorded_inputs(recipe, exported, model, weights)
    model.fix_standardisation(*recipe.fixed_inputs())
    model = model.to(device).eval()
    first = as_tensor(dataset.X[:2], torch.float32, device)
    check_logits(model, first, n_classes, model.arch.label)
    measured = [dataset, *(d for d in (val_set, test_set) if d is not None)]
    found = iter(evaluate_each(model, measured, phase_teller(phases, "figures")))
    own = next(found)
    metrics: dict[str, Any] = {"train": figures(own)}
    warnings = said + _near_chance(own.accuracy, dataset.y, n_classes)
    warnings += _saturated(own.loss, dataset, recipe)
    warnings += mixing_warnings(dataset, recipe)
    every = np.arange(len(dataset))
    for given, use in ((val_set, "--val"), (test_set, "--test")):
        if given is not None:
            warnings += trained_rows_warning(dataset, every, given, use)
    if val_set is None:
        warnings.append(
            "no --val: remove, debug-labels and calibrate need held-out rows for their "
            "criterion, and will ask for --criterion-data FILE each time; import again "
            "with --val FILE (rows the weights were not trained on) to record them"
        )
    if val_set is not None:
        metrics["val"] = figures(next(found))
    if test_set is not None:
        metrics["test"] = figures(next(found))
    record = {"label_col": options.label_col, "id_col": options.id_col}
    checkpoint = ckpt.Checkpoint(
        model=model,
        recipe=recipe.to_dict(),
        data={
            "train": ckpt.DataRecord.of(dataset, **record),
            "val": ckpt.DataRecord.of(val_set, **record) if val_set is not None else None,
            "test": ckpt.DataRecord.of(test_set, **record) if test_set is not None else None,
        },
        roles=np.full(len(dataset), ckpt.ROLE_TRAINED, dtype=np.uint8),
        feature_names=dataset.feature_names,
        feature_names_given=dataset.named_features,
        class_names=dataset.class_names,
        metrics=metrics,
        provenance=[
            {
                "op": "import",
                "weights": str(Path(weights).resolve()),
                "weights_sha256": weights_file.sha256,
                "names_from": names_from,
                "inputs_from": inputs_from,
            }
        ],
    )
    ckpt.save_checkpoint(output, checkpoint, overwrite)
    return ImportReport(
        model=output,
        weights=weights,
        train_accuracy=metrics["train"]["accuracy"],
        val_accuracy=metrics["val"]["accuracy"] if "val" in metrics else None,
        test_accuracy=metrics["test"]["accuracy"] if "test" in metrics else None,
        n_train=len(dataset),
        n_parameters=sum(p.numel() for p in model.parameters()),
        frozen_parameters=frozen_parameters(model) or None,
        seconds=time.perf_counter() - started,
        names_from=names_from,
        inputs_from=inputs_from,
        warnings=warnings,
    )


def _recorded_inputs(
    recipe: TrainRecipe, exported: dict[str, Any] | None, model: Classifier, weights: Path
) -> tuple[TrainRecipe, str | None, list[str]]:
    """The recipe with the inputs transform a file `puma export` wrote records (`inputs`:
    the fitted standardisation, or the transform declared at import), where none is
    declared: the network was exported expecting it, so without it every row would reach
    it on another scale. Also where it came from, and a warning where a declared
    transform differs from the recorded one or the recorded one does not fit the rows."""
    inputs = exported.get("inputs") if exported is not None else None
    if not isinstance(inputs, dict):
        return recipe, None, []
    said = f"{weights} records an inputs transform (puma export's metadata)"
    try:
        recorded = (
            float(inputs["divisor"]),
            tuple(float(v) for v in inputs["mean"]),
            tuple(float(v) for v in inputs["std"]),
        )
    except (KeyError, TypeError, ValueError):
        unread = f"{said} that cannot be read; declare it with --input-divisor and --normalize-*"
        return recipe, None, [unread]
    if recipe.fixed_inputs() != NO_TRANSFORM:
        if _same_transform(recipe.fixed_inputs(), recorded):
            return recipe, None, []
        differs = f"{said}, and the declared one differs from it: the declared one is used"
        return recipe, None, [differs]
    divisor, mean, std = recorded
    taken = replace(recipe, input_divisor=divisor, normalize_mean=mean, normalize_std=std)
    try:
        taken.validate()
        model.fix_standardisation(*taken.fixed_inputs())
    except PumaError as exc:
        unfit = f"{said} that does not fit these rows ({exc}): the network takes them as they are"
        return recipe, None, [unfit]
    return taken, f"{weights} (puma export's inputs)", []


def _same_transform(
    a: tuple[float, tuple[float, ...], tuple[float, ...]],
    b: tuple[float, tuple[float, ...], tuple[float, ...]],
) -> bool:
    """Whether two (divisor, mean, std) transforms give the same values (one value stands
    for every channel), to float32's precision."""
    if not np.isclose(a[0], b[0], rtol=1e-5):
        return False
    for x, y in ((a[1] or (0.0,), b[1] or (0.0,)), (a[2] or (1.0,), b[2] or (1.0,))):
        if len(x) != len(y) and 1 not in (len(x), len(y)):
            return False
        left, right = np.broadcast_arrays(np.array(x), np.array(y))
        if not np.allclose(left, right, rtol=1e-5):
            return False
    return True


def _near_chance(accuracy: float, y: np.ndarray, n_classes: int) -> list[str]:
    """A warning when the weights do little better on their own training rows than always
    answering the largest class: most often they were trained on inputs transformed
    outside the network (torchvision's Normalize, a scaler) that was not declared."""
    majority = near_chance(accuracy, y, n_classes)
    if majority is None:
        return []
    return [
        f"the imported weights classify their training rows at {accuracy:.3f}, little better "
        f"than always answering the largest class ({majority:.3f}): if they were trained on "
        "inputs transformed outside the network, declare the transform (--input-divisor "
        "255 for torchvision's ToTensor; --normalize-mean/--normalize-std for its "
        "Normalize or a StandardScaler's mean_ and scale_) or put it in the network's "
        "forward, as puma gives the network the data as the file holds it"
    ]


# A mean training loss below this on 8-bit-looking values, with no transform declared:
# most often weights trained on those values / 255 (torchvision's ToTensor).
SATURATED_LOSS = 1e-6


def _saturated(loss: float, dataset: Dataset, recipe: TrainRecipe) -> list[str]:
    """A warning when the weights fit their training rows to a loss of ~0 on values that
    look 8-bit (whole numbers past 1) and no transform was declared: a network trained on
    ToTensor's 0..1 values given 0..255 ones has logits hundreds apart, still right (its
    accuracy gives nothing away) but at a loss of 0, where no row has an influence."""
    if loss >= SATURATED_LOSS or recipe.fixed_inputs() != NO_TRANSFORM:
        return []
    sample = np.asarray(dataset.X[:256], dtype=np.float64)
    if not (sample.max(initial=0.0) > 1 and np.array_equal(sample, np.round(sample))):
        return []
    return [
        f"the imported weights fit their training rows to a mean loss of {loss:.2g} on "
        "values from 0 to 255, as a network trained on them divided by 255 does: if it was "
        "trained through torchvision's ToTensor, import with --input-divisor 255 (and "
        "--normalize-mean/--normalize-std for a Normalize after it); at a loss of 0 no "
        "row has an influence left for a removal to take out"
    ]
