"""How good a model is: evaluation metrics, calibration, and label-error ranking."""
