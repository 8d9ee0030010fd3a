"""`puma debug-labels`: planted flips rise to the top; the output files; the refusals."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_error, run, run_json

from puma_cli.quality.label_ranking import found_curve, rank_labels


@pytest.mark.parametrize("score", ["puma", "ntk", "self-influence"])
def test_planted_flips_are_enriched_at_the_top(noisy: Path, score: str) -> None:
    out = run_json(
        "debug-labels",
        "-m",
        noisy / "m.safetensors",
        "--truth",
        noisy / "d-flipped.txt",
        "--score",
        score,
        "--no-cache",
    )
    truth = out["truth"]
    base_rate = truth["known"] / out["n"]
    assert 0.05 < base_rate < 0.15
    # Reviewing 10 % of the data finds at least three times the flips chance would.
    assert truth["found_at_10pct"] >= 3 * 0.10, truth
    assert truth["found_at_20pct"] >= truth["found_at_10pct"]
    assert len(out["suspects"]) == 50 and truth["precision_at_k"] >= 3 * base_rate


def test_self_influence_past_the_dense_limit_takes_kronecker_blocks(
    noisy: Path, tmp_path: Path
) -> None:
    """A net of 6,882 parameters on 450 rows: its dense Hessian is refused (past 6,000),
    with the way on; K-FAC's and EK-FAC's blocks score every row and still find the
    planted flips, and `auto`, which would take the exact Hessian for so few rows, takes
    K-FAC's (the same ranking). The GGN's dense matrix serves a net under the limit."""
    model = tmp_path / "wide.safetensors"
    trained = run_json(
        "train", noisy / "d.csv", "-o", model, "--hidden", "80,80", "--epochs", "30",
        "--device", "cpu",
    )  # fmt: skip
    assert trained["n_parameters"] == 6882
    common = ["debug-labels", "-m", model, "--score", "self-influence", "--no-cache"]
    assert_clean_error(
        run(*common, "--curvature", "exact"), "use --curvature kfac or ekfac, or --score puma"
    )
    ranked = {}
    for curvature in ("kfac", "ekfac", "auto"):
        out = run_json(*common, "--curvature", curvature, "--truth", noisy / "d-flipped.txt")
        assert out["truth"]["found_at_10pct"] >= 3 * 0.10, (curvature, out["truth"])
        ranked[curvature] = out["suspects"]
        said = [w for w in out["warnings"] if "takes K-FAC's blocks" in w]
        assert len(said) == (curvature == "auto"), out["warnings"]
    assert ranked["auto"] == ranked["kfac"]
    small = tmp_path / "small.safetensors"
    run_json(
        "train", noisy / "d.csv", "-o", small, "--hidden", "8", "--epochs", "60",
        "--device", "cpu",
    )  # fmt: skip
    out = run_json(
        "debug-labels", "-m", small, "--score", "self-influence", "--no-cache",
        "--curvature", "ggn", "--truth", noisy / "d-flipped.txt",
    )  # fmt: skip
    assert out["truth"]["found_at_10pct"] >= 3 * 0.10, out["truth"]


def test_csv_and_plot_are_written(noisy: Path, tmp_path: Path) -> None:
    out = run_json(
        "debug-labels",
        "-m",
        noisy / "m.safetensors",
        "-k",
        "20",
        "-o",
        tmp_path / "s.csv",
        "--truth",
        noisy / "d-flipped.txt",
        "--plot",
        tmp_path / "curve.png",
    )
    with open(tmp_path / "s.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["id", "label", "predicted", "confidence", "influence", "rank"]
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, 21)]
    assert [r["id"] for r in rows] == out["suspects"]
    assert all(0 <= float(r["confidence"]) <= 1 for r in rows)
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refusals(noisy: Path, tmp_path: Path) -> None:
    model = noisy / "m.safetensors"
    assert_clean_error(
        run("debug-labels", "-m", model, "--plot", tmp_path / "c.png"), "needs --truth"
    )
    (tmp_path / "t.txt").write_text("nobody\n")
    assert_clean_error(
        run("debug-labels", "-m", model, "--truth", tmp_path / "t.txt"), "are not in"
    )
    assert_clean_error(run("debug-labels", "-m", model, "-k", "-1"), "-k -1")
    (tmp_path / "s.csv").write_text("mine")
    assert_clean_error(run("debug-labels", "-m", model, "-o", tmp_path / "s.csv"), "already exists")
    assert (tmp_path / "s.csv").read_text() == "mine"
    assert not (tmp_path / "c.png").exists()


def test_confidence_filter_moves_boundary_points_behind() -> None:
    scores = np.array([-5.0, -4.0, -3.0, 0.0, 1.0])
    probs = np.array([[0.51, 0.49], [0.99, 0.01], [0.9, 0.1], [0.55, 0.45], [0.8, 0.2]])
    labels = np.zeros(5, dtype=int)
    plain = rank_labels(scores, probs, labels, k=2, confidence_filter=False)
    assert plain.order.tolist() == [0, 1, 2, 3, 4]
    filtered = rank_labels(scores, probs, labels, k=2, confidence_filter=True)
    # Row 0 is among the 2 most suspicious and the 2 least confident: it goes behind row 1.
    assert filtered.order.tolist() == [1, 0, 2, 3, 4]
    assert filtered.demoted.tolist() == [True, False, False, False, False]


def test_found_curve_counts_hits_in_review_order() -> None:
    order = np.array([3, 0, 1, 2])
    truth = np.array([False, False, True, True])
    curve = found_curve(order, truth, np.array([0.25, 0.5, 1.0]))
    assert curve.tolist() == [0.5, 0.5, 1.0]


def test_full_criterion_is_a_choice_and_reported(noisy: Path) -> None:
    agreeing = run_json(
        "debug-labels",
        "-m",
        noisy / "m.safetensors",
        "--no-cache",
        "--truth",
        noisy / "d-flipped.txt",
    )
    full = run_json(
        "debug-labels",
        "-m",
        noisy / "m.safetensors",
        "--no-cache",
        "--full-criterion",
        "--truth",
        noisy / "d-flipped.txt",
    )
    assert agreeing["suspects"] != full["suspects"]
