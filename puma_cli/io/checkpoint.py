"""Checkpoints: one safetensors file holding the weights and everything needed to reuse them.

Tensors: `model.*` (the model's state dict, standardisation included), `rows.role`
(uint8, one per row of the training file: 0 trained on, 1 validation, 2 removed), and
any `extra` tensors a method keeps with the model (SISA's shard plan, `sisa.*`).
Removed rows stay removed: a later removal works on what remains.
Metadata (str -> str, JSON inside): format and puma version, architecture, class and
feature names, the training recipe, the data files (path and sha256), sidecar files
(Amnesiac's recorded updates: path and sha256), the metrics measured at training, and
the provenance list of operations applied since.
No pickle is ever loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from puma_cli import __version__
from puma_cli.data.dataset import Dataset
from puma_cli.errors import CheckpointError, PumaError
from puma_cli.io.atomic import write_atomically
from puma_cli.io.files import is_text, require_file
from puma_cli.io.schema import check_state, validate_metadata, validate_tensors
from puma_cli.models.architectures import (
    Architecture,
    Classifier,
    Model,
    build_model,
    frozen_parameters,
)

FORMAT = "puma-checkpoint"
FORMAT_VERSION = 1
ROLE_TRAINED, ROLE_VALIDATION, ROLE_REMOVED = 0, 1, 2
# A validation row a removal was asked for: never trained on, out of the criterion and, as
# a removed row, out of the file once its rows are deleted (older files hold such rows as
# removed). Kept apart so that an audit can tell it from a row the removal unlearned.
ROLE_WITHDRAWN = 3
GONE = (ROLE_REMOVED, ROLE_WITHDRAWN)  # the rows a request took out of the file


@dataclass(frozen=True)
class DataRecord:
    """Where a data file lay when the model was made, and what it held."""

    path: str
    sha256: str
    n: int
    label_col: str = "label"
    id_col: str = "id"

    @classmethod
    def of(cls, dataset: Dataset, label_col: str = "label", id_col: str = "id") -> DataRecord:
        if dataset.path is None or dataset.sha256 is None:
            raise ValueError("a recorded dataset needs a path and a sha256")
        return cls(str(dataset.path.resolve()), dataset.sha256, len(dataset), label_col, id_col)


@dataclass
class Checkpoint:
    """A model with its record. `data` maps 'train', 'val', 'test' to DataRecords (or None)."""

    model: Model
    recipe: dict[str, Any]
    data: dict[str, DataRecord | None]
    roles: np.ndarray
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    sidecars: dict[str, DataRecord] = field(default_factory=dict)
    feature_names_given: bool = True  # the training file named its columns (match by name)
    puma_version: str = __version__
    path: Path | None = None

    @property
    def arch(self) -> Architecture:
        return self.model.arch

    def metadata(self) -> dict[str, Any]:
        """The record as plain JSON-able values (what `puma info --json` shows)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "puma_version": self.puma_version,
            "architecture": self.arch.to_dict(),
            "n_classes": self.arch.n_classes,
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
            "frozen_parameters": frozen_parameters(self.model),
            "feature_names": list(self.feature_names),
            "feature_names_given": self.feature_names_given,
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "recipe": self.recipe,
            "data": {k: (vars(v) if v is not None else None) for k, v in self.data.items()},
            "rows": {
                "trained": int((self.roles == ROLE_TRAINED).sum()),
                "validation": int((self.roles == ROLE_VALIDATION).sum()),
                "removed": int((self.roles == ROLE_REMOVED).sum()),
                "withdrawn": int((self.roles == ROLE_WITHDRAWN).sum()),
            },
            "metrics": self.metrics,
            "provenance": self.provenance,
            "sidecars": {k: vars(v) for k, v in self.sidecars.items()},
        }


def checkpoint_pieces(checkpoint: Checkpoint) -> Iterator[bytes | memoryview]:
    """The checkpoint's file, piece by piece (`tensor_pieces`): its bytes depend only on
    its content, and no copy of its tensors stands in memory beside them (a SISA model
    keeps every shard's states after each slice, gigabytes at ResNet-18's size)."""
    state = {f"model.{k}": v.detach() for k, v in checkpoint.model.state_dict().items()}
    state["rows.role"] = torch.from_numpy(checkpoint.roles.astype(np.uint8))
    state.update({name: tensor.detach() for name, tensor in checkpoint.extra.items()})
    strings = {
        key: json.dumps(value, sort_keys=True) for key, value in checkpoint.metadata().items()
    }
    return tensor_pieces(state, strings)


def write_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    """Write the checkpoint's file at `path` (a writer for `write_atomically`)."""
    write_pieces(checkpoint_pieces(checkpoint), path)


