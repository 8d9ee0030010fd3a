"""The README's Python API example runs as written, on data made by the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import run

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_example() -> str:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds one example"
    return blocks[0]


def test_the_readme_python_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        run("make-data", "radial", "-o", tmp_path / "radial.csv", "--test-frac", "0.2").exit_code
        == 0
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(_api_example(), str(README), "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("puma ") and printed[1].startswith("Evaluation(accuracy=")
    assert (tmp_path / "m2.safetensors").is_file()


def test_the_recipe_still_imports_from_where_it_was() -> None:
    from puma_cli.models.recipe import TrainRecipe
    from puma_cli.models.training import TrainRecipe as Earlier

    assert Earlier is TrainRecipe
