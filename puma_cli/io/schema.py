"""One schema for a checkpoint's metadata and tensors, checked before anything is built.

A checkpoint is a file a user may have edited, damaged or been handed by someone else.
Every field `load_checkpoint` or a later command reads is checked here for its type,
its range and its agreement with the tensors, and the first violation is refused with
its name, so no command meets a string where it expects a list, a shard count that
would loop for hours, or a row-role tensor of the wrong length. The network's tensor
shapes are compared against the architecture built on the meta device, which allocates
nothing: a recorded width of a billion costs no memory before it is refused (a lazy
layer's shapes wait for the real build, `check_state`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.nn.parameter import is_lazy

from puma_cli.data.dataset import MAX_ROW_AXES
from puma_cli.errors import CheckpointError, PumaError
from puma_cli.models.architectures import ACTIVATIONS, ARCHITECTURES, Architecture, build_model
from puma_cli.models.recipe import TrainRecipe

ROLES = (0, 1, 2, 3)  # trained on, validation, removed, withdrawn (io.checkpoint names them)
DATA_ROLES = ("train", "val", "test")
MAX_DIM = 10**7  # one input dimension, class count or layer width
MAX_LAYERS = 1000
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Fields:
    """Typed reads of one checkpoint's metadata, each failure naming the field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: metadata '{where}' {what}; the file was altered or written by "
            "another tool: restore it from a copy or retrain"
        )

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"is {_kind(value)}, not a mapping")
        return value

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"is {_kind(value)}, not text")
        return value

    def integer(self, value: Any, where: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"is {_kind(value)}, not a whole number")
        if not low <= value <= high:
            raise self.fail(where, f"is {value}, outside {low}..{high}")
        return value

    def number(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(where, f"is {_kind(value)}, not a number")
        return float(value)

    def numbers(self, value: Any, where: str) -> list[float]:
        if not isinstance(value, list):
            raise self.fail(where, f"is {_kind(value)}, not a list of numbers")
        return [self.number(v, f"{where}[{i}]") for i, v in enumerate(value)]

    def integers(self, value: Any, where: str, low: int, count: range) -> list[int]:
        if not isinstance(value, list) or len(value) not in count:
            raise self.fail(where, f"is {_kind(value)}, not a list of {_count(count)} numbers")
        return [self.integer(v, f"{where}[{i}]", low, MAX_DIM) for i, v in enumerate(value)]

    def texts(self, value: Any, where: str) -> list[str]:
        if not isinstance(value, list):
            raise self.fail(where, f"is {_kind(value)}, not a list of names")
        return [self.text(v, f"{where}[{i}]") for i, v in enumerate(value)]


def validate_metadata(path: Path, meta: Mapping[str, Any], newest: int) -> None:
    """Refuse metadata whose fields have the wrong type, range or shape."""
    f = _Fields(path)
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > newest:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this puma understands "
            f"({newest}); upgrade puma"
        )
    f.integer(version, "format_version", 1, newest)
    if "puma_version" in meta:
        f.text(meta["puma_version"], "puma_version")
    arch = _architecture(f, meta.get("architecture"))
    if (
        "n_classes" in meta
        and f.integer(meta["n_classes"], "n_classes", 1, MAX_DIM) != (arch["n_classes"])
    ):
        raise f.fail("n_classes", "differs from the architecture's class count")
    f.texts(meta.get("feature_names"), "feature_names")
    if not isinstance(meta.get("feature_names_given", True), bool):
        raise f.fail("feature_names_given", "is not true or false")
    names = meta.get("class_names")
    if names is not None:
        names = f.texts(names, "class_names")
        if len(names) != arch["n_classes"] or len(set(names)) != len(names):
            raise f.fail("class_names", f"is not {arch['n_classes']} distinct names")
    _recipe(f, meta.get("recipe"), arch)
    data = f.mapping(meta.get("data"), "data")
    for role, record in {"train": None, **data}.items():
        if role not in DATA_ROLES:
            raise f.fail(f"data.{role}", "is not a data role (train, val, test)")
        if record is not None or role == "train":
            _data_record(f, record, f"data.{role}")
    for name, record in f.mapping(meta.get("sidecars", {}), "sidecars").items():
        _data_record(f, record, f"sidecars.{name}")
    metrics = f.mapping(meta.get("metrics", {}), "metrics")
    for split, figures in metrics.items():
        figures = f.mapping(figures, f"metrics.{split}")
        if "n" in figures:
            f.integer(figures["n"], f"metrics.{split}.n", 0, 2**62)
    provenance = meta.get("provenance", [])
    if not isinstance(provenance, list):
        raise f.fail("provenance", f"is {_kind(provenance)}, not a list of operations")
    for i, entry in enumerate(provenance):
        f.mapping(entry, f"provenance[{i}]")


