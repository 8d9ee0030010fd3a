"""U-LiRA and the unlearning challenge's forgetting score: the statistics on synthetic
shadows, and `puma attack --attack u-lira` on a real removal, with its refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, assert_clean_error, run, run_json

from puma_cli.audit.ulira import UnlearnedShadows, epsilon, forgetting_score, game_scores
from puma_cli.io.checkpoint import ROLE_WITHDRAWN, load_checkpoint
from puma_cli.io.datasets import load_dataset
from puma_cli.io.ids import read_ids


def _shadows(shift: float, count: int = 16, targets: int = 40, seed: int = 0) -> UnlearnedShadows:
    """Each target in half the shadows; unlearned ones shifted by `shift` standard units."""
    rng = np.random.default_rng(seed)
    inclusion = np.argsort(rng.random((count, targets)), axis=0) < count // 2
    base = rng.normal(0, 3, targets)  # per-target means differ, as phi does
    phi = base + rng.normal(0, 1, (count, targets)) + shift * inclusion
    return UnlearnedShadows(inclusion, phi)


def test_the_game_tells_apart_only_what_differs() -> None:
    from puma_cli.audit.scoring import auc_score

    same = game_scores(_shadows(0.0))
    apart = game_scores(_shadows(4.0))
    assert abs(auc_score(*same) - 0.5) < 0.08
    assert auc_score(*apart) > 0.97
    assert same[0].size == same[1].size == 16 // 2 * 40


def test_epsilon_and_the_forgetting_score() -> None:
    rng = np.random.default_rng(1)
    mixed = rng.normal(0, 1, 64)
    # Disjoint samples: the largest epsilon k samples a side allow; two samples of one
    # distribution: well below it (not 0: the maximum over thresholds of noisy rates).
    apart = epsilon(np.arange(32.0) + 100, np.arange(32.0))
    assert apart == pytest.approx(np.log((1 - 0.01 - 0.5 / 33) / (0.5 / 33)))
    assert epsilon(mixed[:32], mixed[32:]) < apart / 2
    near, _ = forgetting_score(_shadows(0.0, count=64))
    far, eps = forgetting_score(_shadows(6.0, count=64))
    assert far < 0.1 < near <= 1.0
    assert eps.shape == (40,) and (eps > 0).all()


@pytest.fixture(scope="module")
def removed(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ulira")
    data, test = data_dir / "radial.csv", data_dir / "radial-test.csv"
    run_json("mark", data, "--random", "0.1", "-o", folder / "ids.txt")
    run_json("train", data, "--test", test, "-o", folder / "model.safetensors", *FAST)
    for method in ("puma", "retrain"):
        run_json("remove", "-m", folder / "model.safetensors", "--marked", folder / "ids.txt",
                 "--method", method, "-o", folder / f"{method}.safetensors")  # fmt: skip
    return folder


def _ulira(folder: Path, model: str, *args: str) -> dict:
    return run_json("attack", "-m", folder / f"{model}.safetensors", "--targets",
                    folder / "ids.txt", "--attack", "u-lira", "--shadows", "8",
                    "--device", "cpu", *args)  # fmt: skip


def test_u_lira_audits_the_removal_the_model_records(removed: Path) -> None:
    report = _ulira(removed, "puma")
    assert report["attack"] == "u-lira"
    rows = run_json("info", removed / "puma.safetensors")["rows"]
    assert rows["removed"] + rows["withdrawn"] == len(read_ids(removed / "ids.txt"))
    assert rows["withdrawn"] > 0  # the marking holds validation rows, never trained on:
    assert report["n_targets"] == report["n_nonmembers"] == 4 * rows["removed"]  # pairs
    (said,) = [note for note in report["notes"] if "left out of the audit" in note]
    assert said.startswith(f"{rows['withdrawn']} of the {rows['removed'] + rows['withdrawn']}")
    for key in ("auc", "accuracy", "forgetting_score", "model_flagged"):
        assert 0.0 <= report[key] <= 1.0, key
    assert any("repeating --method puma" in note for note in report["notes"])
    assert any("coarse and biased" in note for note in report["notes"])  # 4 a side
    entry = load_checkpoint(removed / "puma.safetensors").provenance[-1]
    assert entry["options"]["forget"] == "step"  # what u-lira repeats
    caches = list(removed.glob("puma-ulira-*.safetensors"))
    assert len(caches) == 1
    again = _ulira(removed, "puma")
    assert again["auc"] == report["auc"]  # from the cache
    # Retraining is its own reference: its audit has its own cache and figures.
    reference = _ulira(removed, "retrain")
    assert len(list(removed.glob("puma-ulira-*.safetensors"))) == 2
    assert 0.0 <= reference["auc"] <= 1.0


def test_u_lira_refusals(removed: Path, data_dir: Path, tmp_path: Path) -> None:
    base = ["attack", "--targets", removed / "ids.txt", "--attack", "u-lira", "--device", "cpu"]
    assert_clean_error(run(*base, "-m", removed / "model.safetensors", "--shadows", "8"),
                       "records none")  # fmt: skip
    assert_clean_error(run(*base, "-m", removed / "puma.safetensors", "--shadows", "4"),
                       "--shadows 4 is out of range")  # fmt: skip
    assert_clean_error(run(*base, "-m", removed / "puma.safetensors", "--plot",
                           tmp_path / "x.png"), "drop --plot")  # fmt: skip
    other = tmp_path / "other.txt"
    ids = [line.split(",")[0] for line in (data_dir / "radial.csv").read_text().splitlines()[1:]]
    marked = set(read_ids(removed / "ids.txt"))
    other.write_text("\n".join([i for i in ids if i not in marked][:3]) + "\n")
    assert_clean_error(run(*base[:1], "-m", removed / "puma.safetensors", "--targets", other,
                           "--attack", "u-lira", "--shadows", "8"),
                       "were not removed")  # fmt: skip
    # Marked validation rows were never trained on: nothing of theirs to audit.
    roles = load_checkpoint(removed / "puma.safetensors").roles
    withdrawn = load_dataset(data_dir / "radial.csv").ids[roles == ROLE_WITHDRAWN]
    (tmp_path / "held.txt").write_text("\n".join(withdrawn) + "\n")
    assert_clean_error(run(*base[:1], "-m", removed / "puma.safetensors", "--targets",
                           tmp_path / "held.txt", "--attack", "u-lira", "--shadows", "8"),
                       "every target is a validation row")  # fmt: skip
    # A membership attack keeps them, and says what they are.
    said = run_json("attack", "-m", removed / "puma.safetensors", "--targets",
                    tmp_path / "held.txt")  # fmt: skip
    assert any("every target is a validation row" in note for note in said["notes"])
    assert f"{len(withdrawn)} withdrawn" in run("info", removed / "puma.safetensors").stdout
    assert not (tmp_path / "x.png").exists()


def test_u_lira_refuses_a_method_it_cannot_repeat(data_dir: Path, tmp_path: Path) -> None:
    data = data_dir / "radial.csv"
    run_json("mark", data, "--random", "0.1", "-o", tmp_path / "ids.txt")
    test = data_dir / "radial-test.csv"
    run_json("train", data, "--test", test, "-o", tmp_path / "s.safetensors", "--shards", "2",
             *FAST)  # fmt: skip
    run_json("remove", "-m", tmp_path / "s.safetensors", "--marked", tmp_path / "ids.txt",
             "--method", "sisa", "-o", tmp_path / "r.safetensors")  # fmt: skip
    result = run("attack", "-m", tmp_path / "r.safetensors", "--targets", tmp_path / "ids.txt",
                 "--attack", "u-lira", "--shadows", "8")  # fmt: skip
    assert_clean_error(result, "--method sisa cannot run on")
