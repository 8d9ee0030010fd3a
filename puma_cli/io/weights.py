"""Weights trained elsewhere: a plain safetensors state dict, fitted to an architecture.

`puma import` reads the file a user saved with `safetensors.torch.save_file(net.state_dict(),
...)` (keys as the network names them; a prefix every key shares, as DataParallel and
DDP (`module.`), torch.compile (`_orig_mod.`), a Lightning module holding the network as
`self.model` (`model.`) and other wrappers write, is taken off, nested ones too, unless
the network's own names start so)
and loads it into the network the architecture builds. A layer the network holds under two
names (tied weights) may be stored once, as `safetensors.torch.save_model` writes it, and a
BatchNorm's `num_batches_tracked` may be missing (a step counter, not a weight; some
exporters keep only floats). The built-in ResNet-18 and DenseNet also take the names the
code bases their weights usually come from give the same tensors (`zoo.ForeignNames`).
Anything else that does not fit is refused, naming the first tensor that does not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from puma_cli.errors import DataError
from puma_cli.io.checkpoint import FORMAT, file_head, metadata_strings, safetensors_header
from puma_cli.io.files import is_text, require_file
from puma_cli.models.zoo import ForeignNames


@dataclass(frozen=True)
class WeightsFile:
    """A weights file as read once: its tensors under the file's names, its JSON header
    and the sha256 of the bytes they came from (a file rewritten while it is read cannot
    be recorded under another version's digest)."""

    tensors: dict[str, torch.Tensor]
    header: dict[str, Any]
    sha256: str


def read_state_dict(path: Path) -> WeightsFile:
    """The tensors of a plain safetensors file, under the file's names; pickles and
    damaged files are refused. `load_into` takes wrapper prefixes off where they wrap."""
    raw, header, tensors = _read_tensors(
        path,
        "give it to puma's commands as it is, or write its network as a state dict with "
        "`puma export` first",
    )
    return WeightsFile(tensors, header, hashlib.sha256(raw).hexdigest())


def exported_record(header: dict[str, Any]) -> dict[str, Any] | None:
    """What `puma export` recorded in a weights file, given its header (`file_header`):
    its `puma_export` metadata (the source checkpoint, the inputs transform, an ensemble's
    members), or None for any other file, a damaged one included."""
    try:
        record = json.loads(metadata_strings(header).get("puma_export", "null"))
    except (json.JSONDecodeError, TypeError):
        return None
    return record if isinstance(record, dict) else None


def _read_tensors(
    path: Path, if_checkpoint: str
) -> tuple[bytes, dict[str, Any], dict[str, torch.Tensor]]:
    """A weights file's bytes, JSON header and tensors; a puma checkpoint is refused with
    `if_checkpoint`, the way on, since its tensors would only be named as another
    architecture's."""
    require_file(path, "weights file", "a .safetensors file of the network's state dict")
    raw = Path(path).read_bytes()
    try:
        tensors = load_safetensors(raw)
    except (SafetensorError, ValueError) as exc:
        if raw[:1] == b"\x80" or raw[:2] == b"PK":
            lightning = (
                " (a Lightning .ckpt holds them under 'state_dict': save_file(torch.load(ckpt)"
                "['state_dict'], path); puma takes off the 'model.' its names start with)"
                if Path(path).suffix == ".ckpt"
                else ""
            )
            raise DataError(
                f"{path} is a pickle or torch.save file, which puma never unpickles; save the "
                f"weights with safetensors.torch.save_file(net.state_dict(), path){lightning}"
            ) from exc
        if is_text(raw):
            raise DataError(
                f"{path} is a text file (data, ids or code?), not a network's weights: save "
                "them with safetensors.torch.save_file(net.state_dict(), path)"
            ) from exc
        raise DataError(f"{path} is not a readable safetensors file ({exc})") from exc
    if not tensors:
        raise DataError(f"{path} holds no tensors; save the network's state dict into it")
    header = safetensors_header(raw)
    if metadata_strings(header).get("format") == json.dumps(FORMAT):
        raise DataError(f"{path} is a puma checkpoint, not a network's weights: {if_checkpoint}")
    return raw, header, tensors


def tensor_shapes(header: dict[str, Any]) -> dict[str, list[int]]:
    """The shape of each tensor a safetensors file holds, from its header alone."""
    shapes = {}
    for name, entry in header.items():
        if name != "__metadata__" and isinstance(entry, dict):
            shape = entry.get("shape")
            if isinstance(shape, list) and all(isinstance(d, int) for d in shape):
                shapes[name] = shape
    return shapes


def file_header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header, read without its tensors ({} where it has none)."""
    return safetensors_header(file_head(Path(path)))


@dataclass
class Named:
    """A file's tensors under the network's names: the wrapper prefixes taken off them,
    our name -> the file's where another code base's names were read (`adopt_names`),
    and whose names those were."""

    state: dict[str, torch.Tensor]
    prefix: str
    origin: dict[str, str]
    whose: str | None


def named_for(net: nn.Module, tensors: dict[str, torch.Tensor]) -> Named:
    """The file's tensors under the names of `net`. Wrapper prefixes every name shares
    (DDP's `module.`, torch.compile's `_orig_mod.`, puma's `net.`, Lightning's `model.`,
    any first name all of them start with) are taken off one by one, and the reading that
    names the most of the network's tensors is kept (on a tie, the one with more taken
    off). A network whose one child is itself called `net` or `model` holds names that
    start so: they stay."""
    ours = set(net.state_dict())
    best: Named | None = None
    taken = ""
    while True:
        state, origin, whose = adopt_names(net, tensors, ours)
        if best is None or len(ours & set(state)) >= len(ours & set(best.state)):
            best = Named(state, taken, origin, whose)
        prefix = _shared_prefix(tensors)
        if prefix is None:  # DDP around torch.compile writes module._orig_mod.
            return best
        tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
        taken += prefix


def _shared_prefix(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first name every tensor's name starts with (`module.` of DDP, `_orig_mod.` of
    torch.compile, `model.` of a Lightning module that holds the network as self.model),
    None where they do not share one or a name has no dot."""
    if not all("." in name for name in tensors):
        return None
    firsts = {name.split(".", 1)[0] for name in tensors}
    return f"{firsts.pop()}." if len(firsts) == 1 else None