def write_pieces(pieces: Iterable[bytes | memoryview], path: Path) -> None:
    with open(path, "wb") as handle:
        for piece in pieces:
            handle.write(piece)


def save_checkpoint(path: Path, checkpoint: Checkpoint, overwrite: bool = False) -> None:
    """Write atomically."""
    write_atomically({Path(path): partial(write_checkpoint, checkpoint)}, overwrite)


def _canonical(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header in sorted key order.

    safetensors writes metadata in hash-map order, which changes between runs; sorting it
    (and padding to 8 bytes as the format asks) makes same content give the same bytes.
    """
    size = int.from_bytes(blob[:8], "little")
    return _header_bytes(json.loads(blob[8 : 8 + size])) + blob[8 + size :]


def _header_bytes(header: dict[str, Any]) -> bytes:
    """A safetensors header as the file opens with it: its length (8 bytes, little-endian),
    then its JSON with the keys sorted, padded with spaces to a multiple of 8 bytes."""
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a puma checkpoint; every failure is a CheckpointError that says why."""
    path = Path(path)
    require_file(path, "model file", "a .safetensors model file", CheckpointError)
    raw = file_head(path)  # the header, and enough of the file to tell what else it is
    try:
        tensors = load_file(path, backend="pread")  # read once, into the tensors
        meta = _read_metadata(raw)
    except (SafetensorError, ValueError, OSError, RecursionError) as exc:
        # A safetensors file starts with its header's length, so a pickle's signature
        # is only telling once the file has failed to parse as safetensors.
        if raw[:1] == b"\x80" or raw[:2] == b"PK":
            raise CheckpointError(
                f"{path} is a pickle or torch.save file; puma never unpickles files. "
                "Give a checkpoint written by `puma train`"
            ) from exc
        if is_text(raw):
            raise CheckpointError(
                f"{path} is a text file (data, ids or code?), not a puma checkpoint: give "
                "the .safetensors model file `puma train` or `puma import` wrote"
            ) from exc
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or damaged: {exc}); "
            "retrain it or restore it from a copy"
        ) from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(_not_a_checkpoint(path, meta))
    validate_metadata(path, meta, FORMAT_VERSION)
    arch = Architecture.from_dict(meta["architecture"])
    tensors = _without_compile_wrappers(tensors)
    validate_tensors(path, meta, arch, tensors)
    return _build(path, meta, arch, tensors, device)


def file_head(path: Path) -> bytes:
    """A file's first bytes: its safetensors header where the file is long enough to hold
    the length its first 8 bytes give, and 4 KiB at least."""
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        handle.seek(0)
        return handle.read(max(4096, 8 + size) if size <= path.stat().st_size - 8 else 4096)


