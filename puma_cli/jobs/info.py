"""`puma info`: a checkpoint's metadata, with the state of each file it records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from puma_cli.io import checkpoint as ckpt
from puma_cli.io import recorded
from puma_cli.models.architectures import OPTIONAL_FIELDS, SHAPED_BY

# The recipe's names for the architecture's fields (`train` records both).
RECIPE_NAMES = {"args": "arch_args", "source": "arch_source"}


def describe(model: Path) -> dict[str, Any]:
    """The checkpoint's metadata, with the state of each recorded data file. The
    architecture and the recipe leave out the settings the net is not built from (a
    ResNet-18 or a user's class has no `--hidden` widths): every checkpoint records
    them, at their defaults where they do not apply."""
    checkpoint = ckpt.load_checkpoint(model)
    info = checkpoint.metadata()
    used = SHAPED_BY.get(checkpoint.arch.name, OPTIONAL_FIELDS)
    for name in set(OPTIONAL_FIELDS) - set(used):
        info["architecture"].pop(name, None)
        info["recipe"].pop(RECIPE_NAMES.get(name, name), None)
    info["model"] = str(model)
    info["data_status"] = recorded.data_status(checkpoint)
    return info


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
    return str(value)


def rows_line(rows: dict[str, Any]) -> str:
    """The training file's rows by role: `417 trained, 43 validation, 20 removed`."""
    return ", ".join(f"{count:,} {role}" for role, count in rows.items())


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


def provenance_line(entry: dict[str, Any]) -> str:
    """One operation of a checkpoint's provenance in a sentence: what it did and what it
    measured before and after (`--json` keeps every field)."""
    op = entry.get("op")
    when = str(entry.get("time", ""))[:16].replace("T", " ")
    figures = entry.get("metrics") or {}
    if op == "remove":
        parameters = entry.get("parameters") or {}
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
    warnings = entry.get("warnings") or []
    if warnings:
        parts.append(f"{len(warnings)} warning{'s' if len(warnings) > 1 else ''} (--json)")
    text = ", ".join(p for p in parts if p)
    return f"{when} {text}" if when else text
