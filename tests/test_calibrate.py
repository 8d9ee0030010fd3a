"""`puma calibrate` and the calibration measures behind it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run, run_json

from puma_cli.jobs import calibrate as calibrate_job
from puma_cli.quality.calibration import (
    calibration_categories,
    expected_calibration_error,
    soft_ece,
)


def test_soft_ece_tracks_binned_ece_and_has_a_gradient() -> None:
    torch.manual_seed(0)
    logits = (3 * torch.randn(400, 3, dtype=torch.float64)).requires_grad_(True)
    labels = torch.randint(0, 3, (400,))
    surrogate = soft_ece(logits, labels)
    binned = expected_calibration_error(torch.softmax(logits, 1).detach().numpy(), labels.numpy())
    assert surrogate.item() == pytest.approx(binned, abs=0.03)
    (gradient,) = torch.autograd.grad(surrogate, logits)
    assert gradient.abs().sum() > 0


def test_categories_split_the_most_harmful_by_confidence() -> None:
    scores = np.array([-9.0, -8.0, -7.0, -6.0, 5.0, 6.0])
    confidence = np.array([0.99, 0.05, 0.6, 0.98, 0.5, 0.01])
    over_confident, over_uncertain, noise = calibration_categories(scores, confidence, k=3)
    # The 3 most harmful are rows 0, 1, 2; the 3 most confident 0, 3, 2; the 3 least 5, 1, 4.
    assert over_confident.tolist() == [0, 2]
    assert over_uncertain.tolist() == [1]
    assert noise.tolist() == []


def test_calibrate_lowers_held_out_ece_and_records_it(noisy: Path, tmp_path: Path) -> None:
    out = run_json(
        "calibrate",
        "-m",
        noisy / "m.safetensors",
        "-o",
        tmp_path / "c.safetensors",
        "--plot",
        tmp_path / "rel.png",
    )
    assert out["ece_after"] < out["ece_before"]
    assert out["accuracy_before"] - out["accuracy_after"] <= 0.005
    assert out["over_confident"] + out["other_noise"] > 0
    entry = run_json("info", tmp_path / "c.safetensors")["provenance"][-1]
    assert entry["op"] == "calibrate" and entry["metrics"]["ece_after"] == pytest.approx(
        out["ece_after"]
    )
    shown = " ".join(run("info", tmp_path / "c.safetensors").stdout.split())
    assert "1. 20" in shown and "calibrate (puma), ECE " in shown
    assert f"ECE {out['ece_before']:.3g} -> {out['ece_after']:.3g}" in shown
    assert (tmp_path / "rel.png").read_bytes()[:4] == b"\x89PNG"
    again = run_json("eval", "-m", tmp_path / "c.safetensors", "--on", "val")
    assert again["ece"] == pytest.approx(out["ece_after"], abs=1e-6)


def test_calibrate_refuses_to_lose_accuracy(
    noisy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = calibrate_job._figures
    calls = {"n": 0}

    def costly(model, data, bins):  # type: ignore[no-untyped-def]
        ece, accuracy = real(model, data, bins)
        calls["n"] += 1
        return ece, accuracy if calls["n"] == 1 else accuracy - 0.02  # every patch costs 2 points

    monkeypatch.setattr(calibrate_job, "_figures", costly)
    result = run(
        "calibrate",
        "-m",
        noisy / "m.safetensors",
        "-o",
        tmp_path / "c.safetensors",
        "--plot",
        tmp_path / "rel.png",
    )
    assert_clean_error(result, "without costing more than 0.5 accuracy points; nothing was written")
    assert not (tmp_path / "c.safetensors").exists() and not (tmp_path / "rel.png").exists()


def test_calibrate_bad_input(noisy: Path, tmp_path: Path) -> None:
    model = noisy / "m.safetensors"
    assert_clean_error(run("calibrate", "-m", model, "--bins", "0"), "--bins 0")
    assert_clean_error(
        run("calibrate", "-m", model, "-k", "0", "-o", tmp_path / "x.safetensors"), "-k 0"
    )
    (tmp_path / "x.safetensors").write_text("keep")
    assert_clean_error(
        run("calibrate", "-m", model, "-o", tmp_path / "x.safetensors"), "already exists"
    )


def test_no_held_out_data_is_a_clear_error_for_debug_and_calibrate(
    data_dir: Path, tmp_path: Path
) -> None:
    run_json(
        "train",
        data_dir / "radial.csv",
        "-o",
        tmp_path / "nv.safetensors",
        "--val-frac",
        "0",
        "--epochs",
        "5",
    )
    for command in ("debug-labels", "calibrate"):
        assert_clean_error(
            run(command, "-m", tmp_path / "nv.safetensors"), "pass --criterion-data FILE"
        )
