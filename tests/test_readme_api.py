"""The README's Python API example runs as written, on data made by the CLI."""

from __future__ import annotations

import re
import shlex
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


def _walk_commands() -> list[list[str]]:
    """The `puma ...` lines of the README's walk through the commands, split as a shell
    would (continued lines joined, comments dropped)."""
    section = README.read_text().split("## A walk through the commands", 1)[1]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    text = block.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words[:1] == ["puma"]:
                commands.append(words[1:])
    return commands


def _outputs(args: list[str]) -> list[str]:
    """The paths a command of the walk writes: -o/--output/--out-dir/--plot, or the
    default a command derives from its model."""
    from puma_cli.jobs.calibrate import default_calibrated_path
    from puma_cli.jobs.compare import default_out_dir
    from puma_cli.jobs.remove import default_removed_path

    named = {flag: args[i + 1] for i, flag in enumerate(args[:-1]) if flag.startswith("-")}
    written = [named[f] for f in ("-o", "--output", "--out-dir", "--plot") if f in named]
    model = Path(named.get("--model", "model"))
    defaults = {
        "remove": default_removed_path,
        "calibrate": default_calibrated_path,
        "compare": default_out_dir,
    }
    command = args[0]
    if command in defaults and not {"-o", "--output", "--out-dir"} & set(named):
        written.append(str(defaults[command](model)))
    return written


def test_the_readme_walk_never_writes_a_path_twice() -> None:
    """Run in order, as a reader copies them, no command of the walk writes what an
    earlier one wrote: puma would refuse it (no --overwrite), and the walk would stop."""
    seen: dict[str, str] = {}
    clashes = []
    commands = _walk_commands()
    assert len(commands) > 30  # the block was found and read
    for args in commands:
        for path in _outputs(args):
            if path in seen:
                clashes.append(f"{' '.join(args[:3])} ... writes {path}, as did {seen[path]}")
            seen.setdefault(path, " ".join(args[:3]))
    assert clashes == []
