"""Shared, seeded fixtures: a tiny radial set and a model trained on it (session-scoped)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import typer.testing
from typer.testing import CliRunner, Result

from puma_cli.cli import app

FAST = ["--epochs", "30", "--device", "cpu"]

# typer's CliRunner builds the click command from the app's signatures on every invoke
# (about 80 ms: it evaluates each option's annotation); the suite invokes the CLI some
# thousands of times, so the one app's command is built once and reused.
typer.testing._get_command = functools.cache(typer.testing._get_command)  # type: ignore[attr-defined]


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def run_json(*args: str | Path) -> dict[str, Any]:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert isinstance(payload, dict)
    return payload


def assert_clean_error(result: Result, fragment: str) -> None:
    """Exit 1, exactly one `Error: ...` line on stderr naming the problem, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


def rewrite_tensor(path: Path, name: str, change: Any) -> None:
    """Replace tensor `name` of the safetensors file `path` with `change(tensor)`, keeping
    the file's other tensors and its metadata (a cache's key)."""
    from safetensors.torch import load_file, save_file

    with open(path, "rb") as handle:
        meta = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))["__metadata__"]
    tensors = load_file(str(path))
    save_file({**tensors, name: change(tensors[name])}, str(path), metadata=meta)


def assert_recipe_setting(data: Path, folder: Path, flag: str, value: str, key: str) -> Path:
    """A training-recipe setting through the CLI: a short run on `data` with `flag value`
    and one without; the recipe records `key` only where it was given (older recipes, and
    their shadow-model cache keys, stay as they were), the setting changes the weights,
    and `remove --method retrain` re-runs it. Returns the model trained with it and the
    ids file marked for it (`ids.txt` in `folder`)."""
    import torch

    from puma_cli.io.checkpoint import load_checkpoint

    given, plain = folder / "given.safetensors", folder / "plain.safetensors"
    for out, extra in ((given, [flag, value]), (plain, [])):
        run_json(
            "train", data, "--hidden", "8", "--epochs", "4", "--lr", "0.05", "--device", "cpu",
            "-o", out, *extra,
        )  # fmt: skip
    recorded = run_json("info", given)["recipe"][key]
    assert str(recorded) == value, recorded
    assert key not in run_json("info", plain)["recipe"]
    a, b = load_checkpoint(given).model.state_dict(), load_checkpoint(plain).model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    ids = folder / "ids.txt"
    run_json("mark", data, "--random", "0.05", "-o", ids)
    out = folder / "retrained.safetensors"
    run_json("remove", "-m", given, "--marked", ids, "--method", "retrain", "-o", out)
    assert str(run_json("info", out)["recipe"][key]) == value
    return given


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """radial.csv (160 points) and radial-test.csv (40) made by the CLI."""
    folder = tmp_path_factory.mktemp("data")
    result = run(
        "make-data", "radial", "-o", folder / "radial.csv", "--n", "200", "--test-frac", "0.2"
    )
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture(scope="session")
def model_file(data_dir: Path) -> Path:
    path = data_dir / "model.safetensors"
    result = run(
        "train", data_dir / "radial.csv", "--test", data_dir / "radial-test.csv", "-o", path, *FAST
    )
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="session")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """moons with 10 % of the training labels flipped, and a model trained on them."""
    folder = tmp_path_factory.mktemp("noisy")
    for args in (
        [
            "make-data",
            "moons",
            "-o",
            folder / "d.csv",
            "--n",
            "500",
            "--flip-labels",
            "0.1",
            "--seed",
            "2",
        ],
        [
            "train",
            folder / "d.csv",
            "-o",
            folder / "m.safetensors",
            "--epochs",
            "60",
            "--device",
            "cpu",
        ],
    ):
        result = run(*args)
        assert result.exit_code == 0, result.output
    return folder
