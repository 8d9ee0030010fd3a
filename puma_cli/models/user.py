"""Your own architecture: `--arch FILE.py:Class`, imported only as recorded.

Importing a Python file runs its code, so puma imports a user's file only when the
user names it (`train --arch FILE.py:Class`, or `--arch-file FILE.py` on a later
command) or when the file at the path a checkpoint records still has the sha256 the
checkpoint records. A file that has changed or gone is refused, never replaced by
another version: the sha256 is checked before any import, and a class is looked up by
(sha256, class name), so two versions of one file never mix.

The class (or a function that builds and returns the network, as kuangliu's
`ResNet18()` does) is called as `Class(**arch_args)`; where its signature takes `n_classes`
or `num_classes`, `input_shape`, `in_channels` or `in_features` and the arguments do
not set them, puma passes them from the data. It must be an `nn.Module` whose forward
maps a standardised batch (n, *input_shape) to logits (n, K).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from puma_cli.errors import DataError, PumaError

_SPEC = re.compile(r"^(?P<path>.+\.py):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")
# (sha256, name) -> the nn.Module class, or the function that builds the network
_CLASSES: dict[tuple[str, str], Callable[..., nn.Module]] = {}
_GIVEN: dict[str, Path] = {}  # sha256 -> a file the user named with --arch-file
_IMPORTED: dict[str, str] = {}  # the path Python runs an imported file under -> its label


@dataclass(frozen=True)
class UserSource:
    """Where a user's architecture class lies: the file, its sha256, the class name."""

    path: str
    sha256: str
    name: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256, "class": self.name}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UserSource:
        return cls(str(data["path"]), str(data["sha256"]), str(data["class"]))

    @property
    def label(self) -> str:
        return f"{self.path}:{self.name}"


def is_user_spec(arch: str) -> bool:
    return _SPEC.match(arch) is not None


def parse_user_spec(arch: str) -> UserSource:
    """`FILE.py:Class` -> the file's absolute path, its sha256 and the class (imported
    now, so a file that cannot be imported or lacks the class is refused up front)."""
    match = _SPEC.match(arch)
    if match is None:
        raise PumaError(f"--arch {arch!r}: give a built-in name or FILE.py:ClassName")
    path = Path(match["path"]).expanduser().resolve()
    source = UserSource(str(path), _sha256(path), match["name"])
    _import_class(path, source)
    return source


def register_arch_file(path: Path) -> str:
    """`--arch-file FILE.py`: the user names the file again (moved, or on another machine);
    it is hashed, not imported, until a checkpoint asks for a class with that sha256."""
    path = Path(path).expanduser().resolve()
    digest = _sha256(path)
    _GIVEN[digest] = path
    return digest


def user_class(source: UserSource) -> Callable[..., nn.Module]:
    """The recorded class, from the file given with --arch-file or the recorded path, each
    only when its sha256 is, now, the recorded one."""
    given = _GIVEN.get(source.sha256)
    if given is not None and given.is_file() and _sha256(given) == source.sha256:
        return _import_class(given, source)
    path = Path(source.path)
    if not path.is_file():
        raise PumaError(
            f"the architecture file {source.path} recorded in the model is gone; pass "
            f"--arch-file FILE.py with the same file (sha256 {source.sha256[:12]}...)"
        )
    digest = _sha256(path)
    if digest != source.sha256:
        raise PumaError(
            f"the architecture file {source.path} has changed since the model was trained "
            f"(sha256 {source.sha256[:12]} recorded, {digest[:12]} now); puma never imports "
            "another version: restore the file, or pass --arch-file with the original"
        )
    return _import_class(path, source)


