"""How the engine's passes run a model: attention through ops every derivative knows, and
one clear error where a model's own op has no derivative the engine needs.

PyTorch runs attention through fused kernels where it can: the inference fast path of
MultiheadAttention and TransformerEncoderLayer (taken under no_grad in eval mode, as the
forward-mode score pass is), which has no forward-mode derivative, and the flash kernel of
scaled_dot_product_attention, whose backward has no derivative of its own (the exact
Hessian's double backward). Their composite forms compute the same function from ops
that have both, so the engine's passes use them; prediction keeps the fused kernels.
So with EmbeddingBag's kernel, which has neither derivative (`embedding_bag.py`).
Likewise cuDNN's RNN kernels, whose backward refuses to run in eval mode (every
derivative here is taken in eval mode): for a model with a GRU, LSTM or RNN, the passes
run without cuDNN (on a GPU; nothing changes on a CPU).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from puma_cli.engine.embedding_bag import bag_forward, runs_composite
from puma_cli.errors import PumaError

_OPERATION = re.compile(r"aten::\w+|forward AD with (\w+)")  # torch words it both ways
_MISSING = ("not implemented", "does not support", "once_differentiable", "jvp function")
_COMPILED = ("donated buffer", "does not currently support double backward")


@contextmanager
def composite_kernels(module: nn.Module) -> Iterator[None]:
    """The module's forward passes in the block through differentiable kernels: attention
    as composite ops (fast path off, SDPA's math backend), EmbeddingBag as a lookup and a
    reduction (`embedding_bag.py`), and no cuDNN where the module has a recurrent layer
    (the choice is made at the forward, so its backward follows)."""
    fast, cudnn = torch.backends.mha.get_fastpath_enabled(), torch.backends.cudnn.enabled
    torch.backends.mha.set_fastpath_enabled(False)
    modules = list(module.modules())  # walked once: the block opens on every forward pass
    if any(isinstance(m, nn.RNNBase) for m in modules):
        torch.backends.cudnn.enabled = False
    # each EmbeddingBag's own forward, where an enclosing block has not set it already
    bags = [m for m in modules if runs_composite(m) and "forward" not in vars(m)]
    for bag in bags:
        bag.forward = MethodType(bag_forward, bag)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        torch.backends.cudnn.enabled = cudnn
        for bag in bags:
            del bag.forward


def missing_derivative(exc: BaseException) -> str | None:
    """The op named by torch's refusal to differentiate it, or None for any other error."""
    text = str(exc)
    if not isinstance(exc, NotImplementedError) and not (
        isinstance(exc, RuntimeError) and any(m in text for m in _MISSING)
    ):
        return None
    found = _OPERATION.search(text)
    if found is None:
        return "an operation (a custom autograd.Function?)"
    return found.group(1) or found.group(0)


@contextmanager
def no_compiled_backward() -> Iterator[None]:
    """Turn the refusal of a backward that torch.compile compiled (a function or method of
    the model's code that it wraps) to run twice or be differentiated into a PumaError with
    the fix; anything else propagates. The wrapper of a compiled module is taken off when
    the network is built (`models.user.uncompiled`); a compiled function cannot be."""
    try:
        yield
    except RuntimeError as exc:
        if not any(m in str(exc) for m in _COMPILED):
            raise
        raise PumaError(
            "the model runs code compiled by torch.compile (a function or method of the "
            "network that it wraps), whose compiled backward runs once and has no derivative "
            "of its own, as removal's passes need; take torch.compile out of the network's "
            "code (puma takes a compiled module's wrapper off itself)"
        ) from None


@contextmanager
def derivatives_of_the_model(kind: str, fix: str) -> Iterator[None]:
    """Turn torch's refusal to differentiate one of the model's ops (`kind`: the derivative
    the pass needs) into a PumaError naming the op and `fix`; anything else propagates."""
    try:
        with no_compiled_backward():
            yield
    except (NotImplementedError, RuntimeError) as exc:
        what = missing_derivative(exc)
        if what is None:
            raise
        raise PumaError(
            f"the model uses {what}, which has no {kind} in torch {torch.__version__}; {fix}"
        ) from None
