"""The package's shape: layers import downward only, no cycles, one name per module,
and a command line that starts without torch or scikit-learn."""

from __future__ import annotations

import ast
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import puma_cli
from puma_cli import cli
from puma_cli.cli import options

PACKAGE = Path(puma_cli.__file__).parent

# Lower numbers are lower layers. A module may import its own package and any lower
# layer, never a higher one or a peer package on the same level.
LAYERS = {
    "puma_cli": 0,
    "puma_cli.errors": 0,
    "puma_cli.devices": 1,
    "puma_cli.parallel": 1,
    "puma_cli.data": 2,
    "puma_cli.models": 3,
    "puma_cli.io": 4,
    "puma_cli.engine": 5,
    "puma_cli.unlearn": 6,
    "puma_cli.audit": 6,
    "puma_cli.quality": 6,
    "puma_cli.plots": 7,
    "puma_cli.jobs": 8,
    "puma_cli.console": 9,
    "puma_cli.cli": 10,
    "puma_cli.__main__": 11,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """The entry of LAYERS a module belongs to: its longest matching prefix."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in LAYERS:
            return candidate
    raise AssertionError(f"{module} is in no layer; add it to LAYERS in {__file__}")


def imports_of(tree: ast.AST, module: str, top_level_only: bool = False) -> set[str]:
    """puma_cli modules imported anywhere in `tree` (or only where the module runs on import)."""
    nodes = (
        _executed_on_import(tree)
        if top_level_only
        else [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    )
    found: set[str] = set()
    package = module if module in _packages() else module.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "puma_cli")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "puma_cli":
                continue
            for alias in node.names:
                # `from puma_cli.io import checkpoint` names a module; otherwise a symbol.
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in _all_modules() else base)
    return found


def _executed_on_import(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Imports at module level, outside functions and `if TYPE_CHECKING:` blocks."""
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                out.append(node)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    assert isinstance(tree, ast.Module)
    visit(tree.body)
    return out


def _files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@functools.cache
def _all_modules() -> set[str]:
    return {module_name(f) for f in _files()}


@functools.cache
def _packages() -> set[str]:
    return {module_name(f) for f in _files() if f.name == "__init__.py"}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    graph = {}
    for path in _files():
        name = module_name(path)
        graph[name] = imports_of(ast.parse(path.read_text()), name, top_level_only)
    return graph


def test_every_module_has_a_layer() -> None:
    for module in _all_modules():
        unit_of(module)


def test_layers_import_downward_only() -> None:
    wrong = []
    for module, imported in _graph(top_level_only=False).items():
        own = unit_of(module)
        for target in imported:
            other = unit_of(target)
            if other == own or other == "puma_cli":  # the root holds only __version__
                continue
            if LAYERS[other] >= LAYERS[own]:
                wrong.append(
                    f"{module} imports {target} ({own} {LAYERS[own]} -> {other} {LAYERS[other]})"
                )
    assert not wrong, "\n".join(sorted(wrong))


def test_the_layer_check_catches_an_upward_import() -> None:
    tree = ast.parse("from puma_cli.jobs.remove import remove\nfrom . import checkpoint\n")
    found = imports_of(tree, "puma_cli.io.datasets")
    assert found == {"puma_cli.jobs.remove", "puma_cli.io.checkpoint"}
    assert LAYERS[unit_of("puma_cli.jobs.remove")] > LAYERS[unit_of("puma_cli.io.datasets")]


def test_no_import_cycles() -> None:
    graph = _graph(top_level_only=True)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt) :] if nxt in trail else trail
                raise AssertionError(" -> ".join([*cycle, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_one_name_one_module() -> None:
    names: dict[str, list[str]] = {}
    for path in _files():
        if path.name not in ("__init__.py", "__main__.py"):
            names.setdefault(path.stem, []).append(module_name(path))
    assert {k: v for k, v in names.items() if len(v) > 1} == {}


def test_the_command_line_starts_without_torch_or_scikit_learn() -> None:
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from puma_cli.cli import COMMANDS, app\n"
        "runner = CliRunner()\n"
        "codes = [runner.invoke(app, ['--help']).exit_code]\n"
        "codes += [runner.invoke(app, [c, '--help']).exit_code for c in COMMANDS]\n"
        "heavy = sorted(m for m in ('torch', 'sklearn', 'scipy', 'safetensors')\n"
        "               if m in sys.modules)\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0] * (len(cli.COMMANDS) + 1)
    assert result["heavy"] == []


def test_every_command_is_listed() -> None:
    import typer.main

    group = typer.main.get_command(cli.app)
    assert set(group.commands) == set(cli.COMMANDS)  # type: ignore[attr-defined]


def test_help_lists_the_commands_in_their_order() -> None:
    """The commands live in four modules, registered as each is imported: --help keeps
    the order of a session (make the data, train, mark, remove, audit, ship)."""
    from typer.testing import CliRunner

    shown = CliRunner().invoke(cli.app, ["--help"], env={"COLUMNS": "120"}).output
    names = re.findall(r"^\W ([a-z][a-z-]+)  ", shown, flags=re.MULTILINE)  # "│ name  help"
    assert names == list(cli.COMMANDS)


@pytest.mark.parametrize(
    ("choices", "library"),
    [
        ("KINDS", "kinds"),
        ("ARCHS", "architectures"),
        ("Activation", "activations"),
        ("Method", "methods"),
        ("Solver", "solvers"),
        ("Curvature", "curvatures"),
        ("Attack", "attacks"),
        ("Score", "scores"),
        ("Forget", "forgetting"),
    ],
)
def test_cli_choices_match_the_library(choices: str, library: str) -> None:
    from puma_cli.audit import ATTACKS
    from puma_cli.data.synthetic import KINDS
    from puma_cli.engine.curvature import CURVATURES
    from puma_cli.engine.solvers import SOLVERS
    from puma_cli.models.architectures import ACTIVATIONS, ARCHITECTURES
    from puma_cli.quality.label_ranking import SCORES
    from puma_cli.unlearn import FORGETTING, METHODS, get_method

    get_method("puma")  # fills the registry
    known = {
        "kinds": set(KINDS),
        "architectures": set(ARCHITECTURES),
        "activations": set(ACTIVATIONS),
        "methods": set(METHODS),
        "solvers": set(SOLVERS),
        "curvatures": set(CURVATURES),
        "attacks": set(ATTACKS),
        "scores": set(SCORES),
        "forgetting": set(FORGETTING),
    }[library]
    value = getattr(options, choices)
    offered = set(value) if isinstance(value, tuple) else {member.value for member in value}
    assert offered == known


def test_cli_defaults_match_the_library() -> None:
    from puma_cli.unlearn import UPWEIGHT_SAMPLE, RemovalOptions

    assert options.UPWEIGHT_SAMPLE == UPWEIGHT_SAMPLE == RemovalOptions().upweight_sample
