"""nn.EmbeddingBag through ops every derivative the engine takes knows.

An EmbeddingBag (the bag-of-tokens layer of PyTorch's text classifiers: the mean, sum or
max of a row's token embeddings) runs one fused kernel, `_embedding_bag`, which has no
forward-mode derivative (the scores, the Gauss-Newton products) and whose backward has
no derivative of its own (the exact Hessian): a model with one could train but not have
points removed. `bag_forward` computes the same function from an embedding lookup and a
masked reduction (the tokens at `padding_idx` left out of the bag and of a mean's count,
an empty bag 0, as the kernel gives), which the engine's passes run in its place
(`composite_kernels`); training and prediction keep the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def runs_composite(bag: nn.Module) -> bool:
    """Whether `bag_forward` stands for this layer: an EmbeddingBag without max_norm (which
    renormalises the weight in place as it runs)."""
    return isinstance(bag, nn.EmbeddingBag) and bag.max_norm is None


def bag_forward(
    self: nn.EmbeddingBag,
    input: Tensor,
    offsets: Tensor | None = None,
    per_sample_weights: Tensor | None = None,
) -> Tensor:
    """nn.EmbeddingBag.forward's function: (B, N) ids a bag a row, or flat ids with
    `offsets` (where each bag starts; the last one its end with include_last_offset)."""
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("if input is 2D, then offsets has to be None")
        bag_of = None
        count = input.shape[0]
    elif input.dim() == 1 and offsets is not None and self.mode != "max":
        starts = offsets[:-1] if self.include_last_offset else offsets
        count = int(starts.numel())
        positions = torch.arange(input.numel(), device=input.device)
        bag_of = torch.bucketize(positions, starts, right=True) - 1
    else:  # max over flat bags: the layer's own kernel, as before
        return nn.EmbeddingBag.forward(self, input, offsets, per_sample_weights)
    rows = F.embedding(input, self.weight)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(-1).to(rows.dtype)
    kept = (
        torch.ones(input.shape, dtype=torch.bool, device=input.device)
        if self.padding_idx is None
        else input != self.padding_idx
    )
    if bag_of is None:
        return _reduced(rows, kept, self.mode)
    summed = rows.new_zeros(count, rows.shape[-1]).index_add(0, bag_of, rows * kept.unsqueeze(-1))
    if self.mode == "sum":
        return summed
    held = rows.new_zeros(count).index_add(0, bag_of, kept.to(rows.dtype))
    return summed / held.clamp_min(1).unsqueeze(-1)


def _reduced(rows: Tensor, kept: Tensor, mode: str) -> Tensor:
    """Each row's bag (B, N, D) reduced over its kept tokens: sum, mean or max (0 where a
    bag keeps none)."""
    mask = kept.unsqueeze(-1)
    if mode == "sum":
        return (rows * mask).sum(1)
    if mode == "mean":
        return (rows * mask).sum(1) / kept.sum(1, keepdim=True).clamp_min(1).to(rows.dtype)
    lowest = torch.finfo(rows.dtype).min
    top = rows.masked_fill(~mask, lowest).amax(1)
    return torch.where(kept.any(1, keepdim=True), top, torch.zeros_like(top))