def _architecture(f: _Fields, value: Any) -> dict[str, Any]:
    arch = f.mapping(value, "architecture")
    name = f.text(arch.get("name"), "architecture.name")
    if name not in (*ARCHITECTURES, "user"):
        known = ", ".join((*ARCHITECTURES, "user"))
        raise f.fail("architecture.name", f"is {name!r}, not one of {known}")
    f.mapping(arch.get("args") or {}, "architecture.args")
    source = arch.get("source")
    if name == "user" or source is not None:
        _source(f, source, "architecture.source")
    f.integers(arch.get("input_shape"), "architecture.input_shape", 1, range(1, MAX_ROW_AXES + 1))
    f.integer(arch.get("n_classes"), "architecture.n_classes", 1, MAX_DIM)
    f.integers(arch.get("hidden", []), "architecture.hidden", 1, range(MAX_LAYERS + 1))
    f.integers(arch.get("channels", [16, 32]), "architecture.channels", 1, range(2, 3))
    if f.text(arch.get("activation", "relu"), "architecture.activation") not in ACTIVATIONS:
        raise f.fail("architecture.activation", f"is not one of {', '.join(ACTIVATIONS)}")
    f.integer(arch.get("shards", 1), "architecture.shards", 1, MAX_DIM)
    return arch


def _recipe(f: _Fields, value: Any, arch: dict[str, Any]) -> None:
    recipe = f.mapping(value, "recipe")
    for key in ("epochs", "batch_size", "seed", "shards", "slices", "lr_warmup_epochs"):
        if key in recipe:
            f.integer(recipe[key], f"recipe.{key}", 0, 2**32)
    for key in ("lr", "weight_decay", "label_smoothing", "clip_grad_norm", "mixup", "cutmix"):
        if key in recipe:
            f.number(recipe[key], f"recipe.{key}")
    for key in ("arch", "activation", "optimizer", "augment", "lr_schedule"):
        if key in recipe:
            f.text(recipe[key], f"recipe.{key}")
    for key in ("standardize", "mixed_precision"):
        if not isinstance(recipe.get(key, key == "standardize"), bool):
            raise f.fail(f"recipe.{key}", "is not true or false")
    if "input_divisor" in recipe:
        f.number(recipe["input_divisor"], "recipe.input_divisor")
    for key in ("normalize_mean", "normalize_std", "class_weights"):
        f.numbers(recipe.get(key) or [], f"recipe.{key}")
    weights = recipe.get("class_weights") or []
    if weights and len(weights) != arch.get("n_classes"):
        raise f.fail("recipe.class_weights", f"holds {len(weights)} weights, not one a class")
    if "hidden" in recipe:
        f.integers(recipe["hidden"], "recipe.hidden", 1, range(MAX_LAYERS + 1))
    f.mapping(recipe.get("arch_args") or {}, "recipe.arch_args")
    if recipe.get("arch_source") is not None:
        _source(f, recipe["arch_source"], "recipe.arch_source")
    try:
        parsed = TrainRecipe.from_dict(recipe)
        parsed.validate()
    except PumaError as exc:
        raise f.fail("recipe", f"is not a usable training recipe ({exc})") from None
    if parsed.shards != arch.get("shards", 1):
        raise f.fail("recipe.shards", "differs from the architecture's shard count")


def _source(f: _Fields, value: Any, where: str) -> None:
    """A user architecture's file: its path, sha256 and class name."""
    source = f.mapping(value, where)
    f.text(source.get("path"), f"{where}.path")
    if not _SHA256.fullmatch(f.text(source.get("sha256"), f"{where}.sha256")):
        raise f.fail(f"{where}.sha256", "is not a sha256 (64 hex digits)")
    if not f.text(source.get("class"), f"{where}.class").isidentifier():
        raise f.fail(f"{where}.class", "is not a Python class name")


def _data_record(f: _Fields, value: Any, where: str) -> None:
    record = f.mapping(value, where)
    unknown = sorted(set(record) - {"path", "sha256", "n", "label_col", "id_col"})
    if unknown:
        raise f.fail(f"{where}.{unknown[0]}", "is not a field of a data record")
    if not f.text(record.get("path"), f"{where}.path"):
        raise f.fail(f"{where}.path", "is empty")
    if not _SHA256.fullmatch(f.text(record.get("sha256"), f"{where}.sha256")):
        raise f.fail(f"{where}.sha256", "is not a sha256 (64 hex digits)")
    f.integer(record.get("n"), f"{where}.n", 0, 2**62)
    for key in ("label_col", "id_col"):
        if key in record:
            f.text(record[key], f"{where}.{key}")


