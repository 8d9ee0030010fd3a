"""What puma promises about files: a recorded input is never an output, a FIFO or device
never hangs a command, a tampered model is refused, every number is range-checked up
front, and --json is standard JSON. Each refusal: exit 1, one `Error:` line, nothing
written, inputs unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run, run_json

from puma_cli import console
from puma_cli.io.checkpoint import load_checkpoint, save_checkpoint


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.fixture
def own(data_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the data and a model that records it (and an Amnesiac sidecar),
    so that a failure to refuse damages nothing shared."""
    for name in ("radial.csv", "radial-test.csv"):
        shutil.copy(data_dir / name, tmp_path / name)
    result = run(
        "train",
        tmp_path / "radial.csv",
        "--test",
        tmp_path / "radial-test.csv",
        "-o",
        tmp_path / "m.safetensors",
        "--record-updates",
        "--epochs",
        "5",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    (tmp_path / "ids.txt").write_text("0\n2\n")
    (tmp_path / "val.csv").write_text((tmp_path / "radial-test.csv").read_text())
    return tmp_path


RECORDED_AS_OUTPUT = {
    "remove onto the training data": (
        ["remove", "-m", "m.safetensors", "--marked", "ids.txt", "-o", "radial.csv"],
        "radial.csv is also an input",
    ),
    "remove onto the Amnesiac sidecar": (
        [
            "remove",
            "-m",
            "m.safetensors",
            "--marked",
            "ids.txt",
            "--method",
            "amnesiac",
            "-o",
            "m.updates.safetensors",
        ],
        "m.updates.safetensors is also an input",
    ),
    "remove onto its criterion data": (
        [
            "remove",
            "-m",
            "m.safetensors",
            "--marked",
            "ids.txt",
            "--criterion-data",
            "val.csv",
            "-o",
            "val.csv",
        ],
        "val.csv is also an input",
    ),
    "attack plot onto the test data": (
        ["attack", "-m", "m.safetensors", "--targets", "ids.txt", "--plot", "radial-test.csv"],
        "radial-test.csv is also an input",
    ),
    "debug-labels onto its truth": (
        ["debug-labels", "-m", "m.safetensors", "--truth", "ids.txt", "-o", "ids.txt"],
        "ids.txt is also an input",
    ),
    "calibrate onto its criterion data": (
        ["calibrate", "-m", "m.safetensors", "--criterion-data", "val.csv", "-o", "val.csv"],
        "val.csv is also an input",
    ),
}


@pytest.mark.parametrize("case", sorted(RECORDED_AS_OUTPUT))
def test_no_input_is_an_output_even_with_overwrite(own: Path, case: str) -> None:
    args, message = RECORDED_AS_OUTPUT[case]
    before = digests(own)
    paths = [str(own / a) if (own / a).exists() or "." in a else a for a in args]
    result = run(*paths, "--overwrite", "--device", "cpu")
    assert_clean_error(result, message)
    assert digests(own) == before


def _fifo_case(kind: str, folder: Path, fifo: Path, model: Path) -> list[str]:
    return {
        "data": ["train", str(fifo), "-o", str(folder / "m.safetensors")],
        "device file": ["train", "/dev/zero", "-o", str(folder / "m.safetensors")],
        "ids": ["remove", "-m", str(model), "--marked", str(fifo)],
        "model": ["info", str(fifo)],
        "config": ["info", str(model), "--config", str(fifo)],
    }[kind]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("kind", ["data", "device file", "ids", "model", "config"])
def test_a_fifo_or_device_is_refused_not_waited_on(
    kind: str, tmp_path: Path, model_file: Path
) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    args = _fifo_case(kind, tmp_path, fifo, model_file)
    # A subprocess, so that a regression shows as a timeout, not a hung test run.
    done = subprocess.run(
        [sys.executable, "-m", "puma_cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    assert "not a regular file" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_a_checkpoint_with_nan_weights_is_refused(model_file: Path, tmp_path: Path) -> None:
    checkpoint = load_checkpoint(model_file)
    with torch.no_grad():
        next(checkpoint.model.parameters())[0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_checkpoint(bad, checkpoint)
    for args in (["debug-labels", "-m", bad], ["eval", "-m", bad], ["info", bad]):
        assert_clean_error(run(*args, "--device", "cpu"), "holds NaN or inf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]


BAD_NUMBERS = {
    "noise nan": (["make-data", "radial", "--noise", "nan"], "--noise nan is out of range"),
    "noise inf": (["make-data", "radial", "--noise", "inf"], "--noise inf is out of range"),
    "negative flips": (["make-data", "radial", "--flip-labels", "-0.1"], "--flip-labels -0.1"),
    "huge n": (["make-data", "radial", "--n", "100000000000"], "give a number in [1, 10000000]"),
    "negative seed": (["make-data", "radial", "--seed", "-1"], "--seed -1 is out of range"),
}


@pytest.mark.parametrize("case", sorted(BAD_NUMBERS))
def test_make_data_checks_its_numbers(case: str, tmp_path: Path) -> None:
    args, message = BAD_NUMBERS[case]
    assert_clean_error(run(*args, "-o", tmp_path / "d.csv"), message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--bins", "10000000"], "--bins 10000000 is out of range"),
        (["calibrate", "--bins", "0"], "--bins 0 is out of range"),
        (["calibrate", "--max-accuracy-drop", "nan"], "--max-accuracy-drop nan"),
        (["calibrate", "--damping", "inf"], "--damping inf is out of range"),
        (["debug-labels", "--damping", "-1"], "--damping -1 is out of range"),
        (["attack", "--targets", "x.txt", "--attack", "lira", "--shadows", "100000"], "[2, 1024]"),
    ],
)
def test_model_commands_check_their_numbers_first(
    args: list[str], message: str, model_file: Path, tmp_path: Path
) -> None:
    result = run(*args, "-m", model_file, "--device", "cpu")
    assert_clean_error(result, message)


def test_train_checks_its_numbers(data_dir: Path, tmp_path: Path) -> None:
    for args, message in (
        (["--lr", "inf"], "--lr inf is out of range"),
        (["--weight-decay", "nan"], "--weight-decay nan is out of range"),
    ):
        result = run("train", data_dir / "radial.csv", "-o", tmp_path / "m.safetensors", *args)
        assert_clean_error(result, message)
    assert list(tmp_path.iterdir()) == []


def test_config_values_of_the_wrong_type_or_range_exit_1(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    typed = tmp_path / "typed.yaml"
    typed.write_text("train:\n  epochs: many\n")
    assert_clean_error(
        run("train", data_dir / "radial.csv", "-o", out, "--config", typed),
        "typed.yaml: option 'epochs'",
    )
    seeded = tmp_path / "seeded.yaml"
    seeded.write_text("seed: -4\n")
    assert_clean_error(
        run("train", data_dir / "radial.csv", "-o", out, "--config", seeded),
        "--seed -4 is out of range",
    )
    folder = tmp_path / "conf.d"
    folder.mkdir()
    assert_clean_error(
        run("train", data_dir / "radial.csv", "-o", out, "--config", folder), "is a directory"
    )
    assert not out.exists()


def test_json_output_never_holds_nan_or_infinity(capsys: pytest.CaptureFixture[str]) -> None:
    console.emit_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    assert json.loads(capsys.readouterr().out) == {"a": None, "b": [1.0, None], "c": {"d": None}}


def test_a_valid_config_still_works(data_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text("seed: 3\ntrain:\n  epochs: 2\n")
    payload = run_json(
        "train", data_dir / "radial.csv", "-o", tmp_path / "m.safetensors", "--config", config
    )
    assert payload["model"].endswith("m.safetensors")


def test_the_dense_solver_is_refused_where_it_would_outrun_retraining(
    model_file: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from puma_cli.engine import solvers

    (tmp_path / "ids.txt").write_text("0\n2\n")
    monkeypatch.setattr(solvers, "EXACT_MAX_WORK", 1000)
    result = run(
        "remove",
        "-m",
        model_file,
        "--marked",
        tmp_path / "ids.txt",
        "--solver",
        "exact",
        "--no-cache",
        "-o",
        tmp_path / "out.safetensors",
        "--device",
        "cpu",
    )
    assert_clean_error(result, "slower than retraining; use --solver cg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt"]


UNREADABLE = {
    "data": lambda f, m: ["train", f / "radial.csv", "-o", f / "x.safetensors"],
    "ids": lambda f, m: ["remove", "-m", m, "--marked", f / "ids.txt", "-o", f / "x.safetensors"],
    "model": lambda f, m: ["info", m],
    "config": lambda f, m: ["info", m, "--config", f / "c.yaml"],
}


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_an_unreadable_file_is_bad_input_not_a_usage_error(
    kind: str, own: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit 1 with the fix, not click's exit 2 (os.access is faked: root reads anything)."""
    from puma_cli.io import files

    (own / "c.yaml").write_text("seed: 1\n")
    model = own / "m.safetensors"
    target = {"data": "radial.csv", "ids": "ids.txt", "model": "m.safetensors", "config": "c.yaml"}
    blocked = (own / target[kind]).resolve()
    real = os.access
    monkeypatch.setattr(
        files.os, "access", lambda p, mode: Path(p).resolve() != blocked and real(p, mode)
    )
    before = digests(own)
    result = run(*UNREADABLE[kind](own, model))
    assert_clean_error(result, f"{target[kind]} is not readable (permission denied)")
    assert digests(own) == before


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run as another user",
)
def test_an_unreadable_file_as_a_real_other_user(data_dir: Path) -> None:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="puma-perm-"))
    try:
        folder.chmod(0o777)
        data = folder / "d.csv"
        shutil.copy(data_dir / "radial.csv", data)
        data.chmod(0o000)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        probe = subprocess.run([*as_nobody, sys.executable, "-c", "import puma_cli"],
                               capture_output=True, check=False, timeout=60)  # fmt: skip
        if probe.returncode != 0:
            pytest.skip("the other user cannot run this Python")
        done = subprocess.run(
            [*as_nobody, sys.executable, "-m", "puma_cli", "train", str(data), "-o",
             str(folder / "m.safetensors")],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().splitlines() == [
            f"Error: {data} is not readable (permission denied); give yourself read "
            "permission (chmod u+r) or run as a user who may read it"
        ]
        assert sorted(p.name for p in folder.iterdir()) == ["d.csv"]
    finally:
        shutil.rmtree(folder)
