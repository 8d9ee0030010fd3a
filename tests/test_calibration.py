import numpy as np
import pytest

from puma_cli.quality.calibration import expected_calibration_error


def test_ece_matches_a_hand_computed_value() -> None:
    # Confidences 0.9, 0.9 (one right, one wrong) fall in bin (0.8667, 0.9333];
    # 0.6 (right) in (0.5333, 0.6]; 0.55 (wrong) in (0.5333, 0.6] too.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 1])
    # bin A: acc 0.5, conf 0.9 -> |0.4| * 2/4 = 0.2
    # bin B: acc 0.5 (0.6 right, 0.55 wrong), conf 0.575 -> 0.075 * 2/4 = 0.0375
    assert expected_calibration_error(probs, labels, bins=15) == pytest.approx(0.2375)


def test_ece_is_zero_when_confidence_equals_accuracy() -> None:
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, np.array([0, 1])) == 0.0


def test_ece_of_confident_mistakes_is_one() -> None:
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, np.array([1, 0])) == pytest.approx(1.0)
