"""--config FILE.yaml: defaults for any option; flags on the command line win.

The file is a mapping. Top-level keys set an option for every command that has it;
a key named after a command (`train:`, `mark:`) holds options for that command only.
Keys may use dashes or underscores (`batch-size` or `batch_size`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from puma_cli.errors import ConfigError
from puma_cli.io.files import require_file


def load_config(
    path: Path, command: str, commands: Iterable[str], options: set[str]
) -> dict[str, Any]:
    """The defaults that `path` sets for `command`, whose option names are `options`."""
    require_file(path, "config file", "a YAML config file", ConfigError)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid YAML ({_short(exc)}); fix its syntax") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{path} must hold a mapping of option: value, not {type(loaded).__name__}"
        )
    names = set(commands)
    defaults: dict[str, Any] = {}
    for key, value in loaded.items():
        if str(key) in names:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: '{key}:' must hold a mapping of option: value")
            if str(key) == command:
                for option, option_value in value.items():
                    name = _normal(option)
                    if name not in options:
                        known = ", ".join(sorted(o.replace("_", "-") for o in options))
                        raise ConfigError(
                            f"{path}: {command} has no option '{option}' (options: {known})"
                        )
                    defaults[name] = option_value
            continue
        name = _normal(key)
        if name in options and name not in defaults:
            defaults[name] = value
    return defaults


def _normal(key: object) -> str:
    return str(key).strip().lstrip("-").replace("-", "_")


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