def validate_tensors(
    path: Path, meta: Mapping[str, Any], arch: Architecture, tensors: Mapping[str, torch.Tensor]
) -> None:
    """Refuse tensors that disagree with the metadata: the row roles, the SISA plan, and
    the network's names, shapes and dtypes (compared with a model built on no memory)."""
    f = _Fields(path)
    n_rows = int(meta["data"]["train"]["n"])
    roles = tensors.get("rows.role")
    if roles is None or roles.dtype != torch.uint8 or tuple(roles.shape) != (n_rows,):
        raise _tensor(path, "rows.role", roles, f"uint8 of shape ({n_rows},)")
    if roles.numel() and int(roles.max()) > max(ROLES):
        raise _tensor(path, "rows.role", roles, f"values in {ROLES}")
    if arch.shards > n_rows:
        raise f.fail("architecture.shards", f"is {arch.shards}, more than its {n_rows} rows")
    if arch.shards > 1:
        members = {k.split(".")[2] for k in tensors if k.startswith("model.members.")}
        if len(members) != arch.shards:
            raise f.fail(
                "architecture.shards",
                f"is {arch.shards}, but the file holds {len(members)} shard models",
            )
        _sisa(path, tensors, arch.shards, int(meta["recipe"].get("slices", 1)), n_rows)
    width = 1
    for size in arch.input_shape:
        width *= size
    if width > MAX_DIM * 100:
        raise f.fail("architecture.input_shape", f"declares {width} inputs per row")
    try:
        with torch.device("meta"):
            expected = build_model(arch).state_dict()
    except PumaError as exc:
        if arch.source is not None:
            raise  # the user's file is gone, changed or fails: its own message says so
        raise f.fail("architecture", f"cannot be built ({exc})") from None
    check_state(path, tensors, expected)


def check_state(
    path: Path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> None:
    """A file's `model.*` tensors are each tensor of `expected` (the network's state dict)
    at its dtype and shape, and nothing else; a SISA file's stored stages (`sisa.state.*`)
    each a whole member's state. A lazy layer's tensors (nn.LazyLinear's) have no shape
    until a batch has gone through the network, and on the meta device none can (a
    forward that reads a value fails there, and any costs seconds of torch's
    symbolic-shape imports): there only their presence and dtype are checked, their
    shapes again once the network is built on a real device and sized (`io.checkpoint`)."""
    given = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    for name, want in expected.items():
        have, lazy = given.get(name), is_lazy(want)
        if have is None or have.dtype != want.dtype or (not lazy and have.shape != want.shape):
            raise _tensor(
                path,
                f"model.{name}",
                have,
                f"{want.dtype} of shape {_shape(want)} for its architecture",
            )
    for name in sorted(set(given) - set(expected)):
        raise CheckpointError(
            f"{path}: tensor model.{name} is not part of its recorded architecture; the file "
            "was altered or written by another tool"
        )
    if "members.0.mean" in expected:  # a SISA ensemble
        _sisa_states(path, tensors, expected)


def _sisa(
    path: Path, tensors: Mapping[str, torch.Tensor], shards: int, slices: int, n: int
) -> None:
    for key, top in (("sisa.shard", shards), ("sisa.slice", slices)):
        plan = tensors.get(key)
        if plan is None or plan.dtype != torch.int16 or tuple(plan.shape) != (n,):
            raise _tensor(path, key, plan, f"int16 of shape ({n},)")
        if n and (int(plan.min()) < -1 or int(plan.max()) >= top):
            raise _tensor(path, key, plan, f"values in -1..{top - 1}")
    for key in tensors:
        if key.startswith("sisa.state."):
            parts = key.split(".", 4)
            ok = len(parts) == 5 and parts[2].isdigit() and parts[3].isdigit()
            if not ok or int(parts[2]) >= shards or int(parts[3]) >= slices - 1:
                raise CheckpointError(
                    f"{path}: tensor {key} names no stage of its {shards} shards x {slices} "
                    "slices; the file was altered or written by another tool"
                )


def _sisa_states(
    path: Path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> None:
    """Each stored stage is one whole member state: every tensor, each of its shape."""
    member = {k.split(".", 2)[2]: v for k, v in expected.items() if k.startswith("members.0.")}
    stages: dict[str, set[str]] = {}
    for key, tensor in tensors.items():
        if not key.startswith("sisa.state."):
            continue
        _, _, k, r, name = key.split(".", 4)
        want = member.get(name)
        if (
            want is None
            or tensor.dtype != want.dtype
            or (not is_lazy(want) and tensor.shape != want.shape)
        ):
            shape = "none" if want is None else _shape(want)
            raise _tensor(path, key, tensor, f"a shard model's tensor (shape {shape})")
        stages.setdefault(f"{k}.{r}", set()).add(name)
    for stage, names in sorted(stages.items()):
        if names != set(member):
            missing = sorted(set(member) - names)[0]
            raise _tensor(path, f"sisa.state.{stage}.{missing}", None, "one per shard tensor")


def _tensor(path: Path, name: str, tensor: torch.Tensor | None, want: str) -> CheckpointError:
    if tensor is None:
        have = "missing"
    else:
        have = f"{tensor.dtype} of shape {'x'.join(map(str, tensor.shape)) or 'scalar'}"
    return CheckpointError(
        f"{path}: tensor {name} is {have}, expected {want}; the file was altered or written "
        "by another tool: restore it from a copy or retrain"
    )


def _shape(tensor: torch.Tensor) -> str:
    if is_lazy(tensor):
        return "its layer's"  # not sized yet
    return "x".join(map(str, tensor.shape)) or "scalar"


def _kind(value: Any) -> str:
    if value is None:
        return "missing"
    return {dict: "a mapping", list: "a list", str: "text", bool: "true/false"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _count(count: range) -> str:
    if len(count) == 1:
        return str(count.start)
    if count.step != 1:
        return " or ".join(map(str, count))
    return f"{count.start}..{count.stop - 1}"
