"""Modules swapped in for others while K-FAC's factors are fitted (`attention.py`,
`conv1d.py`): the same parameters, called the way K-FAC's hooks can see."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def children_replaced(
    module: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]
) -> Iterator[None]:
    """Within the block, each submodule of `module` for which `replacement` gives a module
    is replaced by it (one stand-in for a submodule held under two names, so that it stays
    one layer); restored after."""
    made: dict[int, nn.Module | None] = {}
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for _, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            if id(child) not in made:
                made[id(child)] = replacement(child)
            stand_in = made[id(child)]
            if stand_in is not None:
                setattr(parent, name, stand_in)
                swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def tied_layers(module: nn.Module) -> set[int]:
    """The ids of the submodules that hold a parameter another submodule holds too."""
    owners: dict[int, set[int]] = {}
    for _, layer in module.named_modules():
        for p in layer.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(layer))
    return {layer for held in owners.values() if len(held) > 1 for layer in held}