def _import_class(path: Path, source: UserSource) -> Callable[..., nn.Module]:
    key = (source.sha256, source.name)
    if key in _CLASSES:
        return _CLASSES[key]
    module_name = f"puma_user_arch_{source.sha256[:16]}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise PumaError(f"{path} cannot be imported as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        _IMPORTED[str(spec.origin)] = source.label
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's code: any failure is theirs to fix
            del sys.modules[module_name]
            raise PumaError(
                f"{path} raised {type(exc).__name__} on import ({_first_line(exc)}); "
                + _import_fix(exc, path)
            ) from exc
    found = getattr(module, source.name, None)
    if found is None:
        names = sorted(
            n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)
        )
        raise PumaError(
            f"{path} defines no class or function {source.name!r} (its nn.Module classes: "
            f"{', '.join(names) or 'none'})"
        )
    where = f"{path}:{source.name}"
    if isinstance(found, nn.Module):  # callable, but calling it would run its forward
        raise PumaError(
            f"{where} is a network already built (an nn.Module instance); name its class, "
            "or a function that builds and returns it, so that puma can build it again"
        )
    if isinstance(found, type) and not issubclass(found, nn.Module):
        raise PumaError(f"{where} is not an nn.Module class")
    if not callable(found):
        raise PumaError(
            f"{where} is a{'n' if type(found).__name__[0] in 'aeiou' else ''} "
            f"{type(found).__name__}, not an nn.Module class or a function that returns one"
        )
    _CLASSES[key] = found
    return found


def construct(
    cls: Callable[..., nn.Module],
    args: dict[str, Any],
    input_shape: tuple[int, ...],
    n_classes: int,
    label: str,
) -> nn.Module:
    """`cls(**args)`, with the class count and input shape filled in where the
    constructor asks for them by a name puma knows and `args` leaves them out."""
    try:
        wanted = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        wanted = {}  # type: ignore[assignment]
    given = dict(args)
    fill = {
        "n_classes": n_classes,
        "num_classes": n_classes,
        "input_shape": tuple(input_shape),
        "in_channels": input_shape[0],
        "in_features": math.prod(input_shape),
    }
    for name, value in fill.items():
        if name in wanted and name not in given:
            given[name] = value
    call = f"{label}({', '.join(f'{k}={v!r}' for k, v in given.items())})"
    try:
        net = cls(**given)
    except Exception as exc:  # the user's code
        raise PumaError(
            f"{call} raised {type(exc).__name__} ({_first_line(exc)}); fix the class or --arch-args"
        ) from exc
    if not isinstance(net, nn.Module):  # a function's result; a class's is its instance
        raise PumaError(
            f"{call} returned {type(net).__name__}, not an nn.Module; return the network"
        )
    net = uncompiled(net)
    _size_lazy_layers(net, input_shape, label)
    return net


def uncompiled(net: nn.Module) -> nn.Module:
    """The network with torch.compile's wrappers taken off, its own and its submodules'
    (the same parameters, the same function): a compiled graph takes neither the
    forward-mode derivatives nor the double backward removal needs, and hides its layers
    from K-FAC's hooks, so puma trains and differentiates the modules as written."""
    net = _compiled_inside(net) or net
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            inner = _compiled_inside(child)
            if inner is not None:
                setattr(parent, name, inner)
    return net


def _compiled_inside(module: nn.Module) -> nn.Module | None:
    """The module torch.compile wrapped, where `module` is its wrapper (OptimizedModule,
    told by name: importing torch._dynamo to check costs seconds), else None."""
    if type(module).__name__ != "OptimizedModule":
        return None
    inner = module._modules.get("_orig_mod")
    return inner if isinstance(inner, nn.Module) else None


def _size_lazy_layers(net: nn.Module, input_shape: tuple[int, ...], label: str) -> None:
    """Lazy layers (nn.LazyLinear, LazyConv2d, ...) take their sizes from the first batch
    they see. puma builds the network again from its recorded arguments on every command,
    before it reads any data (a checkpoint's tensors must then fit it), so it shows them a
    batch at once: two rows of zeros of the data's shape (standardised, the mean), or,
    for a network over token ids, zeros as int64 (the first id)."""

    def unsized() -> list[nn.Module]:
        return [
            m
            for m in net.modules()
            if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()
        ]

    if not unsized() or any(p.device.type == "meta" for p in net.parameters()):
        return  # on the meta device (a checkpoint's shapes checked), the real build sizes them
    failure: Exception | None = None
    was_training = net.training
    net.eval()
    try:
        for dtype in (torch.float32, torch.int64):
            try:
                with torch.no_grad():
                    net(torch.zeros(2, *input_shape, dtype=dtype))
            except Exception as exc:  # the user's code, on a batch of another dtype
                failure = failure or exc
                continue
            if not unsized():
                return
    finally:
        net.train(was_training)
    why = f": {type(failure).__name__} ({_first_line(failure)})" if failure else ""
    raise PumaError(
        f"{label} has a {type(unsized()[0]).__name__} layer that a batch of zeros of shape "
        f"(2, {', '.join(map(str, input_shape))}) could not size{why}; give its sizes "
        "(nn.Linear(in, out) for nn.LazyLinear(out))"
    )


