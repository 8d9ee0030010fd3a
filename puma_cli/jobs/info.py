"""`puma info`: a checkpoint's metadata, with the state of each file it records; or what a
deployed file `puma export` wrote records of itself."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from puma_cli.errors import DataError
from puma_cli.io import checkpoint as ckpt
from puma_cli.io import recorded
from puma_cli.io.files import is_regular_file
from puma_cli.io.weights import exported_record, file_header, tensor_shapes
from puma_cli.models.architectures import OPTIONAL_FIELDS, SHAPED_BY

# The recipe's names for the architecture's fields (`train` records both).
RECIPE_NAMES = {"args": "arch_args", "source": "arch_source"}


def describe(model: Path) -> dict[str, Any]:
    """The checkpoint's metadata, with the state of each recorded data file. The
    architecture and the recipe leave out the settings the net is not built from (a
    ResNet-18 or a user's class has no `--hidden` widths): every checkpoint records
    them, at their defaults where they do not apply. A network `puma export` wrote is
    described from the record in its metadata (`format`: `puma-export`)."""
    exported = _exported(model)
    if exported is not None:
        return exported
    checkpoint = ckpt.load_checkpoint(model)
    info = checkpoint.metadata()
    used = SHAPED_BY.get(checkpoint.arch.name, OPTIONAL_FIELDS)
    for name in set(OPTIONAL_FIELDS) - set(used):
        info["architecture"].pop(name, None)
        info["recipe"].pop(RECIPE_NAMES.get(name, name), None)
    info["model"] = str(model)
    info["data_status"] = recorded.data_status(checkpoint)
    return info


def _exported(path: Path) -> dict[str, Any] | None:
    """What a deployed file `puma export` wrote says of itself: the checkpoint it came
    from, the removals it records (without their ids' hash or the marked rows' figures),
    the inputs transform, an ensemble's members; and how many tensors and values it
    holds. None for any other file (a checkpoint is loaded and checked as such)."""
    if not is_regular_file(path):
        return None
    header = file_header(path)
    record = exported_record(header)
    if record is None:
        return None
    _check_export_record(path, record)
    shapes = tensor_shapes(header).values()
    return {  # the record first: what puma says of the file is not the file's to override
        **record,
        "format": "puma-export",
        "file": str(path),
        "tensors": len(shapes),
        "n_values": sum(math.prod(shape) for shape in shapes),
    }


def _check_export_record(path: Path, record: dict[str, Any]) -> None:
    """Refuse a deployed file's record that is not as `puma export` writes it (the file
    may come from anywhere): the fields `info` reads, of the types it reads them as."""
    wrong = next((name for name, ok in _export_fields(record) if not ok), None)
    if wrong is not None:
        raise DataError(
            f"{path} holds puma_export metadata whose {wrong!r} is not as `puma export` "
            "writes it; export the model again"
        )


def _export_fields(record: dict[str, Any]) -> Iterator[tuple[str, bool]]:
    yield "model", isinstance(record.get("model", ""), str)
    provenance = record.get("provenance", [])
    yield (
        "provenance",
        isinstance(provenance, list) and all(isinstance(entry, dict) for entry in provenance),
    )
    inputs = record.get("inputs")
    if inputs is not None:
        if not isinstance(inputs, dict):
            yield "inputs", False
        else:  # one transform, or one a shard
            each = [inputs] if "divisor" in inputs else list(inputs.values())
            yield "inputs", all(_is_transform(t) for t in each)
    ensemble = record.get("ensemble")
    if ensemble is not None:
        yield (
            "ensemble",
            isinstance(ensemble, dict) and isinstance(ensemble.get("members", []), list),
        )


def _is_transform(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("divisor"), int | float)
        and all(isinstance(value.get(k), list) for k in ("mean", "std"))
    )


def _figure(value: Any, spec: str = ".3g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def _change(name: str, before: Any, after: Any) -> str | None:
    if before is None and after is None:
        return None
    spec = ".3f" if "accuracy" in name else ".3g"
    return f"{name} {_figure(before, spec)} -> {_figure(after, spec)}"


def settings_line(settings: dict[str, Any]) -> str:
    """An architecture's or a recipe's settings as `name=value` pairs, in their order."""
    return ", ".join(f"{key}={_setting(value)}" for key, value in settings.items()) or "none"


def _setting(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(_setting(v) for v in value) or "-"
    if isinstance(value, dict):
        return "{" + (settings_line(value) if value else "") + "}"
    if isinstance(value, float):
        return f"{value:.6g}"  # a balanced class weight's 0.7142857142857143: 0.714286
    return str(value)


def rows_line(rows: dict[str, Any]) -> str:
    """The training file's rows by role: `417 trained, 43 validation, 20 removed` (and
    `2 withdrawn`, validation rows a removal was asked for, where there are any)."""
    return ", ".join(
        f"{count:,} {role}" for role, count in rows.items() if count or role != "withdrawn"
    )


def metrics_line(metrics: dict[str, Any]) -> str:
    """The recorded figures of each split on one line: `train: accuracy 0.97, loss 0.1,
    ECE 0.02 (432 rows); test: ...`."""
    parts = []
    order = {"train": 0, "val": 1, "test": 2}
    for split, figures in sorted(metrics.items(), key=lambda kv: order.get(kv[0], 3)):
        if not isinstance(figures, dict):
            parts.append(f"{split}: {figures}")
            continue
        shown = [
            f"{name} {_figure(figures[key], spec)}"
            for key, name, spec in (
                ("accuracy", "accuracy", ".3f"),
                ("loss", "loss", ".3g"),
                ("ece", "ECE", ".3g"),
            )
            if key in figures
        ]
        rows = f" ({figures['n']:,} rows)" if isinstance(figures.get("n"), int) else ""
        parts.append(f"{split}: {', '.join(shown)}{rows}")
    return "; ".join(parts) or "none"


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def provenance_line(entry: dict[str, Any]) -> str:
    """One operation of a checkpoint's provenance in a sentence: what it did and what it
    measured before and after (`--json` keeps every field)."""
    op = entry.get("op")
    when = str(entry.get("time", ""))[:16].replace("T", " ")
    figures = _mapping(entry.get("metrics"))
    if op == "remove":
        parameters = _mapping(entry.get("parameters"))
        how = ", ".join(
            str(v) for v in (entry.get("method"), parameters.get("curvature")) if v is not None
        )
        parts = [
            f"remove ({how}): {entry.get('removed')} trained rows of "
            f"{entry.get('ids_count')} marked ids",
            _change(
                "test accuracy",
                figures.get("test_accuracy_before"),
                figures.get("test_accuracy_after"),
            ),
            _change(
                "marked loss", figures.get("marked_loss_before"), figures.get("marked_loss_after")
            ),
        ]
    elif op == "calibrate":
        parts = [
            "calibrate (puma)",
            _change("ECE", figures.get("ece_before"), figures.get("ece_after")),
            _change("accuracy", figures.get("accuracy_before"), figures.get("accuracy_after")),
            _change("test ECE", figures.get("test_ece_before"), figures.get("test_ece_after")),
        ]
    elif op == "relink":
        parts = [
            f"relink: to a file of {entry.get('rows')} rows ({entry.get('dropped')} "
            "removed rows deleted from it)"
        ]
    elif op == "import":
        digest = str(entry.get("weights_sha256", ""))[:12]
        parts = [
            f"import of {entry.get('weights')} (sha256 {digest})",
            "behind the inputs transform its puma_export metadata records"
            if entry.get("inputs_from")
            else None,
        ]
    else:
        return str(entry)
    if isinstance(entry.get("seconds"), (int, float)):
        parts.append(f"{entry['seconds']:.3g} s")
    warnings = entry.get("warnings") if isinstance(entry.get("warnings"), list) else []
    if warnings:
        parts.append(f"{len(warnings)} warning{'s' if len(warnings) > 1 else ''} (--json)")
    text = ", ".join(p for p in parts if p)
    return f"{when} {text}" if when else text


def exported_rows(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """A deployed file's record (`_exported`) as the rows `info` shows a person."""
    digest = str(meta.get("model_sha256", ""))[:12]
    inputs = meta.get("inputs")
    if not isinstance(inputs, dict):
        shown = "the values as they are"
    elif "divisor" in inputs:
        shown = _transform(inputs)
    else:  # one transform a shard
        shown = "; ".join(f"{k}: {_transform(v)}" for k, v in inputs.items())
    history = meta.get("provenance") or []
    lines = [f"{i}. {provenance_line(entry)}" for i, entry in enumerate(history, 1)]
    rows = [
        ("written by", "puma export: a network's state dict to deploy, not a checkpoint"),
        ("exported from", f"{meta.get('model')} (sha256 {digest})"),
        ("architecture", str(meta.get("architecture"))),
        ("tensors", f"{meta['tensors']:,} ({meta['n_values']:,} values)"),
        ("inputs", shown),
    ]
    ensemble = meta.get("ensemble")
    if isinstance(ensemble, dict):
        members = ", ".join(map(str, ensemble.get("members") or []))
        left = ensemble.get("left_out") or []
        rows.append(("ensemble", f"{members}{f'; left out: {left}' if left else ''}"))
    rows.append(("provenance", "\n".join(lines) or "none (as trained)"))
    return rows


def _transform(inputs: Any) -> str:
    """(x / divisor - mean) / std with its values, as a serving pipeline applies it."""
    if not isinstance(inputs, dict):
        return "the values as they are"
    mean, std = inputs.get("mean") or [], inputs.get("std") or []
    return f"(x / {inputs.get('divisor')} - mean) / std, mean {_short(mean)}, std {_short(std)}"


def _short(values: list[Any]) -> str:
    shown = ", ".join(_figure(v, ".4g") for v in values[:4])
    return f"[{shown}{', ...' if len(values) > 4 else ''}] ({len(values)})"
