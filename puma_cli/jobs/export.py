"""`puma export`: a model's network as a plain safetensors state dict, to deploy the
weights a removal wrote where the original ones ran.

The network's own tensor names by default (each name of a tied layer written, so that
`net.load_state_dict(load_file(path))` takes it as it is); with `--like FILE`, the names
and dtypes of that weights file (the one the model was imported from: its `module.`
prefix, another code base's names, float16), read as `puma import` reads it. A SISA
ensemble: each voting shard's network under `shard<k>.`, with its own transform, and the
aggregate in the metadata. The file's metadata (`puma_export`, JSON) records the model's
removals (their provenance entries, never the ids, nor their hash or the marked rows'
figures) and the transform the network expects its inputs through; the report warns
where that is one puma fitted, which the network alone does not apply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from puma_cli.errors import PumaError
from puma_cli.io import checkpoint as ckpt
from puma_cli.io.atomic import check_outputs, sha256_file, write_atomically
from puma_cli.io.weights import names_like
from puma_cli.models.architectures import Classifier, ShardEnsemble
from puma_cli.models.recipe import NO_TRANSFORM, TrainRecipe


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
    ensemble: dict[str, Any] | None = None  # a SISA ensemble's voting members and aggregate


def export(
    model: Path, output: Path, *, like: Path | None = None, overwrite: bool = False
) -> ExportReport:
    """Write the network of `model` to `output` as a plain state dict (a SISA ensemble's:
    each voting shard's network under `shard<k>.`)."""
    check_outputs([output], [model, like], overwrite)
    checkpoint = ckpt.load_checkpoint(model)
    recipe = TrainRecipe.from_dict(checkpoint.recipe)
    if isinstance(checkpoint.model, ShardEnsemble):
        if like is not None:
            raise PumaError(
                f"--like names the tensors of one imported network, and {model} is a SISA "
                "ensemble puma trained: export it without --like"
            )
        written = _members(checkpoint.model, recipe)
    else:
        written = _single(ckpt.single_model(checkpoint, "puma export"), recipe, like)
    imported = [e for e in checkpoint.provenance if e.get("op") == "import"]
    if like is None and imported and imported[0].get("names_from"):
        written.warnings.append(
            f"the weights were imported under {imported[0]['names_from']}, and these are "
            f"puma's names for them: give --like {imported[0]['weights']} to write them "
            "under that file's names"
        )
    provenance = [_deployable(entry) for entry in checkpoint.provenance]
    removals = [entry for entry in provenance if entry.get("op") == "remove"]
    record = {
        "model": str(model),
        "model_sha256": sha256_file(model),
        "architecture": checkpoint.arch.label,
        "provenance": provenance,
        "removals": removals,
        "inputs": written.inputs,
        **({} if written.ensemble is None else {"ensemble": written.ensemble}),
    }
    metadata = {"format": "pt", "puma_export": json.dumps(record)}
    tensors = written.tensors
    write_atomically({output: lambda tmp: save_file(tensors, str(tmp), metadata)}, overwrite)
    return ExportReport(
        output=output,
        model=model,
        tensors=len(tensors),
        names=written.names,
        n_parameters=written.n_parameters,
        removals=len(removals),
        inputs=written.inputs,
        warnings=written.warnings,
        ensemble=written.ensemble,
    )


@dataclass
class _Written:
    """What export writes: the tensors by name, and what the report and metadata say."""

    tensors: dict[str, Tensor]
    names: str
    n_parameters: int
    inputs: dict[str, Any] | None
    warnings: list[str]
    ensemble: dict[str, Any] | None = None


def _single(classifier: Classifier, recipe: TrainRecipe, like: Path | None) -> _Written:
    """One network: under its own names, or under those of the weights file `like`."""
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
    inputs, warnings = _inputs(classifier, recipe)
    n_parameters = sum(p.numel() for p in net.parameters())
    return _Written(tensors, names, n_parameters, inputs, warnings)


def _members(model: ShardEnsemble, recipe: TrainRecipe) -> _Written:
    """A SISA ensemble's voting shards, each network under `shard<k>.` with its own input
    transform (a shard's standardisation is fitted on its own rows). A shard that lost
    every row to removals no longer votes and is left out."""
    voting = [k for k in range(len(model.members)) if float(model.active[k]) > 0]
    left_out = [k for k in range(len(model.members)) if k not in voting]
    members = [f"shard{k}" for k in voting]
    tensors: dict[str, Tensor] = {}
    inputs: dict[str, Any] = {}
    warnings = [
        f"a SISA ensemble: the networks of its {len(voting)} voting shards are written under "
        f"{', '.join(m + '.' for m in members)}; it predicts the mean of their softmax "
        "outputs, each network behind its own inputs (puma_export's ensemble and inputs)"
    ]
    n_parameters = 0
    for k, prefix in zip(voting, members, strict=True):
        member = model.members[k]
        assert isinstance(member, Classifier)
        for name, tensor in member.net.state_dict().items():
            tensors[f"{prefix}.{name}"] = tensor.detach().cpu().clone().contiguous()
        inputs[prefix], said = _inputs(member, recipe)
        warnings += [w for w in said if w not in warnings]
        n_parameters += sum(p.numel() for p in member.net.parameters())
    if left_out:
        verb, pronoun = ("is", "it") if len(left_out) == 1 else ("are", "they")
        warnings.append(
            f"shard {', '.join(map(str, left_out))} lost every row to removals and {verb} "
            f"left out: {pronoun} no longer vote{'s' if pronoun == 'it' else ''}"
        )
    ensemble = {
        "members": members,
        "left_out": left_out,
        "aggregate": "mean of the members' softmax outputs, equal weights",
    }
    transforms = inputs if any(v is not None for v in inputs.values()) else None
    return _Written(tensors, "each voting shard's own, under shard<k>.", n_parameters,
                    transforms, warnings, ensemble)  # fmt: skip


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