def _refuse_plain_tensors(net: nn.Module, label: str) -> None:
    """Refuse a tensor held as a plain attribute (`self.proj = torch.randn(...)`): no
    checkpoint saves it, so a model rebuilt from one differs unless the constructor is
    seeded, and `.to()` neither moves nor casts it (a float64 pass fails in the user's
    forward, a GPU one too). A 0-dim tensor (a constant) mixes with any device and dtype,
    and a computed one (the old `weight_norm` hook's weight, which has a grad_fn, or any
    tensor of a module with a forward pre-hook, which may set it each forward, as the old
    `spectral_norm` does) is the forward's own business: they pass."""
    if not isinstance(net, nn.Module):
        return
    for owner, module in net.named_modules():
        if isinstance(module, torch.jit.ScriptModule) or module._forward_pre_hooks:
            continue  # a pre-hook may set the tensor each forward (the old spectral_norm)
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.grad_fn is None:
                where = f"{owner}.{attr}" if owner else attr
                raise PumaError(
                    f"{label} holds a tensor in self.{where} that is neither a parameter nor "
                    "a buffer: no checkpoint saves it and .to() neither moves nor casts it; "
                    f"register it with self.register_buffer({attr!r}, tensor) (or make it an "
                    "nn.Parameter to train it)"
                )


def check_logits(
    net: nn.Module, batch: torch.Tensor, n_classes: int, label: str, hint: str = ""
) -> None:
    """Refuse a new network that holds a tensor as a plain attribute, has nothing to train,
    fails on `batch` (two rows of the data, as the net will see them: standardised or
    not) or does not return one logit per class (probabilities, a softmax's rows, are not
    logits); `hint` follows the failure's message.
    (Loading a checkpoint runs none of this: a model once made keeps loading.)"""
    _refuse_plain_tensors(getattr(net, "net", net), label)  # a Classifier's network
    if not any(p.requires_grad for p in net.parameters()):
        raise PumaError(
            f"{label} has no trainable parameters (none, or every one with requires_grad "
            "False): nothing in it learns from the data; leave the layers it trains trainable"
        )
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    if device.type == "meta":
        return
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(batch.to(device))
    except Exception as exc:  # the user's code
        rows = ", ".join(map(str, batch.shape))
        fix = (_index_fix(exc) or "it must take the data's shape") + hint
        raise PumaError(
            f"{label} fails on the data's first rows, a batch of shape ({rows}): "
            f"{type(exc).__name__} ({_first_line(exc)}); {fix}"
        ) from exc
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, n_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PumaError(
            f"{label} returns {shape} for a batch of 2; it must return logits (n, {n_classes}), "
            f"one per class{_logits_inside(out, n_classes)}"
        )
    _refuse_row_dependence(net, batch.to(device), out, label)
    if _probabilities(out):
        raise PumaError(
            f"{label} returns probabilities (each row non-negative, summing to 1); return the "
            "logits, before the softmax: puma's cross-entropy takes logits, and would learn "
            "next to nothing from probabilities (log_softmax's output is fine)"
        )


def _index_fix(exc: BaseException) -> str | None:
    """The fix where the net used its input as indices (an nn.Embedding, F.one_hot) as
    torch refuses float ones, else None."""
    text = str(exc)
    if "'indices'" not in text and "index tensor" not in text:
        return None
    return (
        "puma hands a network its rows as float32 (token ids too, as whole numbers), so "
        "cast them where they index: self.embedding(x.long())"
    )


def _logits_inside(out: object, n_classes: int) -> str:
    """Where a network returns its logits beside other outputs (a tuple of logits and
    features, a dict or Hugging Face output with `logits`), how to hand puma them alone."""
    if isinstance(out, (tuple, list)) and out:
        logits, part, how = out[0], "first item", "self.net(x)[0]"
    elif isinstance(out, Mapping) and "logits" in out:
        logits, part, how = out["logits"], "logits", 'self.net(x)["logits"]'
    else:
        return ""
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, n_classes):
        return ""
    return (
        f" (its {part} has that shape): wrap it in a class whose forward returns {how}, and "
        "name that class"
    )


