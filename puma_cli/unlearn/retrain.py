"""The reference: re-run the recorded recipe on the rows that remain."""

from __future__ import annotations

from puma_cli.train import TrainRecipe, train_classifier
from puma_cli.unlearn import RemovalRequest, RemovalResult, register


@register("retrain")
def retrain(request: RemovalRequest) -> RemovalResult:
    recipe = TrainRecipe.from_dict(request.checkpoint.recipe)
    remaining = request.dataset.subset(request.remaining_rows)
    model = train_classifier(
        remaining, recipe, request.checkpoint.arch.n_classes, request.device, request.progress
    )
    return RemovalResult(model=model, method="retrain", parameters={"recipe": recipe.to_dict()})
