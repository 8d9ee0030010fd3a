"""`puma export`: a model's network as a plain safetensors state dict, to deploy the
weights a removal wrote where the original ones ran.

The network's own tensor names by default (each name of a tied layer written, so that
`net.load_state_dict(load_file(path))` takes it as it is); with `--like FILE`, the names
and dtypes of that weights file (the one the model was imported from: its `module.`
prefix, another code base's names, float16), read as `puma import` reads it. The file's
metadata (`puma_export`, JSON) records the model's removals (their provenance entries,
never the ids, nor their hash or the marked rows' figures) and the transform the network
expects its inputs through; the report warns where that is one puma fitted, which the
network alone does not apply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from puma_cli.io import checkpoint as ckpt
from puma_cli.io.atomic import check_outputs, sha256_file, write_atomically
from puma_cli.io.weights import names_like
from puma_cli.models.architectures import Classifier
from puma_cli.models.training import NO_TRANSFORM, TrainRecipe


@dataclass
class ExportReport:
    output: Path
    model: Path
    tensors: int
    names: str  # whose names the tensors are written under
    n_parameters: int
    removals: int
    inputs: dict[str, Any] | None  # the transform the network expects, None: the values as they are
    warnings: list[str] = field(default_factory=list)


def export(
    model: Path, output: Path, *, like: Path | None = None, overwrite: bool = False
) -> ExportReport:
    """Write the network of `model` to `output` as a plain state dict."""
    check_outputs([output], [model, like], overwrite)
    checkpoint = ckpt.load_checkpoint(model)
    classifier = ckpt.single_model(checkpoint, "puma export")
    net = classifier.net
    held = {name: tensor.detach().cpu() for name, tensor in net.state_dict().items()}
    if like is None:
        tensors = {name: tensor.clone().contiguous() for name, tensor in held.items()}
        names = "the network's own"
    else:
        mapping = names_like(net, like, classifier.arch.label)
        tensors = {
            theirs: held[ours].to(dtype).contiguous().clone()
            for theirs, (ours, dtype) in mapping.items()
        }
        names = f"those of {like}"
    inputs, warnings = _inputs(classifier, TrainRecipe.from_dict(checkpoint.recipe))
    imported = [e for e in checkpoint.provenance if e.get("op") == "import"]
    if like is None and imported and imported[0].get("names_from"):
        warnings.append(
            f"the weights were imported under {imported[0]['names_from']}, and these are "
            f"puma's names for them: give --like {imported[0]['weights']} to write them "
            "under that file's names"
        )
    provenance = [_deployable(entry) for entry in checkpoint.provenance]
    removals = [entry for entry in provenance if entry.get("op") == "remove"]
    record = {
        "model": str(model),
        "model_sha256": sha256_file(model),
        "architecture": classifier.arch.label,
        "provenance": provenance,
        "removals": removals,
        "inputs": inputs,
    }
    metadata = {"format": "pt", "puma_export": json.dumps(record)}
    write_atomically({output: lambda tmp: save_file(tensors, str(tmp), metadata)}, overwrite)
    return ExportReport(
        output=output,
        model=model,
        tensors=len(tensors),
        names=names,
        n_parameters=sum(p.numel() for p in net.parameters()),
        removals=len(removals),
        inputs=inputs,
        warnings=warnings,
    )


def _deployable(entry: dict[str, Any]) -> dict[str, Any]:
    """A provenance entry as the deployed file carries it: without a removal's sha256 of
    its ids and its marked rows' losses and accuracies, which the checkpoint keeps for the
    owner's audit. Whoever holds the deployed weights could confirm a guessed id (an
    e-mail address, a user number) against the hash, and one marked row's loss is that
    row's own."""
    if entry.get("op") != "remove":
        return entry
    kept = {key: value for key, value in entry.items() if key != "ids_sha256"}
    metrics = kept.get("metrics")
    if isinstance(metrics, dict):
        kept["metrics"] = {k: v for k, v in metrics.items() if not k.startswith("marked_")}
    return kept


def _inputs(classifier: Classifier, recipe: TrainRecipe) -> tuple[dict[str, Any] | None, list[str]]:
    """The transform puma applies before the network, and a warning where the network's
    users must apply it themselves (puma fitted it: no pipeline of theirs holds it)."""
    if not recipe.standardize:
        if recipe.fixed_inputs() == NO_TRANSFORM:
            return None, []
        divisor, declared_mean, declared_std = recipe.fixed_inputs()
        # As declared at import: the transform the weights' own pipeline applies.
        return {"divisor": divisor, "mean": list(declared_mean), "std": list(declared_std)}, []
    mean, std = classifier.mean.detach().cpu(), classifier.std.detach().cpu()
    if bool((mean == 0).all()) and bool((std == 1).all()):
        return None, []
    per = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    return {"divisor": 1.0, **per}, [
        "puma standardised this model's inputs with its training rows' mean and std before "
        "the network, and the exported weights expect that: apply (x - mean) / std, with "
        "the report's inputs (also in the file's puma_export metadata), before calling it"
    ]
