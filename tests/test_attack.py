"""Membership inference: the loss attack separates members on an overfit model, and
finds nothing between two sets of non-members (a check that can fail)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run, run_json

from puma_cli.audit.lira import lira_scores
from puma_cli.audit.loss import loss_attack
from puma_cli.audit.scoring import auc_score, roc_curve, tpr_at_fpr
from puma_cli.audit.shadows import ShadowSet, sorted_log_softmax
from puma_cli.audit.shokri import shokri_scores
from puma_cli.data.dataset import Dataset
from puma_cli.io.checkpoint import ROLE_VALIDATION, load_checkpoint
from puma_cli.io.datasets import load_dataset
from puma_cli.models.recipe import TrainRecipe
from puma_cli.models.training import train_classifier


def _random_labels(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(
        X=rng.normal(size=(n, 5)),
        y=rng.integers(0, 2, n),
        ids=np.array([str(i) for i in range(n)]),
        feature_names=tuple(f"f{i}" for i in range(5)),
    )


@pytest.fixture(scope="module")
def overfit() -> tuple[torch.nn.Module, Dataset]:
    """Random labels: whatever the model learns of its 60 members is memorised."""
    members = _random_labels(60, 0)
    model = train_classifier(
        members, TrainRecipe(hidden=(64, 64), epochs=300, lr=3e-3, batch_size=16), 2
    )
    return model, members


def test_loss_attack_separates_members_of_an_overfit_model(
    overfit: tuple[torch.nn.Module, Dataset],
) -> None:
    model, members = overfit
    report = loss_attack(model, members, _random_labels(200, 1), members)
    # Chance is 0.5 and equal rates; a non-member with a random label is still fitted by
    # luck about half the time, so the separation is strong but not total.
    assert report.auc > 0.75
    assert report.member_rate > report.nonmember_rate + 0.3
    assert report.tpr_at_1pct_fpr is not None and report.tpr_at_01pct_fpr is None
    assert any("cannot resolve" in note for note in report.notes)


def test_loss_attack_finds_nothing_between_two_non_member_sets(
    overfit: tuple[torch.nn.Module, Dataset],
) -> None:
    model, members = overfit
    report = loss_attack(model, _random_labels(300, 2), _random_labels(300, 3), members)
    assert 0.4 < report.auc < 0.6
    assert abs(report.member_rate - report.nonmember_rate) < 0.1


def test_roc_and_auc_on_a_hand_made_example() -> None:
    members, nonmembers = np.array([3.0, 2.0, 0.5]), np.array([1.0, 0.0])
    assert auc_score(members, nonmembers) == pytest.approx(5 / 6)
    fpr, tpr = roc_curve(members, nonmembers)
    assert fpr.tolist() == [0.0, 0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 2 / 3, 1.0, 1.0])
    assert tpr_at_fpr(fpr, tpr, 200, 0.01) == pytest.approx(2 / 3)
    assert tpr_at_fpr(fpr, tpr, 50, 0.01) is None


def test_attack_through_the_cli(model_file: Path, data_dir: Path, tmp_path: Path) -> None:
    run_json("mark", data_dir / "radial.csv", "--class", "1", "-o", tmp_path / "ids.txt")
    out = run_json(
        "attack",
        "-m",
        model_file,
        "--targets",
        tmp_path / "ids.txt",
        "--plot",
        tmp_path / "roc.png",
    )
    assert {
        "attack",
        "member_rate",
        "auc",
        "tpr_at_1pct_fpr",
        "tpr_at_0.1pct_fpr",
        "nonmember_rate",
    } <= set(out)
    assert out["n_nonmembers"] == 40  # the recorded test file
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert not any("validation row" in note for note in out["notes"])
    # Targets the model never trained on (its validation rows) are said to be such.
    roles = load_checkpoint(model_file).roles
    held = load_dataset(data_dir / "radial.csv").ids[roles == ROLE_VALIDATION]
    (tmp_path / "held.txt").write_text("\n".join(held[:3]) + "\n")
    said = run_json("attack", "-m", model_file, "--targets", tmp_path / "held.txt")
    assert any("every target is a validation row" in note for note in said["notes"])
    (tmp_path / "none.txt").write_text("ghost\n")
    assert_clean_error(
        run("attack", "-m", model_file, "--targets", tmp_path / "none.txt"), "are not in"
    )
    assert (
        run(
            "attack", "-m", model_file, "--targets", tmp_path / "ids.txt", "--attack", "x"
        ).exit_code
        == 2
    )


def _shadow_world(seed: int) -> tuple[ShadowSet, np.ndarray, np.ndarray]:
    """A pool of 400 points, 16 shadows each holding half of them; a point's phi is about
    2 when a model trained on it, 0 when not. Points 0..199 are members of the attacked model."""
    rng = np.random.default_rng(seed)
    inclusion = np.argsort(rng.random((16, 400)), axis=0) < 8
    offset = rng.normal(0, 0.5, 400)  # per-point difficulty, which LiRA's per-point means absorb
    phi = offset + 2.0 * inclusion + rng.normal(0, 0.5, (16, 400))
    member = np.arange(400) < 200
    attacked = offset + 2.0 * member + rng.normal(0, 0.5, 400)
    return ShadowSet(inclusion, phi, _two_class_features(phi)), attacked, member


def _two_class_features(phi: np.ndarray) -> np.ndarray:
    """Sorted log-softmax of two-class logits (phi, 0): what a model with margin phi shows."""
    logits = torch.as_tensor(np.stack([phi, np.zeros_like(phi)], axis=-1)).reshape(-1, 2)
    return sorted_log_softmax(logits).reshape(*phi.shape, 2)


@pytest.mark.parametrize("online", [False, True])
def test_lira_separates_members_and_not_two_non_member_sets(online: bool) -> None:
    shadows, phi, member = _shadow_world(0)
    scores = lira_scores(shadows, phi, online)
    assert auc_score(scores[member], scores[~member]) > 0.95
    outsiders = scores[~member]
    assert 0.4 < auc_score(outsiders[:100], outsiders[100:]) < 0.6


def test_shokri_separates_members_and_not_two_non_member_sets() -> None:
    shadows, phi, member = _shadow_world(1)
    probability = shokri_scores(shadows, _two_class_features(phi))
    assert auc_score(probability[member], probability[~member]) > 0.9
    called = probability >= 0.5
    assert called[member].mean() > called[~member].mean() + 0.5
    outsiders = probability[~member]
    assert 0.4 < auc_score(outsiders[:100], outsiders[100:]) < 0.6


def test_lira_through_the_cli_shares_shadows_along_a_removal_chain(
    model_file: Path, data_dir: Path, tmp_path: Path
) -> None:
    shutil.copy(model_file, tmp_path / "m.safetensors")
    run_json("mark", data_dir / "radial.csv", "--class", "1", "-o", tmp_path / "ids.txt")
    run_json(
        "remove",
        "-m",
        tmp_path / "m.safetensors",
        "--marked",
        tmp_path / "ids.txt",
        "--method",
        "retrain",
    )
    for attack in ("lira", "lira-online", "shokri"):
        out = run_json(
            "attack",
            "-m",
            tmp_path / "m.safetensors",
            "--targets",
            tmp_path / "ids.txt",
            "--attack",
            attack,
            "--shadows",
            "4",
        )
        assert out["attack"] == attack and 0 <= out["auc"] <= 1
        assert out["shadows"] == 4
        assert any(
            "only 4 shadow models" in note and "--shadows 16" in note for note in out["notes"]
        )
    caches = sorted(tmp_path.glob("puma-shadows-*.safetensors"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    run_json(
        "attack",
        "-m",
        tmp_path / "m.removed.safetensors",
        "--targets",
        tmp_path / "ids.txt",
        "--attack",
        "lira",
        "--shadows",
        "4",
    )
    assert sorted(tmp_path.glob("puma-shadows-*.safetensors")) == caches
    assert caches[0].stat().st_mtime_ns == stamp  # reused, not retrained
    assert_clean_error(
        run(
            "attack",
            "-m",
            tmp_path / "m.safetensors",
            "--targets",
            tmp_path / "ids.txt",
            "--attack",
            "lira",
            "--shadows",
            "1",
        ),
        "--shadows 1 is out of range; give a number in [2, 1024]",
    )