def _refuse_row_dependence(
    net: nn.Module, batch: torch.Tensor, out: torch.Tensor, label: str
) -> None:
    """Refuse a network whose logits for a row are not fixed by that row in eval mode:
    random (dropout applied with training=True, as MC dropout does, or noise), or moved
    by the rows beside it (a BatchNorm built with track_running_stats=False normalises by
    each batch's own statistics). A row then has no loss or gradient of its own, and its
    prediction moves from pass to pass. Seen on three more passes over the same two rows,
    then with the second row replaced by a copy of the first."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            again = [net(batch) for _ in range(3)]  # three: a small net's masks can repeat
            alone = None if torch.equal(batch[0], batch[1]) else net(batch[[0, 0]])[0]
    finally:
        net.train(was_training)

    def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool((a - b).abs().max() > 1e-4 * (1 + b.abs().max()))

    if any(differs(logits, out) for logits in again):
        raise PumaError(
            f"{label} gives other logits on a second pass over the same rows in eval mode "
            "(dropout applied with training=True, as MC dropout does, or noise): puma's "
            "derivatives, its guard and its attacks take each row's logits as fixed; apply "
            "dropout through nn.Dropout, or F.dropout(..., training=self.training)"
        )
    if alone is None or not differs(alone, out[0]):
        return
    inner = getattr(net, "net", net)  # a Classifier's network
    culprit = next(
        (
            f"its {type(m).__name__} at {name} has track_running_stats=False, so it "
            "normalises by each batch's own statistics even in eval mode; build it with "
            "track_running_stats=True (the default), or use a GroupNorm or LayerNorm"
            for name, m in inner.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats
        ),
        "make each row's logits its own in eval mode (no statistics over the batch)",
    )
    raise PumaError(
        f"{label}'s logits for a row change with the other rows of its batch: puma takes each "
        f"row's loss and gradient on its own, so such a network has no per-row influence to "
        f"remove; {culprit}"
    )


def _probabilities(out: torch.Tensor) -> bool:
    """Whether every row of a network's output looks like a softmax's: in [0, 1] and
    summing to 1. Logits of a fresh or trained network practically never do."""
    rows = out.detach().double()  # NaN and inf fail the range test
    in_range = bool(((rows >= 0) & (rows <= 1)).all())
    return in_range and bool(((rows.sum(dim=1) - 1).abs() <= 1e-4).all())


def _sha256(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: no such architecture file")
    if not path.is_file():
        raise DataError(f"{path} is not a regular file; give a .py file defining the class")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _import_fix(exc: Exception, path: Path) -> str:
    """How to mend a failed import: a module beside the file is not on the path, since
    puma imports the one file whose sha256 the checkpoint records, nothing it reaches."""
    name = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if name:
        top = name.split(".")[0]
        beside = path.parent / f"{top}.py"
        if beside.exists() or (path.parent / top / "__init__.py").exists():
            shown = beside.name if beside.exists() else f"{top}/"
            return (
                f"puma imports {path.name} alone (the file whose sha256 a model records), "
                f"not {shown} beside it: put what it needs into {path.name}, or make {top} "
                "an installed package (pip install -e its project) so that it imports anywhere"
            )
    if "operator torchvision::" in str(exc):  # its compiled ops do not load beside this torch
        return (
            f"the installed torchvision was built for another torch than this one "
            f"({torch.__version__}): install torch and torchvision from the same place, as a "
            "pair (both from PyPI, or both from download.pytorch.org/whl/cpu)"
        )
    return "fix the file"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def raised_in_user_code(exc: BaseException) -> str | None:
    """What to say of an exception raised inside a user's architecture file while puma ran
    it (a forward that fails on a batch size the first-rows check did not try, say):
    the file, line and function of the deepest frame in it, and the error. None when no
    frame of the traceback lies in such a file: then it is not the user's to fix."""
    where = None
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename in _IMPORTED:
            where = (_IMPORTED[code.co_filename], code.co_filename, tb.tb_lineno, code.co_name)
        tb = tb.tb_next
    if where is None:
        return None
    label, path, line, function = where
    return (
        f"{label} raised {type(exc).__name__} at {path} line {line}, in {function} "
        f"({_first_line(exc)}); it arose in the architecture's code: fix it there (or, if "
        "the code is right, report it with `puma --version`)"
    )