def safetensors_header(raw: bytes) -> dict[str, Any]:
    """A safetensors file's JSON header, from the file's first bytes ({} where they hold
    none: a length past their end, as a damaged file gives, or no JSON object)."""
    size = int.from_bytes(raw[:8], "little")
    if size > len(raw) - 8:
        return {}
    try:
        header = json.loads(raw[8 : 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return header if isinstance(header, dict) else {}


def metadata_strings(header: dict[str, Any]) -> dict[str, Any]:
    """A header's metadata, as stored: a string a key (none where it has none)."""
    strings = header.get("__metadata__")
    return strings if isinstance(strings, dict) else {}


def _read_metadata(raw: bytes) -> dict[str, Any]:
    """The header's metadata, each value parsed as JSON (puma writes them so) where it is
    JSON: other files' values are plain strings (`{"format": "pt"}`, as safetensors.torch
    and the Hugging Face libraries save a state dict), kept as they are, so that such a
    file is named for what it is rather than as damaged."""
    strings = metadata_strings(safetensors_header(raw))
    meta: dict[str, Any] = {}
    for key, value in strings.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return meta


def _not_a_checkpoint(path: Path, meta: dict[str, Any]) -> str:
    """Why a safetensors file without puma's metadata is not a checkpoint, and the way on."""
    wrap = f"`puma import {path} --arch ... --data TRAIN`"
    exported = meta.get("puma_export")
    if isinstance(exported, dict):
        source = exported.get("model")
        where = f" ({source})" if isinstance(source, str) else ""
        return (
            f"{path} is a network written by `puma export` (a plain state dict to deploy), "
            f"not a puma checkpoint: give the checkpoint it was exported from{where}, or "
            f"wrap the network into a new one with {wrap}"
        )
    return (
        f"{path} is a safetensors file but not a puma checkpoint (no puma metadata): wrap a "
        f"network's state dict into one with {wrap}, or train one with `puma train`"
    )


def _without_compile_wrappers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A network of yours built through torch.compile was saved, before puma took its
    wrapper off (`models.user.uncompiled`), under `_orig_mod.` names: read as its own."""
    return {
        (k.replace("._orig_mod.", ".") if k.startswith("model.") else k): v
        for k, v in tensors.items()
    }


def _build(
    path: Path,
    meta: dict[str, Any],
    arch: Architecture,
    tensors: dict[str, torch.Tensor],
    device: str | torch.device,
) -> Checkpoint:
    try:
        model = build_model(arch)
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        check_state(path, tensors, model.state_dict())  # lazy layers' shapes, now sized
        model.load_state_dict(state, strict=True)
        bad = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise CheckpointError(
                f"{path}: tensor model.{bad[0]} holds NaN or inf; puma never writes such "
                "weights, so the file was altered or damaged: restore it or retrain"
            )
        data = {
            role: (DataRecord(**record) if record is not None else None)
            for role, record in meta["data"].items()
        }
        checkpoint = Checkpoint(
            model=model.to(device).eval(),
            recipe=dict(meta["recipe"]),
            data=data,
            roles=tensors["rows.role"].numpy().astype(np.uint8),
            feature_names=tuple(meta["feature_names"]),
            class_names=tuple(meta["class_names"]) if meta.get("class_names") else None,
            metrics=dict(meta.get("metrics", {})),
            provenance=list(meta.get("provenance", [])),
            extra={k: v for k, v in tensors.items() if k.split(".")[0] not in ("model", "rows")},
            sidecars={k: DataRecord(**v) for k, v in meta.get("sidecars", {}).items()},
            feature_names_given=bool(meta.get("feature_names_given", True)),
            puma_version=str(meta.get("puma_version", "?")),
            path=path,
        )
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: its weights do not match its recorded architecture ({_first_line(exc)}); "
            "the file was altered or written by another tool"
        ) from exc
    return checkpoint


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file of plain tensors, byte-for-byte the same for the same content:
    the library's own file with its header's keys sorted (`_canonical`)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return _canonical(save_safetensors(tensors, metadata=metadata))


def tensor_pieces(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Iterator[bytes | memoryview]:
    """The file `tensor_bytes` writes, byte for byte, piece by piece: the header, then
    each tensor's own bytes (moved to the CPU one at a time), never the whole file in
    memory. A tied layer's tensor is written under each of its names, as the library
    would have it cloned to."""
    shaped = {name: ([*tensor.shape], [tensor]) for name, tensor in tensors.items()}
    return _pieces(shaped, metadata)


def stacked_tensor_pieces(rows: dict[str, list[torch.Tensor]]) -> Iterator[bytes | memoryview]:
    """The file `tensor_bytes` writes of each name's rows stacked along a new first axis,
    byte for byte, piece by piece: neither the stacked tensors nor the file stand in
    memory beside the rows (Amnesiac's recorded updates: a model's size a step). Each
    name needs one row at least, all of its rows of one shape and dtype."""
    return _pieces({name: ([len(parts), *parts[0].shape], parts) for name, parts in rows.items()})


def _pieces(
    parts: dict[str, tuple[list[int], list[torch.Tensor]]], metadata: dict[str, str] | None = None
) -> Iterator[bytes | memoryview]:
    """Each name's tensors, concatenated, as a tensor of the given shape. The tensors'
    order in the file is safetensors' own, read off a one-value probe of each name (with
    the metadata, which the library checks), sorted by where each probe's data lies: an
    empty tensor's probe, also empty, lies before a value at the same offset, as the
    tensor itself will."""
    probe = tensor_bytes(
        {name: pieces[0].reshape(-1)[:1].clone() for name, (_, pieces) in parts.items()}, metadata
    )
    probed = safetensors_header(probe)
    header: dict[str, Any] = {}
    start = 0
    for name in sorted(parts, key=lambda name: probed[name]["data_offsets"]):
        shape, pieces = parts[name]
        size = sum(piece.numel() * piece.element_size() for piece in pieces)
        header[name] = {"dtype": probed[name]["dtype"], "shape": shape}
        header[name]["data_offsets"] = [start, start + size]
        start += size
    if "__metadata__" in probed:
        header["__metadata__"] = probed["__metadata__"]
    yield _header_bytes(header)
    for name in header:
        if name != "__metadata__":
            for piece in parts[name][1]:
                yield piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def single_model(checkpoint: Checkpoint, what: str) -> Classifier:
    """The checkpoint's model when it is one network; a SISA ensemble is refused for `what`."""
    if isinstance(checkpoint.model, Classifier):
        return checkpoint.model
    raise PumaError(
        f"{what} needs a single model, but {checkpoint.path} is a SISA ensemble of "
        f"{checkpoint.arch.shards} shards: remove points with --method sisa (it retrains only "
        "the shards that held them) or --method retrain, or train without --shards"
    )
