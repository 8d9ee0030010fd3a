"""The Makefile's install step, which `make demo` and `make test` share."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_refuses_a_python_older_than_3_11_before_making_a_venv(tmp_path: Path) -> None:
    """The pinned numpy and scipy need Python 3.11: an older one is named, with the way on,
    before anything is made (pip would fail later, on a pin, after a venv and downloads)."""
    old = tmp_path / "python3.10"
    old.write_text(
        '#!/bin/sh\nif [ "$1" = "-V" ]; then echo "Python 3.10.13"; exit 0; fi\n'
        'if [ "$1" = "-m" ]; then mkdir -p "$3/bin"; fi\nexit 1\n'
    )
    old.chmod(0o755)
    venv = tmp_path / "venv"
    done = subprocess.run(
        ["make", f"{venv}/bin/puma", f"PYTHON={old}", f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        f"Error: puma needs Python 3.11 or newer; '{old}' is Python 3.10.13: run make "
        "again with PYTHON=python3.11 (or newer)"
    ]
    assert not venv.exists()


def test_the_python_puma_needs_is_said_alike_everywhere() -> None:
    """pyproject's requires-python, ruff's target, the Makefile's guard and the README's
    line name one version: the one the pins in constraints.txt need."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["requires-python"] == ">=3.11"
    assert project["tool"]["ruff"]["target-version"] == "py311"
    makefile = (ROOT / "Makefile").read_text()
    assert "sys.version_info < (3, 11)" in makefile
    assert "needs Python 3.11 or newer" in makefile
    readme = (ROOT / "README.md").read_text()
    assert "`python3` (3.11 or newer" in readme
