"""Self-attention through module calls, so that K-FAC sees its projections as layers.

`nn.MultiheadAttention` applies its input projection as a bare parameter
(`in_proj_weight`, one (3E, E) matrix for query, key and value) and its output projection
by weight alone (`F.linear(x, out_proj.weight)`), so the hooks K-FAC is fitted through
never see either run: a transformer's attention, a third of each block's weights, was
left out of the curvature. For self-attention (query, key and value one tensor, as
`TransformerEncoderLayer` calls it) the input projection is exactly one Linear layer
on the tokens, whose output is split into q, k and v; `attention_as_modules` puts such a
layer (holding the same parameters) and the output projection, called as a module, in
place of each MultiheadAttention while the factors are fitted. The computation is the
one `F.multi_head_attention_forward` makes in eval mode (the engine's), masks included;
anything else (cross-attention, separate q/k/v weights, bias_k, add_zero_attn, unbatched
input) runs the original module, whose projections then stay out as before.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from puma_cli.engine.conv1d import STAND_IN
from puma_cli.engine.stand_ins import children_replaced

Tensor = torch.Tensor


class AttentionThroughModules(nn.Module):
    """A MultiheadAttention's self-attention with `in_proj` and `out_proj` called as
    modules; everything else it is asked for comes from the original."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.__dict__["_mha"] = mha  # not a child: its parameters are held once, below
        in_proj = nn.Linear(
            mha.embed_dim, 3 * mha.embed_dim, bias=mha.in_proj_bias is not None, device="meta"
        )
        in_proj.weight = mha.in_proj_weight
        in_proj.bias = mha.in_proj_bias
        self.in_proj = in_proj
        self.out_proj = mha.out_proj

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            mha = self.__dict__.get("_mha")  # absent while a copy is being built
            if mha is None:
                raise
            return getattr(mha, name)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        mha: nn.MultiheadAttention = self.__dict__["_mha"]
        masks_fit = attn_mask is None or attn_mask.dim() == 2
        if not (query is key and key is value and query.dim() == 3 and masks_fit):
            return mha(query, key, value, key_padding_mask=key_padding_mask,
                       need_weights=need_weights, attn_mask=attn_mask,
                       average_attn_weights=average_attn_weights, is_causal=is_causal)  # fmt: skip
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        x = query if mha.batch_first else query.transpose(0, 1)  # (n, L, E)
        n, length, embed = x.shape
        heads = mha.num_heads
        q, k, v = (
            part.reshape(n, length, heads, embed // heads).transpose(1, 2)
            for part in self.in_proj(x).chunk(3, dim=-1)
        )  # each (n, heads, L, E / heads)
        scores = q @ k.transpose(-2, -1) / math.sqrt(embed // heads)
        mask = _float_mask(attn_mask, scores.dtype)
        if mask is not None:
            scores = scores + mask  # (L, L) over every row and head
        padding = _float_mask(key_padding_mask, scores.dtype)
        if padding is not None:
            scores = scores + padding[:, None, None, :]  # (n, L): per row, over keys
        weights = torch.softmax(scores, dim=-1)
        if mha.training and mha.dropout > 0:
            weights = F.dropout(weights, p=mha.dropout)
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(n, length, embed))
        if not mha.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: not attended) as -inf where True, 0 elsewhere; a float one
    as it is (added to the scores), as torch's `_canonical_mask` makes them."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def through_modules(mha: nn.MultiheadAttention) -> bool:
    """Whether `AttentionThroughModules` can stand in for this attention: one (3E, E)
    input projection, no bias_k/bias_v, no zero attention, every parameter trained."""
    return (
        mha._qkv_same_embed_dim
        and mha.in_proj_weight is not None
        and mha.bias_k is None
        and not mha.add_zero_attn
        and all(p.requires_grad for p in mha.parameters())
    )


def attention_as_modules(module: nn.Module) -> AbstractContextManager[None]:
    """Within the block, each MultiheadAttention `through_modules` takes is replaced by
    its AttentionThroughModules (the same parameters); restored after."""

    def replacement(child: nn.Module) -> nn.Module | None:
        if isinstance(child, nn.MultiheadAttention) and through_modules(child):
            return AttentionThroughModules(child)
        return None

    return children_replaced(module, replacement)


def theta_name(layer: str, part: str, names: set[str]) -> str:
    """The name theta holds a layer's `part` (weight, bias) under: `<layer>.weight`, or,
    for an attention's `in_proj` stand-in, the attention's `in_proj_weight`, and for a
    Conv1d's stand-in (`conv1d.STAND_IN`), the Conv1d's own `<conv1d>.weight`."""
    plain = f"{layer}.{part}" if layer else part
    if plain in names:
        return plain
    if layer.endswith(f".{STAND_IN}"):
        return f"{layer.removesuffix(f'.{STAND_IN}')}.{part}"
    if layer.endswith(".in_proj"):
        return f"{layer}_{part}"
    return plain