def names_like(net: nn.Module, path: Path, label: str) -> dict[str, tuple[str, torch.dtype]]:
    """The tensor names of the weights file `path` -> the network's name for each and the
    file's dtype, as `puma import` reads the file (wrapper prefixes, another code base's
    names): the names to write the network under so that the file's reader finds it. The
    file must name the network's tensors, at their shapes."""
    _, _, tensors = _read_tensors(path, "give --like the weights file this model was imported from")
    found = named_for(net, tensors)
    held = net.state_dict()
    names: dict[str, tuple[str, torch.dtype]] = {}
    for ours, tensor in found.state.items():
        theirs = found.prefix + found.origin.get(ours, ours)
        if ours not in held or held[ours].shape != tensor.shape:
            what = "does not have" if ours not in held else f"makes {_shape(held[ours])}"
            raise DataError(
                f"{path} names tensor {theirs!r} ({_shape(tensor)}), which {label} {what}; "
                "give --like the weights file this model was imported from"
            )
        names[theirs] = (ours, tensor.dtype)
    named = {ours for ours, _ in names.values()}
    for group in _name_groups(net.state_dict(keep_vars=True)):
        if not named & set(group) and not group[0].endswith("num_batches_tracked"):
            raise DataError(
                f"{path} lacks tensor {group[0]!r}, which {label} has; give --like the "
                "weights file this model was imported from"
            )
    return names


def load_into(net: nn.Module, state: dict[str, torch.Tensor], path: Path, label: str) -> str | None:
    """Copy `state` into `net`, refusing the first missing, extra, misshapen or non-finite
    tensor by name. Returns whose names the file used, where they were another code
    base's for the same network (`adopt_names`), else None."""
    expected = net.state_dict(keep_vars=True)  # tied names hold one Parameter object
    found = named_for(net, state)
    state, origin, whose = found.state, found.origin, found.whose

    def named(name: str) -> str:  # ours, and the file's where it differs
        theirs = origin.get(name, name)
        return repr(name) if theirs == name else f"{name!r} (the file's {theirs!r})"

    state = _fill_tied_and_counters(expected, state, path, label)
    for name, want in expected.items():
        have = state.get(name)
        if have is None:
            raise DataError(
                f"{path} lacks tensor {name!r}, which {label} has; these weights are from "
                "another architecture (or other --arch-args)"
            )
        if have.shape != want.shape:
            raise DataError(
                f"{path}: tensor {named(name)} is {_shape(have)}, but {label} makes it "
                f"{_shape(want)}; these weights are from another architecture (or other "
                "--arch-args)"
            )
        if have.is_floating_point() and not bool(torch.isfinite(have).all()):
            raise DataError(
                f"{path}: tensor {named(name)} holds NaN or inf; export the weights again"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise DataError(
            f"{path} holds tensor {named(extra[0])}, which {label} does not have; these "
            "weights are from another architecture"
        )
    net.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return whose


def adopt_names(
    net: nn.Module, state: dict[str, torch.Tensor], ours: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str], str | None]:
    """`state` under the network's own names (`ours`) where the file holds another code
    base's names for the same network (its class's `FOREIGN_NAMES`), with our name -> the
    file's for each renamed tensor and whose names they were; else `state` as it is.
    Taken only when it names more of the network's tensors than the file's own names do,
    and never when two of the file's names would become one."""
    foreign = getattr(type(net), "FOREIGN_NAMES", None)
    if not isinstance(foreign, ForeignNames):
        return state, {}, None
    origin = {foreign.rename(k): k for k in state}
    if len(origin) < len(state) or len(ours & set(origin)) <= len(ours & set(state)):
        return state, {}, None
    renamed = {name: state[theirs] for name, theirs in origin.items()}
    return renamed, {k: v for k, v in origin.items() if k != v}, foreign.whose


def _fill_tied_and_counters(
    held: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path, label: str
) -> dict[str, torch.Tensor]:
    """`state` with each tied tensor given under every name the network has for it (it may
    be stored under one; two stored copies must agree), and a missing BatchNorm step
    counter taken from the fresh network."""
    state = dict(state)
    for names in _name_groups(held):
        stored = [n for n in names if n in state]
        if len(names) < 2 or not stored:
            continue
        first = state[stored[0]]
        for other in stored[1:]:
            if state[other].shape == first.shape and not torch.equal(state[other], first):
                a, b = sorted((stored[0], other))
                raise DataError(
                    f"{path}: {a!r} and {b!r} are one tensor in {label} (tied), but the file "
                    "holds different values for them; these weights are from another "
                    "architecture"
                )
        for name in names:
            state.setdefault(name, first)
    for name, tensor in held.items():
        if name.endswith("num_batches_tracked") and name not in state:
            state[name] = tensor.detach().clone()
    return state


def _name_groups(held: dict[str, torch.Tensor]) -> list[list[str]]:
    """A state dict's names (`keep_vars=True`), grouped by the tensor they hold: a tied
    layer's names share one Parameter object."""
    groups: dict[int, list[str]] = {}
    for name, tensor in held.items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "a scalar"
