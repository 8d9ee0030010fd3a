"""The bad-input fuzz harness (scripts/fuzz.py): every case keeps the promise, and the
judge itself notices a broken one."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz.py"


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("puma_fuzz", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["puma_fuzz"] = module
    spec.loader.exec_module(module)
    return module


def test_every_generated_bad_input_keeps_the_promise(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--timeout", "10"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())
    assert len(rows) >= 300
    assert all(row["ok"] for row in rows)
    assert {row["group"].split(":")[0] for row in rows} == {
        "arch", "config", "data", "ids", "model", "options", "outputs",
    }  # fmt: skip
    assert max(row["seconds"] for row in rows) < 10


def test_the_judge_notices_a_broken_promise(tmp_path: Path) -> None:
    fuzz = _harness()
    folder = tmp_path / "work"
    folder.mkdir()
    cases = fuzz.build_cases(folder)
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    model = folder / "m.safetensors"
    # A command that succeeds breaks the promise of a bad input: exit 0, stdout.
    fine = fuzz.judge(fuzz.Case("x", "success", ("info", str(model))), folder, pristine, 10)
    assert not fine.ok and "exit code 0" in fine.why and "wrote to stdout" in fine.why
    # One that writes a file is caught, and the file is cleaned away for the next case.
    out = folder / "fresh.ids"
    wrote = fuzz.judge(
        fuzz.Case("x", "writes", ("mark", str(folder / "radial.csv"), "--random", "0.1",
                                  "-o", str(out))),
        folder, pristine, 10,
    )  # fmt: skip
    assert not wrote.ok and "new files: fresh.ids" in wrote.why and not out.exists()
    assert len(cases) >= 300


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM timers")
def test_the_judge_turns_a_hang_into_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from puma_cli.io import datasets

    fuzz = _harness()
    (tmp_path / "d.csv").write_text("x,label\n1,0\n2,1\n")

    def slow(*args: object, **kwargs: object) -> None:
        time.sleep(30)

    monkeypatch.setattr(datasets, "load_dataset", slow)
    monkeypatch.setattr("puma_cli.jobs.mark.load_dataset", slow)
    case = fuzz.Case("x", "hangs", ("mark", str(tmp_path / "d.csv"), "--random", "0.5",
                                    "-o", str(tmp_path / "i.txt")))  # fmt: skip
    outcome = fuzz.judge(case, tmp_path, tmp_path, 1)
    assert not outcome.ok and "hang" in outcome.why and outcome.seconds < 5
