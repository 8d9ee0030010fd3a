"""SIGKILL at random moments: no partial output, inputs intact, and the next run sweeps
what the killed one left (its hidden temporaries) and completes.

Each command runs once to completion to time it, then is killed at three seeded random
moments of that time (0.3-0.9 of it; a run that ends before its kill was quicker than the
timed one, and the moment is tried again at that run's time); a kill cannot be caught,
so this is the case atomic writes exist for: the output is either absent or whole."""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run
from safetensors.torch import load_file

from puma_cli.io.checkpoint import load_checkpoint

MOMENTS = 3


def _digests(folder: Path, names: list[str]) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def _launch(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "puma_cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _timed(args: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "puma_cli", *args], capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return time.perf_counter() - started


def _kill_at(args: list[str], seconds: float) -> float | None:
    """Run, SIGKILL after `seconds`: None when the kill landed before the command ended,
    else the seconds the command took."""
    started = time.perf_counter()
    process = _launch(args)
    try:
        process.wait(timeout=seconds)
        return time.perf_counter() - started
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        return None


def _whole_or_absent(path: Path) -> None:
    if path.exists():
        load_checkpoint(path)  # a partial file would fail to load


@pytest.fixture(scope="module")
def bigger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3,000 radial rows: long enough (seconds) that a kill can land in each phase."""
    folder = tmp_path_factory.mktemp("kill")
    result = run("make-data", "radial", "-o", folder / "d.csv", "--n", "3000", "--test-frac", "0.2")
    assert result.exit_code == 0, result.output
    rows = (folder / "d.csv").read_text().splitlines()[1:121:2]
    (folder / "ids.txt").write_text("\n".join(row.split(",", 1)[0] for row in rows) + "\n")
    return folder


def _check_kills(folder: Path, args: list[str], output: Path, inputs: list[str], seed: int) -> None:
    before = _digests(folder, inputs)
    full = _timed([*args, "--overwrite"])
    output.unlink()
    rng = random.Random(seed)
    landed = 0
    for fraction in sorted(rng.uniform(0.3, 0.9) for _ in range(MOMENTS)):
        for _ in range(3):  # a run that ends first was quicker than the timed one: retime
            for cache in folder.glob("*.influence.safetensors"):
                cache.unlink()  # so that each killed run does the whole work again
            took = _kill_at(args, fraction * full)
            _whole_or_absent(output)
            assert _digests(folder, inputs) == before
            for stray in folder.glob("*.safetensors"):
                if stray.name.endswith(".influence.safetensors"):
                    load_file(str(stray))  # a cache is whole too, or not there
            output.unlink(missing_ok=True)
            if took is None:
                landed += 1
                break
            full = min(full, took)
    assert landed >= 2, "the kills all came after the command ended; nothing was tested"
    assert _launch([*args, "--overwrite"]).wait(timeout=300) == 0
    load_checkpoint(output)
    assert sorted(p.name for p in folder.glob(".*.tmp")) == []


def test_train_killed_at_random_moments_leaves_nothing_partial(bigger: Path) -> None:
    output = bigger / "m.safetensors"
    args = ["train", str(bigger / "d.csv"), "--test", str(bigger / "d-test.csv"),
            "-o", str(output), "--epochs", "20", "--device", "cpu"]  # fmt: skip
    _check_kills(bigger, args, output, ["d.csv", "d-test.csv"], seed=1)


def test_remove_killed_at_random_moments_leaves_nothing_partial(bigger: Path) -> None:
    model = bigger / "base.safetensors"
    made = run("train", bigger / "d.csv", "-o", model, "--epochs", "20", "--device", "cpu")
    assert made.exit_code == 0, made.output
    output = bigger / "r.safetensors"
    args = ["remove", "-m", str(model), "--marked", str(bigger / "ids.txt"), "-o", str(output),
            "--device", "cpu"]  # fmt: skip
    _check_kills(bigger, args, output, ["d.csv", "base.safetensors", "ids.txt"], seed=2)
